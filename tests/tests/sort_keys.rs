//! The proxy's sort keys (`proxy::merge`) must order values exactly as
//! Postgres's ORDER BY does. For every key type the proxy accepts, a real
//! Postgres 15 holds a table of edge values (NULLs, NaN, ±Infinity, -0,
//! numerics of several scales, infinite dates, intervals equal by Postgres's
//! 30-day month, bpchar with trailing spaces, unicode text) and is the judge:
//! - every pair of values: `compare` agrees with the server's `<` and `=`;
//! - under each of ASC/DESC × NULLS FIRST/LAST: each adjacent pair of the
//!   server's order compares Less, or Equal exactly when the server says
//!   `a = b` (or both are NULL); sorting the values with `compare` gives the
//!   server's order; and merging three sorted streams (rows split by id)
//!   with `KWayMerge` gives the server's order too.
//!
//! Text keys are checked under the collations `collation_is_bytewise`
//! accepts, as the proxy reads them (`pg_collation_for` and the database's
//! collation); a collation it refuses is shown to order differently.

use std::cmp::Ordering;

use proxy::merge::{collation_is_bytewise, compare, KWayMerge, KeyKind, SortSpec};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use shardline_tests::TestCluster;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Client;

/// A column value exactly as the server sent it in binary, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl Raw {
    fn bytes(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }
}

/// One key type under test: the column type, the kind the proxy must pick
/// for it, and values as SQL literals coerced to the column's type.
struct Case {
    column_type: &'static str,
    kind: KeyKind,
    values: Vec<String>,
}

// The value lists are tables: rustfmt would put one value per line.
#[rustfmt::skip]
const TEXTS: &[&str] = &[
    "''", "'a'", "'A'", "'b'", "'B'", "'ab'", "'a b'", "E'a\\tb'", "'aa'", "'a'", "'é'",
    "U&'e\\0301'", "'e'", "'z'", "'Z'", "'日本'", "'日本語'", "'😀'", "'😀a'", "U&'\\FFFD'",
    "U&'\\+10FFFF'", "'ß'", "'ss'", "'ﬀ'", "'ff'", "' '", "'  '", "'a '", "'~'", "E'\\x7f'",
    "E'\\x01'", "NULL", "NULL",
];

