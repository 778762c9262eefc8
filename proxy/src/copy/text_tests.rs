//! Text and CSV splitting, each input fed whole and in chunks of 1, 2, 3 and
//! 7 bytes (same rows every time), and the rows forwarded to a "server"
//! (a fresh splitter fed prefix + rows) must read back the same.

use bytes::Bytes;

use super::{parse_copy_in, CopyError, CopyRow, CopySplitter};

/// Rows (or the error) for `input` fed in `chunk`-byte messages.
fn split_chunks(
    sql: &str,
    columns: &[&str],
    key: usize,
    input: &[u8],
    chunk: usize,
) -> (Vec<CopyRow>, Option<CopyError>, Bytes, bool) {
    let copy = parse_copy_in(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let columns = columns.iter().map(|c| c.to_string()).collect();
    let mut splitter = CopySplitter::new(&copy, columns, key).expect("a splitter");
    let mut rows = Vec::new();
    let drain = |s: &mut CopySplitter, rows: &mut Vec<CopyRow>| loop {
        match s.next_row() {
            Ok(Some(row)) => rows.push(row),
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    };
    for piece in input.chunks(chunk.max(1)) {
        splitter.push(Bytes::copy_from_slice(piece));
        if let Some(e) = drain(&mut splitter, &mut rows) {
            return (rows, Some(e), splitter.prefix(), false);
        }
    }
    splitter.finish();
    let error = drain(&mut splitter, &mut rows);
    let done = splitter.is_done();
    if error.is_none() {
        assert_eq!(splitter.rows(), rows.len() as u64, "row count");
    }
    (rows, error, splitter.prefix(), done)
}

/// Splits `input` at every chunk size; all must agree. Successful splits
/// are also re-read as one server would get them.
pub(super) fn split_all(
    sql: &str,
    columns: &[&str],
    key: usize,
    input: &[u8],
) -> (Vec<CopyRow>, Option<CopyError>) {
    let (rows, error, prefix, done) = split_chunks(sql, columns, key, input, input.len());
    for chunk in [1, 2, 3, 7] {
        let (other_rows, other_error, other_prefix, _) =
            split_chunks(sql, columns, key, input, chunk);
        assert_eq!(other_rows, rows, "rows with {chunk}-byte chunks");
        assert_eq!(other_error, error, "error with {chunk}-byte chunks");
        assert_eq!(other_prefix, prefix, "prefix with {chunk}-byte chunks");
    }
    if error.is_none() {
        assert!(done, "the splitter is done after finish");
        let copy = parse_copy_in(sql).expect("parses");
        let names = columns.iter().map(|c| c.to_string()).collect();
        let probe = CopySplitter::new(&copy, names, key).expect("a splitter");
        let mut forwarded = prefix.to_vec();
        for row in &rows {
            forwarded.extend_from_slice(&row.data);
        }
        forwarded.extend_from_slice(probe.trailer());
        let (again, again_error, _, _) =
            split_chunks(sql, columns, key, &forwarded, forwarded.len());
        assert_eq!(again_error, None, "forwarded rows re-read without error");
        let keys = |rows: &[CopyRow]| rows.iter().map(|r| r.key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&again), keys(&rows), "forwarded rows keep their keys");
    }
    (rows, error)
}

pub(super) fn keys(rows: &[CopyRow]) -> Vec<Option<String>> {
    rows.iter()
        .map(|r| {
            r.key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .collect()
}

fn lines(rows: &[CopyRow]) -> Vec<u64> {
    rows.iter().map(|r| r.line).collect()
}

fn k(s: &str) -> Option<String> {
    Some(s.to_string())
}

const TEXT: &str = "COPY t (k, v) FROM STDIN";
const CSV: &str = "COPY t (k, v) FROM STDIN (FORMAT csv)";

fn ok(sql: &str, input: &[u8]) -> Vec<CopyRow> {
    let (rows, error) = split_all(sql, &["k", "v"], 0, input);
    assert_eq!(error, None, "{:?}", String::from_utf8_lossy(input));
    rows
}

fn err(sql: &str, input: &[u8]) -> CopyError {
    let (_, error) = split_all(sql, &["k", "v"], 0, input);
    error.unwrap_or_else(|| panic!("no error for {:?}", String::from_utf8_lossy(input)))
}

#[test]
fn text_rows_keys_and_lines() {
    let rows = ok(TEXT, b"1\ta\n22\tb\n\\N\tc\n");
    assert_eq!(keys(&rows), vec![k("1"), k("22"), None]);
    assert_eq!(lines(&rows), vec![1, 2, 3]);
    assert_eq!(&rows[1].data[..], b"22\tb\n");
}

#[test]
fn text_escapes_in_the_key() {
    let input = b"a\\tb\tx\nc\\nd\tx\ne\\\\f\tx\n\\x41\\102\\7\tx\ng\\\th\tx\n\\\\N\tx\n\\q\tx\n";
    let rows = ok(TEXT, input);
    assert_eq!(
        keys(&rows),
        vec![
            k("a\tb"),
            k("c\nd"),
            k("e\\f"),
            k("AB\x07"),
            k("g\th"),
            k("\\N"),
            k("q")
        ]
    );
}

#[test]
fn text_escaped_newline_and_end_marker() {
    let rows = ok(TEXT, b"a\\\nb\tx\n2\ty\n\\.\nignored\tjunk\n");
    assert_eq!(keys(&rows), vec![k("a\nb"), k("2")]);
    assert_eq!(lines(&rows), vec![1, 2]);
    // `\.` ends the data even inside a line; the line before it counts.
    let rows = ok(TEXT, b"1\tx\n2\ty\\.\n3\tz\n");
    assert_eq!(keys(&rows), vec![k("1"), k("2")]);
    assert_eq!(&rows[1].data[..], b"2\ty\n");
}

#[test]
fn text_newline_styles_and_last_line() {
    let rows = ok(TEXT, b"1\ta\r\n2\tb\r\n");
    assert_eq!(keys(&rows), vec![k("1"), k("2")]);
    assert_eq!(&rows[0].data[..], b"1\ta\r\n");
    let rows = ok(TEXT, b"1\ta\r2\tb\r3\tc");
    assert_eq!(keys(&rows), vec![k("1"), k("2"), k("3")]);
    assert_eq!(&rows[2].data[..], b"3\tc\r");
    // A backslash at the very end is ignored, and must not escape the
    // terminator the forwarded row gets.
    let rows = ok(TEXT, b"1\ta\n2\tb\\");
    assert_eq!(&rows[1].data[..], b"2\tb\n");
}

#[test]
fn text_custom_delimiter_null_and_header() {
    let sql = "COPY t (k, v) FROM STDIN WITH (DELIMITER '|', NULL 'nil', HEADER)";
    let (rows, error) = split_all(sql, &["k", "v"], 1, b"k|v\nx\\|y|nil\nnil|a\\|b\n");
    assert_eq!(error, None);
    assert_eq!(keys(&rows), vec![None, k("a|b")]);
    assert_eq!(lines(&rows), vec![2, 3]);
    let (_, _, prefix, _) = split_chunks(sql, &["k", "v"], 1, b"k|v\n1|2\n", 3);
    assert_eq!(&prefix[..], b"k|v\n");
}

#[test]
fn text_field_count_errors() {
    let e = err(TEXT, b"1\ta\n2\tb\tc\n");
    assert_eq!(e.code, "22P04");
    assert_eq!(e.message, "extra data after last expected column");
    assert_eq!(e.line, Some(2));
    assert_eq!(e.context.as_deref(), Some("COPY t, line 2"));
    let e = err(TEXT, b"1\ta\n2\tb\n3\n");
    assert_eq!(e.message, "missing data for column \"v\"");
    assert_eq!(e.line, Some(3));
    let e = err(TEXT, b"1\ta\n\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("missing data for column \"v\"", Some(2))
    );
}

#[test]
fn text_line_errors() {
    let e = err(TEXT, b"1\ta\n2\tb\rc\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("literal carriage return found in data", Some(2))
    );
    let e = err(TEXT, b"1\ta\r\n2\tb\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("literal newline found in data", Some(2))
    );
    let e = err(TEXT, b"1\ta\n\\.x\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("end-of-copy marker corrupt", Some(2))
    );
    let e = err(TEXT, b"1\ta\r\n\\.\n");
    assert_eq!(
        e.message,
        "end-of-copy marker does not match previous newline style"
    );
}

#[test]
fn text_encoding_errors() {
    let e = err(TEXT, b"1\ta\n2\t\xff\n");
    assert_eq!(e.code, "22021");
    assert_eq!(
        e.message,
        "invalid byte sequence for encoding \"UTF8\": 0xff"
    );
    assert_eq!(e.line, Some(2));
    let e = err(TEXT, b"1\ta\n2\tb\\xc3\n");
    assert_eq!((e.code, e.line), ("22021", Some(2)));
    assert_eq!(
        e.message,
        "invalid byte sequence for encoding \"UTF8\": 0xc3"
    );
    // Escaped UTF-8 that is valid passes; so does raw UTF-8 split anywhere.
    let rows = ok(TEXT, b"\\xc3\\xa9\tx\n\xc3\xa9\xe2\x82\xac\tx\n");
    assert_eq!(keys(&rows), vec![k("\u{e9}"), k("\u{e9}\u{20ac}")]);
    // Postgres fails when its reader reaches the bad byte: here while
    // looking past the carriage return that ends line 1.
    let e = err(CSV, b"1,a\r\xff\r");
    assert_eq!((e.code, e.line), ("22021", Some(1)));
    let e = err(TEXT, b"1\ta\n2\t\xc3");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("invalid byte sequence for encoding \"UTF8\": 0xc3", Some(2))
    );
}

#[test]
fn csv_quotes_and_nulls() {
    let rows = ok(
        CSV,
        b"1,\"a,b\"\n\"2\",\"x\"\"y\"\n\"k\"\"3\",z\n,x\n\"\",x\n",
    );
    assert_eq!(keys(&rows), vec![k("1"), k("2"), k("k\"3"), None, k("")]);
    let sql = "COPY t (k, v) FROM STDIN WITH (FORMAT csv, NULL 'NULL')";
    let (rows, error) = split_all(sql, &["k", "v"], 0, b"NULL,x\n\"NULL\",x\n,x\n");
    assert_eq!(error, None);
    assert_eq!(keys(&rows), vec![None, k("NULL"), k("")]);
}

#[test]
fn csv_force_not_null_and_force_null() {
    let sql = "COPY t (k, v) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL (k))";
    let (rows, _) = split_all(sql, &["k", "v"], 0, b",x\n\"\",y\n");
    assert_eq!(keys(&rows), vec![k(""), k("")]);
    let sql = "COPY t (k, v) FROM STDIN WITH (FORMAT csv, FORCE_NULL (k))";
    let (rows, _) = split_all(sql, &["k", "v"], 0, b",x\n\"\",y\na,z\n");
    assert_eq!(keys(&rows), vec![None, None, k("a")]);
    let sql = "COPY t (k, v) FROM STDIN WITH (FORMAT csv, FORCE_NULL (v))";
    let (rows, _) = split_all(sql, &["k", "v"], 0, b"\"\",y\n");
    assert_eq!(keys(&rows), vec![k("")]);
}

#[test]
fn csv_custom_quote_escape_delimiter() {
    let sql = "COPY t (k, v) FROM STDIN WITH (FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\')";
    let (rows, error) = split_all(sql, &["k", "v"], 0, b"'a\\'b;c';x\n'd''e';y\nf\\g;z\n");
    assert_eq!(error, None);
    // `''` is not an escape here: it closes and reopens the quote.
    assert_eq!(keys(&rows), vec![k("a'b;c"), k("de"), k("f\\g")]);
}

#[test]
fn csv_quoted_newlines_and_line_numbers() {
    // Postgres counts quoted newlines of the file's style; on the first
    // line that style is not known yet, so a quoted LF there is not counted.
    let rows = ok(CSV, b"1,\"a\nb\"\n2,\"c\nd\ne\"\n3,x\n");
    assert_eq!(keys(&rows), vec![k("1"), k("2"), k("3")]);
    assert_eq!(lines(&rows), vec![1, 4, 5]);
    assert_eq!(&rows[1].data[..], b"2,\"c\nd\ne\"\n");
    let rows = ok(CSV, b"1,\"a\r\nb\"\r\n2,\"c\r\nd\"\r\n");
    assert_eq!(lines(&rows), vec![2, 4]);
}

#[test]
fn csv_header_and_end_marker() {
    let sql = "COPY t (k, v) FROM STDIN WITH CSV HEADER";
    let (rows, error) = split_all(sql, &["k", "v"], 0, b"k,v\n1,a\n\\.x,b\n\\.\n9,z\n");
    assert_eq!(error, None);
    assert_eq!(keys(&rows), vec![k("1"), k("\\.x")]);
    assert_eq!(lines(&rows), vec![2, 3]);
    // The end marker inside a quoted field is data.
    let rows = ok(CSV, b"1,\"x\n\\.\n\"\n2,y\n");
    assert_eq!(keys(&rows), vec![k("1"), k("2")]);
}

#[test]
fn csv_errors() {
    let e = err(CSV, b"1,a\n2,\"abc\ndef\n");
    assert_eq!(e.message, "unterminated CSV quoted field");
    assert_eq!(e.line, Some(4));
    let e = err(CSV, b"1,a\n2,b,c\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("extra data after last expected column", Some(2))
    );
    let e = err(CSV, b"1,a\n2\n");
    assert_eq!(e.message, "missing data for column \"v\"");
    let e = err(CSV, b"1,a\n2,b\rc\n");
    assert_eq!(
        (e.message.as_str(), e.line),
        ("unquoted carriage return found in data", Some(2))
    );
}

#[test]
fn errors_stop_the_copy_and_repeat() {
    let copy = parse_copy_in(TEXT).expect("parses");
    let mut splitter =
        CopySplitter::new(&copy, vec!["k".into(), "v".into()], 0).expect("a splitter");
    splitter.push(Bytes::from_static(b"1\ta\tb\n2\tc\n"));
    let first = splitter.next_row().expect_err("extra data");
    assert_eq!(splitter.next_row().expect_err("still failed"), first);
    assert!(splitter.is_done());
}

#[test]
fn a_row_longer_than_the_limit_is_refused() {
    let copy = parse_copy_in(TEXT).expect("parses");
    let mut splitter =
        CopySplitter::new(&copy, vec!["k".into(), "v".into()], 0).expect("a splitter");
    splitter.set_max_row_bytes(16);
    splitter.push(Bytes::from_static(b"1\tshort\n"));
    assert!(splitter.next_row().expect("a row").is_some());
    for _ in 0..4 {
        splitter.push(Bytes::from_static(b"xxxxxx"));
    }
    let e = splitter.next_row().expect_err("too long");
    assert_eq!((e.code, e.line), ("54000", Some(2)));
}

#[test]
fn rows_inside_one_message_are_not_copied() {
    let copy = parse_copy_in(TEXT).expect("parses");
    let mut splitter =
        CopySplitter::new(&copy, vec!["k".into(), "v".into()], 0).expect("a splitter");
    let message = Bytes::from_static(b"1\ta\n2\tb\n");
    splitter.push(message.clone());
    let row = splitter.next_row().expect("ok").expect("a row");
    assert_eq!(row.data.as_ptr(), message.as_ptr());
    let key = row.key.expect("a key");
    assert_eq!(key.as_ptr(), message.as_ptr());
}
