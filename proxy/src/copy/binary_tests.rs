//! Binary splitting: header with an extension, NULLs, empty fields, each
//! malformed length Postgres rejects, at every chunk size.

use super::text_tests::{keys, split_all};
use super::CopyError;

const SQL: &str = "COPY t (k, v) FROM STDIN (FORMAT binary)";

fn header(flags: u32, extension: &[u8]) -> Vec<u8> {
    let mut out = b"PGCOPY\n\xff\r\n\0".to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&(extension.len() as u32).to_be_bytes());
    out.extend_from_slice(extension);
    out
}

fn tuple(out: &mut Vec<u8>, fields: &[Option<&[u8]>]) {
    out.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for field in fields {
        match field {
            Some(bytes) => {
                out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                out.extend_from_slice(bytes);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
}

fn err(input: &[u8]) -> CopyError {
    let (_, error) = split_all(SQL, &["k", "v"], 0, input);
    error.expect("an error")
}

#[test]
fn rows_keys_nulls_and_extension() {
    let mut input = header(0x0000_ffff, b"ext!");
    tuple(&mut input, &[Some(b"alice"), Some(b"x")]);
    tuple(&mut input, &[None, Some(b"y")]);
    tuple(&mut input, &[Some(b""), None]);
    let long = vec![7u8; 300];
    tuple(&mut input, &[Some(&long), Some(b"z")]);
    input.extend_from_slice(&(-1i16).to_be_bytes());
    let (rows, error) = split_all(SQL, &["k", "v"], 0, &input);
    assert_eq!(error, None);
    assert_eq!(rows.len(), 4);
    assert_eq!(
        keys(&rows)[..3],
        [Some("alice".into()), None, Some(String::new())]
    );
    assert_eq!(rows[3].key.as_deref(), Some(&long[..]));
    assert_eq!(
        rows.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    // A row is the whole tuple, count included.
    assert_eq!(&rows[0].data[..2], &2i16.to_be_bytes());
    assert_eq!(rows[0].data.len(), 2 + 4 + 5 + 4 + 1);
}

#[test]
fn key_in_second_column_and_no_trailer() {
    let mut input = header(0, b"");
    tuple(&mut input, &[Some(b"1"), Some(b"k1")]);
    tuple(&mut input, &[Some(b"2"), None]);
    // CopyDone without the trailer (and a stray byte) ends the data.
    input.push(0);
    let (rows, error) = split_all(SQL, &["a", "k"], 1, &input);
    assert_eq!(error, None);
    assert_eq!(keys(&rows), vec![Some("k1".into()), None]);
}

#[test]
fn header_errors_name_no_line() {
    let e = err(b"PGCOPY\n\xff\r\n\x01");
    assert_eq!(
        (e.code, e.message.as_str()),
        ("22P04", "COPY file signature not recognized")
    );
    assert_eq!((e.line, e.context), (None, None));
    let e = err(b"");
    assert_eq!(e.message, "COPY file signature not recognized");
    let e = err(&header(1 << 16, b""));
    assert_eq!(e.message, "invalid COPY file header (WITH OIDS)");
    let e = err(&header(1 << 17, b""));
    assert_eq!(e.message, "unrecognized critical flags in COPY file header");
    let e = err(&header(0, b"")[..13]);
    assert_eq!(e.message, "invalid COPY file header (missing flags)");
    let e = err(&header(0, b"")[..17]);
    assert_eq!(e.message, "invalid COPY file header (missing length)");
    let mut negative = header(0, b"");
    negative[15..19].copy_from_slice(&(-5i32).to_be_bytes());
    let e = err(&negative);
    assert_eq!(e.message, "invalid COPY file header (missing length)");
    let e = err(&header(0, b"abcd")[..20]);
    assert_eq!(e.message, "invalid COPY file header (wrong length)");
}

#[test]
fn tuple_errors_name_their_line() {
    let mut input = header(0, b"");
    tuple(&mut input, &[Some(b"1"), Some(b"a")]);
    tuple(&mut input, &[Some(b"2")]);
    let e = err(&input);
    assert_eq!(
        (e.message.as_str(), e.line),
        ("row field count is 1, expected 2", Some(2))
    );
    assert_eq!(e.context.as_deref(), Some("COPY t, line 2"));

    let mut input = header(0, b"");
    input.extend_from_slice(&2i16.to_be_bytes());
    input.extend_from_slice(&(-2i32).to_be_bytes());
    let e = err(&input);
    assert_eq!(
        (e.message.as_str(), e.line),
        ("invalid field size", Some(1))
    );

    let mut input = header(0, b"");
    tuple(&mut input, &[Some(b"1"), Some(b"a")]);
    input.extend_from_slice(&2i16.to_be_bytes());
    input.extend_from_slice(&10i32.to_be_bytes());
    input.extend_from_slice(b"short");
    let e = err(&input);
    assert_eq!(
        (e.message.as_str(), e.line),
        ("unexpected EOF in COPY data", Some(2))
    );

    let mut input = header(0, b"");
    input.extend_from_slice(&2i16.to_be_bytes());
    input.extend_from_slice(&[0, 0]);
    let e = err(&input);
    assert_eq!(e.message, "unexpected EOF in COPY data");

    let mut input = header(0, b"");
    tuple(&mut input, &[Some(b"1"), Some(b"a")]);
    input.extend_from_slice(&(-1i16).to_be_bytes());
    input.push(b'x');
    let e = err(&input);
    assert_eq!(
        (e.message.as_str(), e.line),
        ("received copy data after EOF marker", Some(2))
    );
}
