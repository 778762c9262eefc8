//! Comparing one query's result from the proxy with the reference server's:
//! results as text tables (the simple protocol's text, or binary values
//! decoded to a canonical text), compared in order only when the query's
//! ORDER BY is total, floats within a relative tolerance, and a readable
//! diff of the first differing rows when they disagree.

use std::cmp::Ordering;
use std::fmt::Write as _;

use tokio_postgres::types::{FromSql, Type};

/// Relative tolerance for values a merge may compute in another order
/// (float sums, averages): 1e-9 of the larger magnitude.
pub const RELATIVE_TOLERANCE: f64 = 1e-9;

/// One row of values as text (`None` is NULL).
pub type TextRow = Vec<Option<String>>;

/// A result: column names, and rows of values as text (`None` is NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<TextRow>,
}

/// Whether row order is part of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The ORDER BY is total (ends with a unique key): rows compare in order.
    Total,
    /// No ORDER BY, or one with ties: rows compare as multisets.
    Unordered,
}

/// How the values of one column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exactness {
    Exact,
    /// Equal within [`RELATIVE_TOLERANCE`] when the texts differ.
    Tolerant,
}

/// Which columns compare with a tolerance: float4/float8 always (a merge
/// adds partial float sums in another order), numeric only when the query
/// computes averages or deviations (their scale comes from a division the
/// proxy may do differently). Everything else must match as text.
pub fn exactness(types: &[Type], sql: &str) -> Vec<Exactness> {
    let lower = sql.to_ascii_lowercase();
    let averages = ["avg(", "stddev(", "variance(", "percentile_cont("]
        .iter()
        .any(|f| lower.contains(f));
    types
        .iter()
        .map(|t| {
            if *t == Type::FLOAT4 || *t == Type::FLOAT8 || (averages && *t == Type::NUMERIC) {
                Exactness::Tolerant
            } else {
                Exactness::Exact
            }
        })
        .collect()
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

fn values_equal(a: &Option<String>, b: &Option<String>, exactness: Exactness) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) if exactness == Exactness::Tolerant => {
            match (parse_float(a), parse_float(b)) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => {
                    (x - y).abs() <= RELATIVE_TOLERANCE * x.abs().max(y.abs())
                }
                (Some(x), Some(y)) => x == y || (x.is_nan() && y.is_nan()),
                _ => false,
            }
        }
        _ => false,
    }
}

fn rows_equal(a: &[Option<String>], b: &[Option<String>], exactness: &[Exactness]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).enumerate().all(|(i, (x, y))| {
            values_equal(x, y, exactness.get(i).copied().unwrap_or(Exactness::Exact))
        })
}

fn compare_rows(a: &[Option<String>], b: &[Option<String>]) -> Ordering {
    a.cmp(b)
}

fn show_row(row: &[Option<String>]) -> String {
    let cells: Vec<String> = row
        .iter()
        .map(|v| match v {
            None => "NULL".to_string(),
            Some(text) => format!("{text:?}"),
        })
        .collect();
    format!("({})", cells.join(", "))
}

/// At most this many differing rows are shown per side.
const SHOWN_ROWS: usize = 5;

/// `Ok` when `candidate` gives the same answer as `reference`, else a
/// readable description of the first differences.
pub fn compare(
    reference: &Table,
    candidate: &Table,
    order: Order,
    exactness: &[Exactness],
) -> Result<(), String> {
    if reference.columns != candidate.columns {
        return Err(format!(
            "columns differ:\n  reference: {:?} ({} rows)\n  proxy:     {:?} ({} rows)",
            reference.columns,
            reference.rows.len(),
            candidate.columns,
            candidate.rows.len()
        ));
    }
    let (mut expected, mut actual) = (reference.rows.clone(), candidate.rows.clone());
    if order == Order::Unordered {
        expected.sort_by(|a, b| compare_rows(a, b));
        actual.sort_by(|a, b| compare_rows(a, b));
    }
    let first_difference = expected
        .iter()
        .zip(&actual)
        .position(|(e, a)| !rows_equal(e, a, exactness));
    if first_difference.is_none() && expected.len() == actual.len() {
        return Ok(());
    }
    let mut report = String::new();
    if expected.len() != actual.len() {
        let _ = writeln!(
            report,
            "row counts differ: reference {} rows, proxy {} rows",
            expected.len(),
            actual.len()
        );
    }
    match order {
        Order::Total => {
            let start = first_difference.unwrap_or(expected.len().min(actual.len()));
            let _ = writeln!(
                report,
                "first difference at row {start} (ORDER BY is total):"
            );
            for index in start..(start + SHOWN_ROWS) {
                let (e, a) = (expected.get(index), actual.get(index));
                if e.is_none() && a.is_none() {
                    break;
                }
                let mark = match (e, a) {
                    (Some(e), Some(a)) if rows_equal(e, a, exactness) => " ",
                    _ => "≠",
                };
                let show = |row: Option<&TextRow>| {
                    row.map(|r| show_row(r))
                        .unwrap_or_else(|| "(no row)".into())
                };
                let _ = writeln!(
                    report,
                    "  {mark} row {index}\n      reference: {}\n      proxy:     {}",
                    show(e),
                    show(a)
                );
            }
        }
        Order::Unordered => {
            let (missing, extra) = multiset_difference(&expected, &actual, exactness);
            let _ = writeln!(report, "compared as multisets (no total ORDER BY):");
            for (rows, side) in [
                (&missing, "only in the reference"),
                (&extra, "only through the proxy"),
            ] {
                let _ = write!(report, "  {} rows {side}", rows.len());
                let _ = writeln!(report, "{}", if rows.is_empty() { "" } else { ", e.g.:" });
                for row in rows.iter().take(SHOWN_ROWS) {
                    let _ = writeln!(report, "      {}", show_row(row));
                }
            }
        }
    }
    Err(report)
}