#[rustfmt::skip]
const BPCHARS: &[&str] = &[
    "'a'", "'a '", "'a   '", "''", "' '", "'  '", "' a'", "E'a\\t'", "'ab'", "'ab '", "'b'",
    "'é '", "'é'", "'e'", "'😀 '", "NULL", "NULL",
];

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let case = |column_type, kind, values: &[&str]| Case {
        column_type,
        kind,
        values: values.iter().map(|v| v.to_string()).collect(),
    };
    vec![
        case("smallint", KeyKind::Int2, &[
            "NULL", "-32768", "-1", "0", "0", "1", "2", "255", "256", "32767", "NULL", "-256",
        ]),
        case("integer", KeyKind::Int4, &[
            "NULL", "-2147483648", "-65536", "-1", "0", "1", "1", "65535", "2147483647", "256",
        ]),
        case("bigint", KeyKind::Int8, &[
            "NULL", "-9223372036854775808", "-4294967296", "-1", "0", "1", "4294967296",
            "9223372036854775807", "1", "-9223372036854775807",
        ]),
        case("oid", KeyKind::Oid, &[
            "0", "1", "2147483647", "2147483648", "4294967295", "NULL", "1", "65536",
        ]),
        case("real", KeyKind::Float4, &[
            "'NaN'", "'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "'0'", "'1.5'", "'-1.5'",
            "'1e-45'", "'-1e-45'", "'3.4e38'", "'-3.4e38'", "'1.17549435e-38'", "NULL", "'0.1'",
            "'1'", "'1.0000001'",
        ]),
        case("double precision", KeyKind::Float8, &[
            "'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "'0'", "'4.9e-324'", "'-4.9e-324'",
            "'1.7976931348623157e308'", "'-1.7976931348623157e308'", "'0.1'",
            "'0.30000000000000004'", "'0.3'", "'NaN'", "NULL", "'1'", "'-1'",
        ]),
        case("numeric", KeyKind::Numeric, &[
            "'NaN'", "'NaN'", "'Infinity'", "'-Infinity'", "'Infinity'", "0", "0.0", "-0.0",
            "0.000", "1", "1.0", "1.00", "-1", "-1.000", "0.0001", "0.00001", "0.00009999",
            "9999.9999", "10000", "10000.0001", "99999999", "100000000", "1e100", "-1e100",
            "1e-100", "-1e-100", "123456789.123456789", "-123456789.123456789",
            "123456789.12345678", "-0.5", "-0.50", "NULL", "NULL", "1e-1000", "-1e-1000",
            "1e1000", "12345678901234567890", "12345678901234567890.0000000001",
        ]),
        case("boolean", KeyKind::Bool, &["true", "false", "NULL", "true", "false"]),
        case("date", KeyKind::Date, &[
            "'infinity'", "'-infinity'", "'2000-01-01'", "'1999-12-31'", "'4713-01-01 BC'",
            "'5874897-12-31'", "'1970-01-01'", "NULL", "'2000-01-01'", "'0001-01-01'",
        ]),
        case("time", KeyKind::Time, &[
            "'00:00'", "'00:00:00.000001'", "'12:00'", "'23:59:59.999999'", "'24:00:00'",
            "NULL", "'12:00:00'",
        ]),
        case("time with time zone", KeyKind::TimeTz, &[
            "'12:00+00'", "'13:00+01'", "'11:00-01'", "'12:00:00.000001+00'", "'00:00+15:59'",
            "'24:00-15:59'", "'00:00+00'", "'12:00+00'", "NULL", "'23:00+11'", "'01:00-11'",
        ]),
        case("timestamp", KeyKind::Timestamp, &[
            "'infinity'", "'-infinity'", "'4713-01-01 00:00:00 BC'",
            "'294276-12-31 23:59:59.999999'", "'2000-01-01'", "'1970-01-01'",
            "'1969-12-31 23:59:59.999999'", "'2000-01-01 00:00:00.000001'", "NULL",
            "'2000-01-01'",
        ]),
        case("timestamp with time zone", KeyKind::Timestamptz, &[
            "'infinity'", "'-infinity'", "'2000-01-01 00:00+00'", "'2000-01-01 01:00+01'",
            "'1999-12-31 23:00-01'", "'4713-01-01 00:00:00+00 BC'",
            "'294276-12-31 23:59:59.999999+00'", "NULL", "'1970-01-01 00:00:00.000001+00'",
        ]),
        case("interval", KeyKind::Interval, &[
            "'1 month'", "'30 days'", "'29 days 24 hours'", "'720 hours'", "'1 mon -1 day'",
            "'-1 month'", "'1 year'", "'360 days'", "'12 mons'", "'0'", "'-0 seconds'",
            "'1 microsecond'", "'-1 microsecond'", "'1 day -24 hours'", "'-178000000 years'",
            "'178000000 years'", "'2147483647 days'", "'-2147483648 days'",
            "'2562047788 hours'", "'-2562047788 hours'",
            "'178000000 years 2147483647 days 2562047788 hours'", "NULL", "'1 day'",
            "'24 hours'", "'1 mon 1 day -1 microsecond'",
        ]),
        case("uuid", KeyKind::Uuid, &[
            "'00000000-0000-0000-0000-000000000000'", "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
            "'7fffffff-ffff-ffff-ffff-ffffffffffff'", "'80000000-0000-0000-0000-000000000000'",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "NULL",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000001'",
        ]),
        case("bytea", KeyKind::Bytea, &[
            "''", "'\\x00'", "'\\x0000'", "'\\x01'", "'\\x7f'", "'\\x80'", "'\\xff'",
            "'\\xff00'", "'\\x616263'", "'\\x6162'", "NULL", "''", "'\\x00ff'",
        ]),
        case("text", KeyKind::Text, TEXTS),
        case("text COLLATE \"C\"", KeyKind::Text, TEXTS),
        case("text COLLATE \"POSIX\"", KeyKind::Text, TEXTS),
        case("text COLLATE ucs_basic", KeyKind::Text, TEXTS),
        case("text COLLATE \"C.utf8\"", KeyKind::Text, TEXTS),
        case("varchar(20)", KeyKind::Text, TEXTS),
        case("name", KeyKind::Text, TEXTS),
        case("bpchar", KeyKind::Bpchar, BPCHARS),
        case("character(4)", KeyKind::Bpchar, BPCHARS),
        case("bpchar COLLATE \"C\"", KeyKind::Bpchar, BPCHARS),
        case("\"char\"", KeyKind::Char, &[
            "'a'", "'A'", "''", "'\\200'", "'\\377'", "'\\177'", "'z'", "NULL", "'a'", "'\\001'",
        ]),
        case("money", KeyKind::Money, &[
            "'-92233720368547758.08'", "'92233720368547758.07'", "'0'", "'1.5'", "'-1.5'",
            "'0.01'", "NULL", "'1.50'",
        ]),
        case("pg_lsn", KeyKind::PgLsn, &[
            "'0/0'", "'FFFFFFFF/FFFFFFFF'", "'1/0'", "'0/FFFFFFFF'", "'7FFFFFFF/FFFFFFFF'",
            "'80000000/0'", "NULL", "'1/0'",
        ]),
    ]
}

