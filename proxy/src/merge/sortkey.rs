//! Sort keys: which column types the proxy can order exactly as Postgres's
//! `ORDER BY` does (decided from the type OID in RowDescription), and
//! [`compare`], which orders two values in Postgres's binary format.
//!
//! Each comparison mirrors the type's default btree operator class in the
//! Postgres 15 sources (`float8_cmp_internal`, `cmp_numerics`,
//! `interval_cmp_value`, `timetz_cmp_internal`, `bpcharcmp`, `byteacmp`, ...).
//! Text kinds compare as bytes, which is right only under a byte-order
//! collation: the caller checks that with
//! [`collation_is_bytewise`](super::collation_is_bytewise) before merging.

use std::cmp::Ordering;

use super::numeric::{self, Numeric};

/// A type the proxy can order exactly, decided from the type OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Int2,
    Int4,
    Int8,
    /// Also unsigned 32-bit: `oid` compares as unsigned.
    Oid,
    Float4,
    Float8,
    Numeric,
    Bool,
    Date,
    Time,
    /// `time with time zone`: the instant first, then the zone.
    TimeTz,
    Timestamp,
    Timestamptz,
    Interval,
    Uuid,
    Bytea,
    /// `text`, `varchar` and `name`: bytes compared under a byte-order collation.
    Text,
    /// `character(n)`: trailing spaces are ignored.
    Bpchar,
    /// The one-byte `"char"`, compared as an unsigned byte.
    Char,
    /// `money`: a signed 64-bit count of cents.
    Money,
    /// `pg_lsn`: an unsigned 64-bit WAL position.
    PgLsn,
}

impl KeyKind {
    /// The kind for a built-in type OID (`pg_type.oid`), or `None` when the
    /// proxy cannot order that type exactly and must refuse to merge by it.
    pub fn from_oid(oid: u32) -> Option<KeyKind> {
        // OIDs of built-in types are fixed in pg_type.dat; extension types
        // (citext, ...) get OIDs at install time and are never listed here.
        let kind = match oid {
            16 => KeyKind::Bool,
            17 => KeyKind::Bytea,
            18 => KeyKind::Char,
            19 | 25 | 1043 => KeyKind::Text,
            20 => KeyKind::Int8,
            21 => KeyKind::Int2,
            23 => KeyKind::Int4,
            26 => KeyKind::Oid,
            700 => KeyKind::Float4,
            701 => KeyKind::Float8,
            790 => KeyKind::Money,
            1042 => KeyKind::Bpchar,
            1082 => KeyKind::Date,
            1083 => KeyKind::Time,
            1114 => KeyKind::Timestamp,
            1184 => KeyKind::Timestamptz,
            1186 => KeyKind::Interval,
            1266 => KeyKind::TimeTz,
            1700 => KeyKind::Numeric,
            2950 => KeyKind::Uuid,
            3220 => KeyKind::PgLsn,
            _ => return None,
        };
        Some(kind)
    }

    /// Whether values of this kind are ordered by a collation, so the
    /// caller must check the key's collation with `collation_is_bytewise`.
    pub fn collatable(self) -> bool {
        matches!(self, KeyKind::Text | KeyKind::Bpchar)
    }

    /// The SQL name of the kind, for messages.
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyKind::Int2 => "smallint",
            KeyKind::Int4 => "integer",
            KeyKind::Int8 => "bigint",
            KeyKind::Oid => "oid",
            KeyKind::Float4 => "real",
            KeyKind::Float8 => "double precision",
            KeyKind::Numeric => "numeric",
            KeyKind::Bool => "boolean",
            KeyKind::Date => "date",
            KeyKind::Time => "time",
            KeyKind::TimeTz => "time with time zone",
            KeyKind::Timestamp => "timestamp",
            KeyKind::Timestamptz => "timestamp with time zone",
            KeyKind::Interval => "interval",
            KeyKind::Uuid => "uuid",
            KeyKind::Bytea => "bytea",
            KeyKind::Text => "text",
            KeyKind::Bpchar => "character",
            KeyKind::Char => "\"char\"",
            KeyKind::Money => "money",
            KeyKind::PgLsn => "pg_lsn",
        }
    }
}

