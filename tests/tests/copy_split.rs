//! The COPY splitter against real Postgres: tricky text, CSV and binary
//! inputs are loaded with a real `COPY ... FROM STDIN` into a plain table,
//! and the splitter must find the same rows with the same keys (Postgres's
//! `SELECT k ORDER BY id`, ids from a serial in row order). Malformed inputs
//! must fail in both, with the same SQLSTATE, message and line number; COPY
//! statements Postgres rejects must be refused with its own words.

use bytes::Bytes;
use futures_util::SinkExt;
use proxy::copy::{parse_copy_in, CopyError, CopySplitter};
use shardline_tests::TestCluster;

const COLUMNS: [&str; 2] = ["k", "v"];

/// The splitter's keys (or its error) for `input`, fed in 5-byte messages.
fn split(sql: &str, input: &[u8]) -> Result<Vec<Option<String>>, CopyError> {
    let copy = parse_copy_in(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let columns = copy
        .row_columns(&COLUMNS.map(String::from))
        .expect("columns");
    let key = columns.iter().position(|c| c == "k").expect("k is copied");
    let mut splitter = CopySplitter::new(&copy, columns, key)?;
    let mut keys = Vec::new();
    let mut drain = |s: &mut CopySplitter| -> Result<(), CopyError> {
        while let Some(row) = s.next_row()? {
            keys.push(
                row.key
                    .map(|k| String::from_utf8(k.to_vec()).expect("keys are UTF-8")),
            );
        }
        Ok(())
    };
    for piece in input.chunks(5) {
        splitter.push(Bytes::copy_from_slice(piece));
        drain(&mut splitter)?;
    }
    splitter.finish();
    drain(&mut splitter)?;
    assert!(splitter.is_done());
    Ok(keys)
}

/// Loads `input` with a real COPY; the row count or Postgres's error.
async fn load(
    client: &tokio_postgres::Client,
    sql: &str,
    input: &[u8],
) -> Result<u64, tokio_postgres::Error> {
    client
        .batch_execute("TRUNCATE t RESTART IDENTITY")
        .await
        .expect("truncate");
    let sink = client.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    for piece in input.chunks(64) {
        sink.send(Bytes::copy_from_slice(piece)).await?;
    }
    sink.finish().await
}

fn binary_input(tuples: &[[Option<&[u8]>; 2]], extension: &[u8], trailer: bool) -> Vec<u8> {
    let mut out = b"PGCOPY\n\xff\r\n\0".to_vec();
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&(extension.len() as u32).to_be_bytes());
    out.extend_from_slice(extension);
    for tuple in tuples {
        out.extend_from_slice(&2i16.to_be_bytes());
        for field in tuple {
            match field {
                Some(bytes) => {
                    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                    out.extend_from_slice(bytes);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
    }
    if trailer {
        out.extend_from_slice(&(-1i16).to_be_bytes());
    }
    out
}

const TEXT: &str = "COPY t (k, v) FROM STDIN";
const CSV: &str = "COPY t (k, v) FROM STDIN (FORMAT csv)";
const BINARY: &str = "COPY t (k, v) FROM STDIN (FORMAT binary)";

fn good_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let long = "x".repeat(70_000);
    let mut inputs: Vec<(&str, Vec<u8>)> = vec![
        (TEXT, b"1\ta\n2\tb\n\\N\tc\n".to_vec()),
        (
            TEXT,
            b"a\\tb\tx\nc\\nd\tx\ne\\\\f\tx\n\\x41\\102\\7\tx\ng\\\th\tx\n\\\\N\tx\n\\q\tx\n"
                .to_vec(),
        ),
        (TEXT, b"1\tx\n2\ty\\.\n3\tz\n".to_vec()),
        (TEXT, b"1\ta\r\n2\tb\r\n\\.\r\nignored\n".to_vec()),
        (TEXT, b"1\ta\r2\tb\r3\tc".to_vec()),
        (TEXT, b"1\ta\n2\tb\\".to_vec()),
        (TEXT, b"a\\\nb\tx\n\\xc3\\xa9\t\xc3\xa9\n".to_vec()),
        (TEXT, format!("{long}\tv\nshort\t{long}\n").into_bytes()),
        (
            "COPY t (v, k) FROM STDIN WITH (DELIMITER '|', NULL 'nil', HEADER)",
            b"v|k\nx\\|y|nil\nnil|a\\|b\n".to_vec(),
        ),
        (
            CSV,
            b"1,\"a,b\"\n\"2\",\"x\"\"y\"\n\"k\"\"3\",z\n,x\n\"\",x\n".to_vec(),
        ),
        (CSV, b"1,\"a\nb\"\n2,\"c\nd\ne\"\n3,x\n".to_vec()),
        (CSV, b"1,\"a\r\nb\"\r\n2,\"c\r\nd\"\r\n".to_vec()),
        (
            "COPY t (k, v) FROM STDIN WITH (FORMAT csv, FORCE_NOT_NULL (k))",
            b",x\n\"\",y\n".to_vec(),
        ),
        (
            "COPY t (k, v) FROM STDIN WITH (FORMAT csv, FORCE_NULL (k), NULL 'N')",
            b"N,x\n\"N\",y\n\"\",z\n".to_vec(),
        ),
        (
            "COPY t (k, v) FROM STDIN WITH (FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\')",
            b"'a\\'b;c';x\n'd''e';y\nf\\g;z\n".to_vec(),
        ),
        (
            "COPY t (k, v) FROM STDIN WITH CSV HEADER",
            b"k,v\n1,a\n\\.x,b\n\\.\n9,z\n".to_vec(),
        ),
    ];
    inputs.push((CSV, b"1,a\r2,\"x\ry\"\r".to_vec()));
    inputs.push((CSV, b"1,a\r\n\\.\r\n".to_vec()));
    inputs.push((
        "COPY t (k, v) FROM STDIN (HEADER)",
        b"k\tv\n1\ta\n".to_vec(),
    ));
    inputs.push((
        "COPY t (k, v) FROM STDIN (FORMAT csv, HEADER)",
        b"k,v\n".to_vec(),
    ));
    inputs.push((TEXT, Vec::new()));
    inputs.push((
        BINARY,
        binary_input(
            &[
                [Some(b"alice"), Some(b"x")],
                [None, Some(b"y")],
                [Some(b""), None],
                [Some(long.as_bytes()), None],
            ],
            b"ext",
            true,
        ),
    ));
    inputs.push((
        BINARY,
        binary_input(&[[Some(b"no trailer"), None]], b"", false),
    ));
    inputs
}

fn bad_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut bad_count = binary_input(&[[Some(b"1"), None]], b"", false);
    bad_count.extend_from_slice(&1i16.to_be_bytes());
    bad_count.extend_from_slice(&1i32.to_be_bytes());
    bad_count.push(b'2');
    let mut bad_size = binary_input(&[], b"", false);
    bad_size.extend_from_slice(&2i16.to_be_bytes());
    bad_size.extend_from_slice(&(-7i32).to_be_bytes());
    let mut short = binary_input(&[[Some(b"1"), None]], b"", false);
    short.extend_from_slice(&2i16.to_be_bytes());
    short.extend_from_slice(&9i32.to_be_bytes());
    short.extend_from_slice(b"abc");
    let mut after = binary_input(&[[Some(b"1"), None]], b"", true);
    after.extend_from_slice(b"zz");
    let mut oids = binary_input(&[], b"", true);
    oids[11..15].copy_from_slice(&(1u32 << 16).to_be_bytes());
    vec![
        (TEXT, b"1\ta\n2\tb\tc\n".to_vec()),
        (TEXT, b"1\ta\n2\tb\n3\n".to_vec()),
        (TEXT, b"1\ta\n2\tb\rc\n".to_vec()),
        (TEXT, b"1\ta\r\n2\tb\n".to_vec()),
        (TEXT, b"1\ta\n\\.x\n".to_vec()),
        (TEXT, b"1\ta\r\n\\.\n".to_vec()),
        (TEXT, b"1\ta\n2\t\xff\n".to_vec()),
        (TEXT, b"1\ta\n2\tb\\xc3\n".to_vec()),
        (TEXT, b"1\ta\n2\t\\0\n".to_vec()),
        (CSV, b"1,a\n2,\"abc\ndef\n".to_vec()),
        (CSV, b"1,\"abc\ndef\n".to_vec()),
        (CSV, b"1,a\n2,b,c\n".to_vec()),
        (CSV, b"1,a\n2\n".to_vec()),
        (CSV, b"1,a\n2,b\rc\n".to_vec()),
        (CSV, b"1,\"a\nb\"\n2,b,c\n".to_vec()),
        (CSV, b"1,\"a\nb\"\n2,\"c\nd\"\n3,b,c\n".to_vec()),
        (TEXT, b"1\ta\n\\.".to_vec()),
        (CSV, b"1,a\n\\.".to_vec()),
        (CSV, b"1,a\n2,\"x\ny\xff\"\n".to_vec()),
        (BINARY, b"".to_vec()),
        (BINARY, b"PGCOPY\n\xff\r\n\x01rest".to_vec()),
        (BINARY, oids),
        (BINARY, bad_count),
        (BINARY, bad_size),
        (BINARY, short),
        (BINARY, after),
    ]
}

/// The line number in Postgres's CONTEXT (`COPY t, line 3: "..."`).
fn context_line(context: Option<&str>) -> Option<u64> {
    let rest = &context?[context?.find(", line ")? + ", line ".len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// How Postgres and the splitter each took one input.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The keys of the rows, in order.
    Loaded(Vec<Option<String>>),
    /// SQLSTATE, message, CONTEXT line.
    Failed(String, String, Option<u64>),
}

async fn postgres_outcome(client: &tokio_postgres::Client, sql: &str, input: &[u8]) -> Outcome {
    match load(client, sql, input).await {
        Ok(count) => {
            let stored: Vec<Option<String>> = client
                .query("SELECT k FROM t ORDER BY id", &[])
                .await
                .expect("read back")
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert_eq!(
                count,
                stored.len() as u64,
                "COPY's count is the rows stored"
            );
            Outcome::Loaded(stored)
        }
        Err(error) => {
            let db = error
                .as_db_error()
                .unwrap_or_else(|| panic!("{sql}: not a database error: {error:?}"));
            Outcome::Failed(
                db.code().code().to_string(),
                db.message().to_string(),
                context_line(db.where_()),
            )
        }
    }
}

fn splitter_outcome(sql: &str, input: &[u8]) -> Outcome {
    match split(sql, input) {
        Ok(keys) => Outcome::Loaded(keys),
        Err(e) => Outcome::Failed(e.code.to_string(), e.message, e.line),
    }
}

/// Inputs, and whether each must load; every one must come out the same
/// from Postgres and from the splitter.
async fn compare_all(
    client: &tokio_postgres::Client,
    cases: Vec<(&str, Vec<u8>, Option<bool>)>,
) -> usize {
    let mut differences = Vec::new();
    let mut failed_with_line = 0;
    for (sql, input, loads) in cases {
        let shown = String::from_utf8_lossy(&input[..input.len().min(80)]).into_owned();
        let postgres = postgres_outcome(client, sql, &input).await;
        let ours = splitter_outcome(sql, &input);
        if let Some(loads) = loads {
            assert_eq!(
                matches!(postgres, Outcome::Loaded(_)),
                loads,
                "{sql} {shown:?}: Postgres gave {postgres:?}"
            );
        }
        if matches!(postgres, Outcome::Failed(_, _, Some(_))) {
            failed_with_line += 1;
        }
        if ours != postgres {
            differences.push(format!(
                "{sql} {shown:?}:\n  ours     {ours:?}\n  Postgres {postgres:?}"
            ));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    failed_with_line
}

async fn plain_table(cluster: &TestCluster) -> tokio_postgres::Client {
    let client = cluster.connect(0).await;
    client
        .batch_execute("CREATE TABLE t (id bigserial PRIMARY KEY, k text, v text)")
        .await
        .expect("create table");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitter_agrees_with_postgres() {
    let cluster = TestCluster::start(1);
    let client = plain_table(&cluster).await;
    let mut cases: Vec<(&str, Vec<u8>, Option<bool>)> = Vec::new();
    cases.extend(
        good_inputs()
            .into_iter()
            .map(|(sql, input)| (sql, input, Some(true))),
    );
    cases.extend(
        bad_inputs()
            .into_iter()
            .map(|(sql, input)| (sql, input, Some(false))),
    );
    let with_line = compare_all(&client, cases).await;
    assert!(with_line >= 15, "CONTEXT lines were read ({with_line})");
}

/// Random inputs made of the bytes that matter (delimiters, quotes,
/// backslashes, dots, both newlines, the NULL string's letter, hex digits
/// and bytes that are not UTF-8), under several statements: Postgres and
/// the splitter must agree on each (4,000 agreed when this was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitter_agrees_with_postgres_on_random_inputs() {
    use rand::{Rng, SeedableRng};
    const ALPHABET: &[u8] = b"1a\t\t,,\"\\\\..\n\n\rNx0c3\xff\xc3\xa9";
    const STATEMENTS: &[&str] = &[
        TEXT,
        CSV,
        "COPY t (k, v) FROM STDIN (FORMAT csv, HEADER)",
        "COPY t (v, k) FROM STDIN (FORMAT csv, ESCAPE '\\', NULL 'N')",
        "COPY t (v, k) FROM STDIN (NULL 'N', DELIMITER ',')",
    ];
    let cluster = TestCluster::start(1);
    let client = plain_table(&cluster).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0b1);
    let cases = (0..1500)
        .map(|_| {
            let sql = STATEMENTS[rng.random_range(0..STATEMENTS.len())];
            let len = rng.random_range(0..40);
            let input = (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect();
            (sql, input, None)
        })
        .collect();
    compare_all(&client, cases).await;

    // Binary: a valid input cut anywhere, or followed by stray bytes.
    let long = vec![b'y'; 300];
    let whole = binary_input(
        &[
            [Some(b"a"), Some(b"b")],
            [None, Some(&long)],
            [Some(b""), None],
        ],
        b"xy",
        true,
    );
    let mut cases: Vec<(&str, Vec<u8>, Option<bool>)> = (0..=whole.len())
        .map(|cut| (BINARY, whole[..cut].to_vec(), None))
        .collect();
    for extra in [&b"\0"[..], b"\0\0", b"\xff\xff"] {
        let mut input = whole.clone();
        input.extend_from_slice(extra);
        cases.push((BINARY, input, Some(false)));
    }
    compare_all(&client, cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_postgres_rejects_are_refused_in_its_words() {
    let cluster = TestCluster::start(1);
    let client = plain_table(&cluster).await;
    let mut differences = Vec::new();
    for sql in [
        "COPY t (k, v) FROM STDIN (FORMAT csv, FORMAT text)",
        "COPY BINARY t (k, v) FROM STDIN CSV",
        "COPY t (k, v) FROM STDIN (FORMAT json)",
        "COPY t (k, v) FROM STDIN (BOGUS 1)",
        "COPY t (k, v) FROM STDIN (DELIMITER 'ab')",
        "COPY t (k, v) FROM STDIN (DELIMITER E'\\n')",
        "COPY t (k, v) FROM STDIN (NULL E'a\\rb')",
        "COPY t (k, v) FROM STDIN (DELIMITER 'x')",
        "COPY t (k, v) FROM STDIN (FORMAT binary, HEADER)",
        "COPY t (k, v) FROM STDIN (FORMAT binary, DELIMITER ',')",
        "COPY t (k, v) FROM STDIN (FORMAT binary, NULL 'x')",
        "COPY t (k, v) FROM STDIN (QUOTE '\"')",
        "COPY t (k, v) FROM STDIN (ESCAPE '\"')",
        "COPY t (k, v) FROM STDIN (FORMAT csv, QUOTE 'ab')",
        "COPY t (k, v) FROM STDIN (FORMAT csv, ESCAPE 'ab')",
        "COPY t (k, v) FROM STDIN (FORMAT csv, QUOTE ',')",
        "COPY t (k, v) FROM STDIN (FORCE_NOT_NULL (k))",
        "COPY t (k, v) FROM STDIN (FORCE_NULL (k))",
        "COPY t (k, v) FROM STDIN (FORMAT csv, FORCE_NOT_NULL k)",
        "COPY t (k, v) FROM STDIN (FORMAT csv, FORCE_QUOTE *)",
        "COPY t (k, v) FROM STDIN (NULL 'a\tb')",
        "COPY t (k, v) FROM STDIN (FORMAT csv, NULL '\"')",
        "COPY t (k, v) FROM STDIN (HEADER maybe)",
        "COPY t (k, v) FROM STDIN (FREEZE maybe)",
        "COPY t (k, v) FROM STDIN (DELIMITER)",
        "COPY t (k, v) FROM STDIN WITH OIDS",
    ] {
        let error = client
            .batch_execute(sql)
            .await
            .expect_err(&format!("Postgres accepted {sql}"));
        let db = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {error:?}"));
        let ours = parse_copy_in(sql).expect_err(&format!("the proxy accepted {sql}"));
        let syntax = db.message().starts_with("syntax error");
        if ours.code != db.code().code() || (!syntax && ours.message != db.message()) {
            differences.push(format!(
                "{sql}: ours {} {:?}, Postgres {} {:?}",
                ours.code,
                ours.message,
                db.code().code(),
                db.message()
            ));
        }
    }
    assert!(differences.is_empty(), "{differences:#?}");
    // Column checks happen once the table's columns are known.
    for (sql, table_columns) in [
        ("COPY t (k, nope) FROM STDIN", &["id", "k", "v"][..]),
        ("COPY t (k, k) FROM STDIN", &["id", "k", "v"][..]),
    ] {
        let error = client
            .batch_execute(sql)
            .await
            .expect_err("Postgres refuses");
        let db = error.as_db_error().expect("a database error");
        let copy = parse_copy_in(sql).expect("parses");
        let ours = copy
            .row_columns(
                &table_columns
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>(),
            )
            .expect_err("refused");
        assert_eq!(
            (ours.code, ours.message.as_str()),
            (db.code().code(), db.message()),
            "{sql}"
        );
    }
    let sql = "COPY t (k) FROM STDIN (FORMAT csv, FORCE_NOT_NULL (v))";
    let error = client
        .batch_execute(sql)
        .await
        .expect_err("Postgres refuses");
    let db = error.as_db_error().expect("a database error");
    let copy = parse_copy_in(sql).expect("parses");
    let ours = CopySplitter::new(&copy, vec!["k".into()], 0).expect_err("refused");
    assert_eq!(
        (ours.code, ours.message.as_str()),
        (db.code().code(), db.message())
    );
}