/// The four ways to write one ORDER BY key.
const DIRECTIONS: [(&str, bool, bool); 4] = [
    ("ASC NULLS LAST", false, false),
    ("ASC NULLS FIRST", false, true),
    ("DESC NULLS FIRST", true, true),
    ("DESC NULLS LAST", true, false),
];

/// Streams the scatter simulation splits each table into.
const STREAMS: i32 = 3;

async fn create_table(client: &Client, table: &str, case: &Case) {
    let rows: Vec<String> = case.values.iter().map(|v| format!("({v})")).collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id serial PRIMARY KEY, v {});
             INSERT INTO {table} (v) VALUES {};",
            case.column_type,
            rows.join(", ")
        ))
        .await
        .unwrap_or_else(|e| panic!("create {table} ({}): {e}", case.column_type));
}

/// The column's type OID as the server describes it (RowDescription), and
/// whether the type is collatable by the catalog.
async fn described_type(client: &Client, table: &str) -> (u32, bool) {
    let statement = client
        .prepare(&format!("SELECT v FROM {table}"))
        .await
        .expect("prepare");
    let oid = statement.columns()[0].type_().oid();
    let collatable = client
        .query_one(
            "SELECT typcollation <> 0 FROM pg_type WHERE oid = $1",
            &[&oid],
        )
        .await
        .expect("read pg_type")
        .get(0);
    (oid, collatable)
}