/// How one ORDER BY key orders its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortSpec {
    pub kind: KeyKind,
    pub descending: bool,
    pub nulls_first: bool,
}

impl SortSpec {
    /// The spec of `ORDER BY key [DESC]` without a NULLS clause: Postgres
    /// puts NULLs last ascending and first descending (NULL sorts as larger
    /// than every value).
    pub fn with_default_nulls(kind: KeyKind, descending: bool) -> SortSpec {
        SortSpec {
            kind,
            descending,
            nulls_first: descending,
        }
    }
}

/// A sort key value the proxy cannot read (wrong length, impossible field):
/// the merge cannot go on and the statement must fail with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl KeyError {
    pub(super) fn malformed(kind: KeyKind, problem: &str) -> KeyError {
        KeyError(format!(
            "a server sent a malformed binary {} sort key ({problem}); the rows cannot be \
             merged in order. Check that every server runs Postgres 15 and that the column's \
             type is the same on all of them",
            kind.sql_name()
        ))
    }
}

/// Compares two binary values (None = SQL NULL) as Postgres's ORDER BY would
/// with this spec. Both values are checked even when one is NULL, so a
/// malformed value is reported whatever it is compared with.
pub fn compare(
    spec: &SortSpec,
    a: Option<&[u8]>,
    b: Option<&[u8]>,
) -> Result<Ordering, KeyError> {
    let a = a.map(|raw| Key::decode(spec.kind, raw)).transpose()?;
    let b = b.map(|raw| Key::decode(spec.kind, raw)).transpose()?;
    let null_before_value = if spec.nulls_first {
        Ordering::Less
    } else {
        Ordering::Greater
    };
    Ok(match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => null_before_value,
        (Some(_), None) => null_before_value.reverse(),
        (Some(a), Some(b)) => {
            let ascending = a.order(&b);
            if spec.descending {
                ascending.reverse()
            } else {
                ascending
            }
        }
    })
}