/// Rows of sorted `expected` with no equal row in sorted `actual`, and the
/// other way round, by one merge walk (results can have many thousand rows).
fn multiset_difference<'a>(
    expected: &'a [TextRow],
    actual: &'a [TextRow],
    exactness: &[Exactness],
) -> (Vec<&'a TextRow>, Vec<&'a TextRow>) {
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < expected.len() && j < actual.len() {
        if rows_equal(&expected[i], &actual[j], exactness) {
            i += 1;
            j += 1;
        } else if compare_rows(&expected[i], &actual[j]) == Ordering::Less {
            missing.push(&expected[i]);
            i += 1;
        } else {
            extra.push(&actual[j]);
            j += 1;
        }
    }
    missing.extend(&expected[i..]);
    extra.extend(&actual[j..]);
    (missing, extra)
}

/// The rows of a simple-protocol Query, with their column names (also when
/// there are no rows).
pub fn table_from_simple(messages: &[tokio_postgres::SimpleQueryMessage]) -> Table {
    let mut table = Table {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for message in messages {
        match message {
            tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                table.columns = columns.iter().map(|c| c.name().to_string()).collect();
            }
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                table.rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    table
}

/// A value in the binary format, kept as its bytes whatever its type.
pub struct RawValue(pub Vec<u8>);

impl<'a> FromSql<'a> for RawValue {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<RawValue, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// The rows of an extended-protocol query (binary results), each value
/// decoded to a canonical text by [`binary_text`].
pub fn table_from_rows(
    columns: &[tokio_postgres::Column],
    rows: &[tokio_postgres::Row],
) -> Result<Table, String> {
    let mut table = Table {
        columns: columns.iter().map(|c| c.name().to_string()).collect(),
        rows: Vec::new(),
    };
    for row in rows {
        let mut values = Vec::new();
        for (index, column) in row.columns().iter().enumerate() {
            let raw: Option<RawValue> = row
                .try_get(index)
                .map_err(|e| format!("column {} of a row cannot be read: {e}", column.name()))?;
            values.push(raw.map(|RawValue(bytes)| binary_text(column.type_(), &bytes)));
        }
        table.rows.push(values);
    }
    Ok(table)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::from("\\x"), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A binary value as text that is equal exactly when the bytes are (numeric
/// keeps its display scale), readable for the types the suite uses and
/// hexadecimal for the rest.
pub fn binary_text(type_: &Type, bytes: &[u8]) -> String {
    let fixed = |n: usize| -> Option<[u8; 8]> {
        (bytes.len() == n).then(|| {
            let mut buffer = [0u8; 8];
            buffer[8 - n..].copy_from_slice(bytes);
            buffer
        })
    };
    let decoded = match type_ {
        t if *t == Type::INT2 => {
            fixed(2).map(|b| (i64::from_be_bytes(b) as u16 as i16).to_string())
        }
        t if *t == Type::INT4 || *t == Type::DATE => {
            fixed(4).map(|b| (i64::from_be_bytes(b) as u32 as i32).to_string())
        }
        t if *t == Type::INT8 || *t == Type::TIMESTAMPTZ || *t == Type::TIMESTAMP => {
            fixed(8).map(|b| i64::from_be_bytes(b).to_string())
        }
        t if *t == Type::FLOAT8 => fixed(8).map(|b| f64::from_be_bytes(b).to_string()),
        t if *t == Type::FLOAT4 => {
            fixed(4).map(|b| f32::from_bits(u64::from_be_bytes(b) as u32).to_string())
        }
        t if *t == Type::BOOL => (bytes.len() == 1).then(|| {
            if bytes[0] != 0 {
                "t".to_string()
            } else {
                "f".to_string()
            }
        }),
        t if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME || *t == Type::BPCHAR => {
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }
        t if *t == Type::UUID => uuid::Uuid::from_slice(bytes).ok().map(|u| u.to_string()),
        t if *t == Type::JSONB => bytes
            .split_first()
            .filter(|(version, _)| **version == 1)
            .and_then(|(_, json)| std::str::from_utf8(json).ok())
            .map(str::to_string),
        t if *t == Type::NUMERIC => numeric_text(bytes),
        _ => None,
    };
    decoded.unwrap_or_else(|| hex(bytes))
}

/// Postgres's binary numeric (base-10000 digits, weight, sign, display
/// scale) as its decimal text, e.g. `-12.500`.
pub fn numeric_text(bytes: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<i16> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
    };
    let digit_count = usize::try_from(word(0)?).ok()?;
    let weight = i64::from(word(1)?);
    let sign = word(2)? as u16;
    let scale = usize::try_from(word(3)?).ok()?;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    let digits: Vec<i16> = (0..digit_count)
        .map(|i| word(4 + i))
        .collect::<Option<_>>()?;
    let digit_at = |position: i64| -> i16 {
        // position = weight of the base-10000 digit wanted
        let index = weight - position;
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut integer = String::new();
    for position in (0..=weight.max(0)).rev() {
        let digit = digit_at(position);
        if integer.is_empty() {
            if digit != 0 || position == 0 {
                integer = digit.to_string();
            }
        } else {
            let _ = write!(integer, "{digit:04}");
        }
    }
    let mut fraction = String::new();
    let mut position = -1;
    while fraction.len() < scale {
        let _ = write!(fraction, "{:04}", digit_at(position));
        position -= 1;
    }
    fraction.truncate(scale);
    let negative = sign == 0x4000;
    let mut text = String::new();
    if negative {
        text.push('-');
    }
    text.push_str(&integer);
    if scale > 0 {
        text.push('.');
        text.push_str(&fraction);
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[&[Option<&str>]]) -> Table {
        Table {
            columns: vec!["a".into(), "b".into()],
            rows: rows
                .iter()
                .map(|r| r.iter().map(|v| v.map(str::to_string)).collect())
                .collect(),
        }
    }

    const EXACT: [Exactness; 2] = [Exactness::Exact, Exactness::Exact];

    #[test]
    fn unordered_results_match_in_any_order_but_ordered_ones_do_not() {
        let reference = table(&[&[Some("1"), None], &[Some("2"), Some("x")]]);
        let swapped = table(&[&[Some("2"), Some("x")], &[Some("1"), None]]);
        assert_eq!(
            compare(&reference, &swapped, Order::Unordered, &EXACT),
            Ok(())
        );
        let report =
            compare(&reference, &swapped, Order::Total, &EXACT).expect_err("order matters");
        assert!(report.contains("first difference at row 0"), "{report}");
    }

    #[test]
    fn a_missing_duplicate_row_is_reported() {
        let reference = table(&[&[Some("1"), None], &[Some("1"), None]]);
        let candidate = table(&[&[Some("1"), None]]);
        let report =
            compare(&reference, &candidate, Order::Unordered, &EXACT).expect_err("differs");
        assert!(
            report.contains("reference 2 rows, proxy 1 rows"),
            "{report}"
        );
        assert!(report.contains("1 rows only in the reference"), "{report}");
    }

    #[test]
    fn floats_match_within_the_tolerance_only_where_allowed() {
        let tolerant = [Exactness::Exact, Exactness::Tolerant];
        let reference = table(&[&[Some("1"), Some("0.30000000000000004")]]);
        let close = table(&[&[Some("1"), Some("0.3")]]);
        let far = table(&[&[Some("1"), Some("0.3000001")]]);
        assert_eq!(compare(&reference, &close, Order::Total, &tolerant), Ok(()));
        assert!(compare(&reference, &close, Order::Total, &EXACT).is_err());
        assert!(compare(&reference, &far, Order::Total, &tolerant).is_err());
        let nan = table(&[&[Some("1"), Some("NaN")]]);
        let infinite = table(&[&[Some("1"), Some("Infinity")]]);
        assert_eq!(compare(&nan, &nan, Order::Total, &tolerant), Ok(()));
        assert!(compare(&nan, &infinite, Order::Total, &tolerant).is_err());
    }

    #[test]
    fn column_names_must_match() {
        let reference = table(&[]);
        let mut renamed = table(&[]);
        renamed.columns[1] = "c".into();
        assert!(compare(&reference, &renamed, Order::Unordered, &EXACT)
            .expect_err("names differ")
            .contains("columns differ"));
    }

    /// Binary numerics as Postgres 15 sends them (`SELECT x::numeric` in
    /// binary), decoded with their display scale.
    #[test]
    fn numeric_binary_values_decode_with_their_scale() {
        let cases: &[(&[i16], &str)] = &[
            // ndigits, weight, sign, dscale, digits...
            (&[0, 0, 0, 0], "0"),
            (&[0, 0, 0, 3], "0.000"),
            (&[2, 0, 0x4000, 3], "-12.500"), // digits follow below
            (&[1, 1, 0, 0, 1], "10000"),
            (&[2, 0, 0, 4, 1, 2345], "1.2345"),
            (&[1, -1, 0, 5, 1200], "0.12000"),
            (&[2, 2, 0, 0, 12, 3400], "1234000000"),
        ];
        for (words, expected) in cases {
            let mut words = words.to_vec();
            if *expected == "-12.500" {
                words.extend_from_slice(&[12, 5000]);
            }
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            assert_eq!(
                numeric_text(&bytes).as_deref(),
                Some(*expected),
                "{words:?}"
            );
        }
    }
}