/// What the proxy would pass as `database_collate`: the database's
/// collation for a libc database, its ICU locale otherwise.
async fn database_collate(client: &Client) -> String {
    let row = client
        .query_one(
            "SELECT datcollate::text, datlocprovider::text, coalesce(daticulocale, '')
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("read the database's collation");
    let provider: String = row.get(1);
    if provider == "c" {
        row.get(0)
    } else {
        row.get(2)
    }
}

/// The key's collation as the proxy can ask for it next to any key:
/// `pg_collation_for(v)` itself fails for a type without collations, while
/// a cast to text keeps a collatable value's collation (and gives "default"
/// for any other type, whose collation the proxy ignores).
async fn key_collation(client: &Client, table: &str) -> String {
    client
        .query_one(
            &format!("SELECT pg_collation_for(v::text) FROM {table} LIMIT 1"),
            &[],
        )
        .await
        .expect("pg_collation_for")
        .get(0)
}

/// `pg_collation_for(v)` straight, for collatable columns only.
async fn column_collation(client: &Client, table: &str) -> String {
    client
        .query_one(
            &format!("SELECT pg_collation_for(v) FROM {table} LIMIT 1"),
            &[],
        )
        .await
        .expect("pg_collation_for of a collatable column")
        .get(0)
}

/// Every pair of non-NULL values: `compare` (ascending) agrees exactly with
/// the server's `<` and `=`.
async fn check_every_pair(client: &Client, table: &str, case: &Case) -> Vec<String> {
    let rows = client
        .query(
            &format!(
                "SELECT a.v, b.v, a.v < b.v, a.v = b.v FROM {table} a, {table} b
                 WHERE a.v IS NOT NULL AND b.v IS NOT NULL"
            ),
            &[],
        )
        .await
        .expect("pairs");
    let non_null = case.values.iter().filter(|v| *v != "NULL").count();
    assert_eq!(rows.len(), non_null * non_null, "{table}: every pair");
    let spec = SortSpec::with_default_nulls(case.kind, false);
    let mut wrong = Vec::new();
    for row in &rows {
        let (a, b): (Raw, Raw) = (row.get(0), row.get(1));
        let (less, equal): (bool, bool) = (row.get(2), row.get(3));
        let server = match (less, equal) {
            (true, _) => Ordering::Less,
            (false, true) => Ordering::Equal,
            (false, false) => Ordering::Greater,
        };
        match compare(&spec, a.bytes(), b.bytes()) {
            Ok(ours) if ours == server => {}
            other => wrong.push(format!("{a:?} vs {b:?}: server {server:?}, ours {other:?}")),
        }
    }
    wrong
}

/// Under one ORDER BY direction: adjacent pairs, sorting, and the merge.
async fn check_direction(
    client: &Client,
    table: &str,
    spec: SortSpec,
    direction: &str,
) -> Vec<String> {
    let mut wrong = Vec::new();
    let pairs = client
        .query(
            &format!(
                "WITH s AS (SELECT v, row_number() OVER (ORDER BY v {direction}) AS pos
                            FROM {table})
                 SELECT a.v, b.v, a.v = b.v, (a.v IS NULL AND b.v IS NULL)
                 FROM s a JOIN s b ON b.pos = a.pos + 1 ORDER BY a.pos"
            ),
            &[],
        )
        .await
        .expect("adjacent pairs");
    for row in &pairs {
        let (a, b): (Raw, Raw) = (row.get(0), row.get(1));
        let equal: Option<bool> = row.get(2);
        let both_null: bool = row.get(3);
        let server = if both_null || equal == Some(true) {
            Ordering::Equal
        } else {
            Ordering::Less
        };
        let ours = compare(&spec, a.bytes(), b.bytes());
        if ours != Ok(server) {
            wrong.push(format!(
                "{direction}: {a:?} then {b:?}: server {server:?}, ours {ours:?}"
            ));
        }
    }

    let server_order = ordered_values(
        client,
        &format!("SELECT v FROM {table} ORDER BY v {direction}"),
    )
    .await;
    assert_eq!(
        server_order.len(),
        pairs.len() + 1,
        "{table}: pairs cover the table"
    );
    let mut sorted = server_order.clone();
    sorted.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
        server_order.len() as u64
    ));
    sorted.sort_by(|a, b| compare(&spec, a.bytes(), b.bytes()).expect("well-formed values"));
    wrong.extend(disagreements(
        &spec,
        &server_order,
        &sorted,
        &format!("{direction} sort"),
    ));

    let mut streams = Vec::new();
    for stream in 0..STREAMS {
        let sql =
            format!("SELECT v FROM {table} WHERE id % {STREAMS} = {stream} ORDER BY v {direction}");
        streams.push(ordered_values(client, &sql).await);
    }
    let merged = merge_streams(&KWayMerge::new(vec![spec]), &streams);
    wrong.extend(disagreements(
        &spec,
        &server_order,
        &merged,
        &format!("{direction} merge"),
    ));
    wrong
}

async fn ordered_values(client: &Client, sql: &str) -> Vec<Raw> {
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|row| row.get(0)).collect()
}

/// Positions where `ours` holds a value the server does not consider equal
/// to the one it put there.
fn disagreements(spec: &SortSpec, server: &[Raw], ours: &[Raw], what: &str) -> Vec<String> {
    if server.len() != ours.len() {
        return vec![format!(
            "{what}: {} values, server has {}",
            ours.len(),
            server.len()
        )];
    }
    server
        .iter()
        .zip(ours)
        .enumerate()
        .filter(|(_, (s, o))| compare(spec, s.bytes(), o.bytes()) != Ok(Ordering::Equal))
        .map(|(at, (s, o))| format!("{what}: position {at}: server {s:?}, ours {o:?}"))
        .collect()
}