/// A decoded non-NULL value, in a form whose natural order is Postgres's.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    /// Integer-like kinds; the second integer breaks ties and is zero for
    /// every kind but `timetz` (whose equal instants order by zone).
    Ordinal(i128, i128),
    /// Both float kinds (float4 widens to f64 exactly, keeping its order).
    Float(f64),
    Numeric(Numeric<'a>),
    /// Compared as bytes, then by length (memcmp then shorter first).
    Bytes(&'a [u8]),
}

impl<'a> Key<'a> {
    fn decode(kind: KeyKind, raw: &'a [u8]) -> Result<Key<'a>, KeyError> {
        let ordinal = |value: i128| Key::Ordinal(value, 0);
        Ok(match kind {
            KeyKind::Int2 => ordinal(i16::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::Int4 | KeyKind::Date => ordinal(i32::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::Int8
            | KeyKind::Time
            | KeyKind::Timestamp
            | KeyKind::Timestamptz
            | KeyKind::Money => ordinal(i64::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::Oid => ordinal(u32::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::PgLsn => ordinal(u64::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::Char => ordinal(u8::from_be_bytes(fixed(kind, raw)?).into()),
            // boolrecv takes any non-zero byte as true.
            KeyKind::Bool => ordinal(i128::from(fixed::<1>(kind, raw)?[0] != 0)),
            KeyKind::TimeTz => {
                let bytes: [u8; 12] = fixed(kind, raw)?;
                let time = i64::from_be_bytes(read(kind, &bytes, 0)?);
                let zone = i32::from_be_bytes(read(kind, &bytes, 8)?);
                // The zone is seconds west of UTC, so adding it gives UTC.
                let instant = i128::from(time) + i128::from(zone) * 1_000_000;
                Key::Ordinal(instant, zone.into())
            }
            KeyKind::Interval => {
                let bytes: [u8; 16] = fixed(kind, raw)?;
                let time = i64::from_be_bytes(read(kind, &bytes, 0)?);
                let days = i32::from_be_bytes(read(kind, &bytes, 8)?);
                let months = i32::from_be_bytes(read(kind, &bytes, 12)?);
                // interval_cmp_value: a month is 30 days and a day 24 hours,
                // so '1 month' = '30 days' = '29 days 24 hours'.
                let days = i128::from(months) * 30 + i128::from(days);
                ordinal(i128::from(time) + days * 86_400_000_000)
            }
            KeyKind::Float4 => Key::Float(f32::from_be_bytes(fixed(kind, raw)?).into()),
            KeyKind::Float8 => Key::Float(f64::from_be_bytes(fixed(kind, raw)?)),
            KeyKind::Numeric => Key::Numeric(numeric::decode(raw)?),
            KeyKind::Uuid => {
                fixed::<16>(kind, raw)?;
                Key::Bytes(raw)
            }
            KeyKind::Bytea | KeyKind::Text => Key::Bytes(raw),
            // bcTruelen strips only ASCII spaces, not tabs or other blanks.
            KeyKind::Bpchar => {
                let kept = raw.iter().rposition(|&b| b != b' ').map_or(0, |at| at + 1);
                Key::Bytes(&raw[..kept])
            }
        })
    }

    /// Ascending order of two values of the same kind.
    fn order(&self, other: &Key<'_>) -> Ordering {
        match (self, other) {
            (Key::Ordinal(a, a_tie), Key::Ordinal(b, b_tie)) => (a, a_tie).cmp(&(b, b_tie)),
            (Key::Float(a), Key::Float(b)) => float_order(*a, *b),
            (Key::Numeric(a), Key::Numeric(b)) => numeric::order(a, b),
            (Key::Bytes(a), Key::Bytes(b)) => a.cmp(b),
            // Both sides come from one SortSpec, so the kinds always match;
            // ordering by variant keeps this total without a panic.
            _ => self.variant_rank().cmp(&other.variant_rank()),
        }
    }

    fn variant_rank(&self) -> u8 {
        match self {
            Key::Ordinal(..) => 0,
            Key::Float(_) => 1,
            Key::Numeric(_) => 2,
            Key::Bytes(_) => 3,
        }
    }
}

/// float8_cmp_internal: NaN equals NaN and sorts above +Infinity; -0 = 0.
fn float_order(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) if a < b => Ordering::Less,
        (false, false) if a > b => Ordering::Greater,
        (false, false) => Ordering::Equal,
    }
}

/// The whole value as an array of exactly N bytes.
fn fixed<const N: usize>(kind: KeyKind, raw: &[u8]) -> Result<[u8; N], KeyError> {
    raw.try_into().map_err(|_| {
        KeyError::malformed(
            kind,
            &format!("{} bytes where the type has {N}", raw.len()),
        )
    })
}

/// N bytes at `at`, checked against the slice's length.
fn read<const N: usize>(kind: KeyKind, bytes: &[u8], at: usize) -> Result<[u8; N], KeyError> {
    bytes
        .get(at..at + N)
        .and_then(|field| field.try_into().ok())
        .ok_or_else(|| short(kind))
}

fn short(kind: KeyKind) -> KeyError {
    KeyError::malformed(kind, "a field runs past the value's end")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ascending(kind: KeyKind) -> SortSpec {
        SortSpec {
            kind,
            descending: false,
            nulls_first: false,
        }
    }

    fn order(kind: KeyKind, a: &[u8], b: &[u8]) -> Ordering {
        compare(&ascending(kind), Some(a), Some(b)).expect("well-formed values")
    }

    fn f8(value: f64) -> [u8; 8] {
        value.to_be_bytes()
    }

    fn interval(time: i64, days: i32, months: i32) -> Vec<u8> {
        [&time.to_be_bytes()[..], &days.to_be_bytes(), &months.to_be_bytes()].concat()
    }

    fn timetz(time: i64, zone: i32) -> Vec<u8> {
        [&time.to_be_bytes()[..], &zone.to_be_bytes()].concat()
    }

    #[test]
    fn floats_put_nan_above_infinity_and_equate_signed_zeros() {
        let k = KeyKind::Float8;
        assert_eq!(order(k, &f8(f64::NAN), &f8(f64::INFINITY)), Ordering::Greater);
        assert_eq!(order(k, &f8(f64::NAN), &f8(-f64::NAN)), Ordering::Equal);
        assert_eq!(order(k, &f8(-0.0), &f8(0.0)), Ordering::Equal);
        assert_eq!(order(k, &f8(f64::NEG_INFINITY), &f8(f64::MIN)), Ordering::Less);
        let f4 = |v: f32| v.to_be_bytes();
        let k = KeyKind::Float4;
        assert_eq!(order(k, &f4(f32::NAN), &f4(f32::INFINITY)), Ordering::Greater);
        assert_eq!(order(k, &f4(f32::MIN_POSITIVE / 2.0), &f4(0.0)), Ordering::Greater);
    }

    #[test]
    fn integers_compare_signed_and_oids_and_lsns_unsigned() {
        assert_eq!(
            order(KeyKind::Int4, &(-1i32).to_be_bytes(), &0i32.to_be_bytes()),
            Ordering::Less
        );
        assert_eq!(
            order(KeyKind::Oid, &u32::MAX.to_be_bytes(), &0u32.to_be_bytes()),
            Ordering::Greater
        );
        assert_eq!(
            order(KeyKind::PgLsn, &u64::MAX.to_be_bytes(), &1u64.to_be_bytes()),
            Ordering::Greater
        );
        assert_eq!(order(KeyKind::Char, &[0x80], &[0x7f]), Ordering::Greater);
        assert_eq!(order(KeyKind::Bool, &[0], &[1]), Ordering::Less);
        assert_eq!(order(KeyKind::Bool, &[2], &[1]), Ordering::Equal);
    }

    #[test]
    fn intervals_count_a_month_as_thirty_days_of_twenty_four_hours() {
        let k = KeyKind::Interval;
        let day = 86_400_000_000i64;
        assert_eq!(order(k, &interval(0, 0, 1), &interval(0, 30, 0)), Ordering::Equal);
        assert_eq!(order(k, &interval(0, 30, 0), &interval(day, 29, 0)), Ordering::Equal);
        assert_eq!(order(k, &interval(0, 0, 1), &interval(1, 30, 0)), Ordering::Less);
        // Extremes of every field still compare without overflow.
        let top = interval(i64::MAX, i32::MAX, i32::MAX);
        let bottom = interval(i64::MIN, i32::MIN, i32::MIN);
        assert_eq!(order(k, &bottom, &top), Ordering::Less);
    }

    #[test]
    fn timetz_orders_by_instant_then_zone() {
        let k = KeyKind::TimeTz;
        let hour = 3_600_000_000i64;
        // 13:00+01 (zone -3600 west) and 12:00+00 are the same instant.
        let noon_utc = timetz(12 * hour, 0);
        let one_pm_plus_one = timetz(13 * hour, -3600);
        assert_eq!(order(k, &one_pm_plus_one, &noon_utc), Ordering::Less);
        assert_eq!(order(k, &timetz(11 * hour, 0), &one_pm_plus_one), Ordering::Less);
    }

    #[test]
    fn bpchar_ignores_only_trailing_spaces() {
        let k = KeyKind::Bpchar;
        assert_eq!(order(k, b"a  ", b"a"), Ordering::Equal);
        assert_eq!(order(k, b"   ", b""), Ordering::Equal);
        assert_eq!(order(k, b"a\t", b"a"), Ordering::Greater);
        assert_eq!(order(k, b" a", b"a"), Ordering::Less);
    }

    #[test]
    fn bytes_compare_bytewise_then_shorter_first() {
        assert_eq!(order(KeyKind::Bytea, b"ab", b"abc"), Ordering::Less);
        assert_eq!(order(KeyKind::Bytea, &[0xff], &[0x00, 0x00]), Ordering::Greater);
        assert_eq!(order(KeyKind::Text, "é".as_bytes(), b"z"), Ordering::Greater);
        assert_eq!(order(KeyKind::Uuid, &[0xff; 16], &[0; 16]), Ordering::Greater);
    }

    #[test]
    fn direction_and_null_placement_follow_the_spec() {
        let one = 1i32.to_be_bytes();
        let two = 2i32.to_be_bytes();
        let spec = |descending, nulls_first| SortSpec {
            kind: KeyKind::Int4,
            descending,
            nulls_first,
        };
        let cases = [
            (spec(false, false), Some(&one[..]), Some(&two[..]), Ordering::Less),
            (spec(true, false), Some(&one[..]), Some(&two[..]), Ordering::Greater),
            (spec(false, false), None, Some(&two[..]), Ordering::Greater),
            (spec(false, true), None, Some(&two[..]), Ordering::Less),
            (spec(true, true), Some(&one[..]), None, Ordering::Greater),
            (spec(true, false), Some(&one[..]), None, Ordering::Less),
            (spec(true, true), None, None, Ordering::Equal),
        ];
        for (spec, a, b, expected) in cases {
            assert_eq!(compare(&spec, a, b), Ok(expected), "{spec:?} {a:?} {b:?}");
        }
        assert!(SortSpec::with_default_nulls(KeyKind::Int4, true).nulls_first);
        assert!(!SortSpec::with_default_nulls(KeyKind::Int4, false).nulls_first);
    }

    #[test]
    fn wrong_lengths_are_errors_even_against_null() {
        let kinds = [
            (KeyKind::Int2, 2),
            (KeyKind::Int4, 4),
            (KeyKind::Int8, 8),
            (KeyKind::Oid, 4),
            (KeyKind::Float4, 4),
            (KeyKind::Float8, 8),
            (KeyKind::Bool, 1),
            (KeyKind::Char, 1),
            (KeyKind::Date, 4),
            (KeyKind::Time, 8),
            (KeyKind::TimeTz, 12),
            (KeyKind::Timestamp, 8),
            (KeyKind::Timestamptz, 8),
            (KeyKind::Interval, 16),
            (KeyKind::Uuid, 16),
            (KeyKind::Money, 8),
            (KeyKind::PgLsn, 8),
        ];
        for (kind, size) in kinds {
            let spec = ascending(kind);
            let good = vec![0u8; size];
            for bad_size in [0, size - 1, size + 1] {
                let bad = vec![0u8; bad_size];
                let error = compare(&spec, Some(&bad), None)
                    .expect_err("a wrong length is refused");
                assert!(error.0.contains(kind.sql_name()), "{error}");
                assert!(compare(&spec, Some(&good), Some(&bad)).is_err(), "{kind:?}");
            }
            assert_eq!(compare(&spec, Some(&good), Some(&good)), Ok(Ordering::Equal));
        }
    }

    #[test]
    fn oids_map_to_kinds_and_collatability() {
        assert_eq!(KeyKind::from_oid(25), Some(KeyKind::Text));
        assert_eq!(KeyKind::from_oid(19), Some(KeyKind::Text));
        assert_eq!(KeyKind::from_oid(1043), Some(KeyKind::Text));
        assert_eq!(KeyKind::from_oid(1042), Some(KeyKind::Bpchar));
        assert_eq!(KeyKind::from_oid(1700), Some(KeyKind::Numeric));
        // jsonb, inet, arrays: orders the proxy does not reproduce.
        for refused in [3802, 869, 1007, 0, u32::MAX] {
            assert_eq!(KeyKind::from_oid(refused), None, "oid {refused}");
        }
        assert!(KeyKind::Text.collatable() && KeyKind::Bpchar.collatable());
        assert!(!KeyKind::Char.collatable() && !KeyKind::Bytea.collatable());
    }
}