/// The values of sorted streams in the order `merge` takes them.
fn merge_streams(merge: &KWayMerge, streams: &[Vec<Raw>]) -> Vec<Raw> {
    let mut positions = vec![0; streams.len()];
    let mut merged = Vec::new();
    loop {
        let keys: Vec<Option<[Option<&[u8]>; 1]>> = streams
            .iter()
            .zip(&positions)
            .map(|(values, &at)| values.get(at).map(|v| [v.bytes()]))
            .collect();
        let heads: Vec<Option<&[Option<&[u8]>]>> =
            keys.iter().map(|k| k.as_ref().map(|k| &k[..])).collect();
        match merge.first(&heads).expect("well-formed values") {
            Some(stream) => {
                merged.push(streams[stream][positions[stream]].clone());
                positions[stream] += 1;
            }
            None => return merged,
        }
    }
}

/// Creates the case's table and checks the proxy's view of its key type,
/// then every check of the module doc; returns the disagreements.
async fn check_case(
    client: &Client,
    database_collate: &str,
    table: &str,
    case: &Case,
) -> Vec<String> {
    create_table(client, table, case).await;
    let (oid, collatable) = described_type(client, table).await;
    let what = case.column_type;
    assert_eq!(
        KeyKind::from_oid(oid),
        Some(case.kind),
        "the kind of {what}"
    );
    assert_eq!(case.kind.collatable(), collatable, "{what}: collatable");
    let collation = key_collation(client, table).await;
    if collatable {
        assert_eq!(collation, column_collation(client, table).await, "{what}");
        assert!(
            collation_is_bytewise(&collation, database_collate),
            "{what}: collation {collation} in a {database_collate} database should be accepted"
        );
    }
    let mut wrong: Vec<String> = check_every_pair(client, table, case)
        .await
        .into_iter()
        .map(|w| format!("{what}: every pair: {w}"))
        .collect();
    for (direction, descending, nulls_first) in DIRECTIONS {
        let spec = SortSpec {
            kind: case.kind,
            descending,
            nulls_first,
        };
        let found = check_direction(client, table, spec, direction).await;
        wrong.extend(found.into_iter().map(|w| format!("{what}: {w}")));
    }
    wrong
}

async fn check_cases(prefix: &str, cases: &[Case]) {
    let cluster = TestCluster::start(1);
    let client = cluster.connect(0).await;
    let database_collate = database_collate(&client).await;
    let mut wrong = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let table = format!("{prefix}_{index}");
        wrong.extend(check_case(&client, &database_collate, &table, case).await);
    }
    assert!(
        wrong.is_empty(),
        "{} disagreements:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_orders_every_key_type_as_postgres_does() {
    check_cases("edge", &cases()).await;
}

/// Random values, drawn from small ranges so that many are equal by
/// Postgres but not by bytes (1.50 = 1.5, '1 mon' = '30 days', 13:00+01 =
/// 12:00+00 as instants), for the kinds whose comparison is more than an
/// integer compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_values_order_as_postgres_does() {
    check_cases(
        "random",
        &random_cases(&mut rand::rngs::StdRng::seed_from_u64(11)),
    )
    .await;
}

const RANDOM_VALUES: usize = 120;

fn random_cases(rng: &mut impl Rng) -> Vec<Case> {
    let draw = |rng: &mut _, make: fn(&mut dyn RngCore) -> String| -> Vec<String> {
        let rng: &mut dyn RngCore = rng;
        (0..RANDOM_VALUES).map(|_| make(rng)).collect()
    };
    let case = |column_type, kind, values| Case {
        column_type,
        kind,
        values,
    };
    vec![
        case("numeric", KeyKind::Numeric, draw(rng, random_numeric)),
        case(
            "double precision",
            KeyKind::Float8,
            draw(rng, |rng| {
                sql_string(&format!("{:e}", f64::from_bits(rng.next_u64())))
            }),
        ),
        case(
            "real",
            KeyKind::Float4,
            draw(rng, |rng| {
                sql_string(&format!("{:e}", f32::from_bits(rng.next_u32())))
            }),
        ),
        case(
            "interval",
            KeyKind::Interval,
            draw(rng, |rng| {
                format!(
                    "'{} mons {} days {} hours {} microseconds'",
                    rng.random_range(-3..=3),
                    rng.random_range(-100..=100),
                    rng.random_range(-2400..=2400),
                    rng.random_range(-1..=1)
                )
            }),
        ),
        case(
            "time with time zone",
            KeyKind::TimeTz,
            draw(rng, |rng| {
                format!(
                    "'{:02}:{:02}{:+03}'",
                    rng.random_range(0..24),
                    rng.random_range(0..2) * 30,
                    rng.random_range(-3..=3)
                )
            }),
        ),
        case(
            "text",
            KeyKind::Text,
            draw(rng, |rng| random_text(rng, &TEXT_PIECES)),
        ),
        case(
            "bpchar",
            KeyKind::Bpchar,
            draw(rng, |rng| random_text(rng, &BPCHAR_PIECES)),
        ),
    ]
}

/// Text made of pieces chosen for their byte patterns: ASCII, 2-, 3- and
/// 4-byte UTF-8, a combining mark, spaces and a tab.
const TEXT_PIECES: [&str; 10] = [
    "a", "b", "B", " ", "\t", "é", "\u{301}", "ﬀ", "😀", "\u{FFFD}",
];
const BPCHAR_PIECES: [&str; 5] = ["a", "b", " ", " ", "é"];

fn random_text(rng: &mut dyn RngCore, pieces: &[&str]) -> String {
    let length = rng.random_range(0..5);
    let text: String = (0..length)
        .map(|_| pieces[rng.random_range(0..pieces.len())])
        .collect();
    sql_string(&text)
}

/// A numeric literal with random digits on both sides of the point, or in
/// exponent form, or special; trailing zeros are common so that equal
/// values of different scales occur.
fn random_numeric(rng: &mut dyn RngCore) -> String {
    match rng.random_range(0..20) {
        0 => return "'NaN'".into(),
        1 => return "'Infinity'".into(),
        2 => return "'-Infinity'".into(),
        3 => return "NULL".into(),
        _ => {}
    }
    let whole = random_digits(rng);
    let fraction = random_digits(rng);
    let sign = if rng.random_bool(0.5) { "-" } else { "" };
    let exponent = match rng.random_range(0..4) {
        0 => format!("e{}", rng.random_range(-40..40)),
        _ => String::new(),
    };
    format!(
        "{sign}{}.{fraction}0{exponent}",
        if whole.is_empty() { "0" } else { &whole }
    )
}

/// Up to 9 digits, mostly zeros and nines (carries, trailing zeros).
fn random_digits(rng: &mut dyn RngCore) -> String {
    let count = rng.random_range(0..10);
    (0..count)
        .map(|_| ['0', '0', '1', '5', '9'][rng.random_range(0..5)])
        .collect()
}

/// A single-quoted SQL string (standard_conforming_strings is on).
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A collation `collation_is_bytewise` refuses does order text differently
/// from bytes: merging by bytes under it would be a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_collation_really_orders_differently() {
    let cluster = TestCluster::start(1);
    let client = cluster.connect(0).await;
    let database_collate = database_collate(&client).await;
    let icu = client
        .query_opt(
            "SELECT collname FROM pg_collation WHERE collname = 'und-x-icu'",
            &[],
        )
        .await
        .expect("look for the ICU root collation");
    assert!(
        icu.is_some(),
        "Postgres 15 here is built with ICU, so und-x-icu exists"
    );
    client
        .batch_execute(
            "CREATE TABLE icu_keys (v text COLLATE \"und-x-icu\");
             INSERT INTO icu_keys VALUES ('a'), ('B'), ('b'), ('A'), ('é'), ('f');",
        )
        .await
        .expect("create icu_keys");
    let collation = key_collation(&client, "icu_keys").await;
    assert_eq!(collation, column_collation(&client, "icu_keys").await);
    assert!(
        !collation_is_bytewise(&collation, &database_collate),
        "{collation}"
    );
    let server_order = ordered_values(&client, "SELECT v FROM icu_keys ORDER BY v").await;
    let mut bytewise = server_order.clone();
    let spec = SortSpec::with_default_nulls(KeyKind::Text, false);
    bytewise.sort_by(|a, b| compare(&spec, a.bytes(), b.bytes()).expect("text"));
    assert_ne!(
        server_order, bytewise,
        "ICU and byte order differ on these values"
    );
}
