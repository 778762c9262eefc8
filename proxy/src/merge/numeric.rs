//! Postgres's `numeric` in binary format (`numeric_send`), and its ORDER BY
//! order (`cmp_numerics` in src/backend/utils/adt/numeric.c): NaN equals NaN
//! and sorts above +Infinity, -Infinity below every finite value, and finite
//! values compare by value, so 1.0 = 1.00 whatever their display scales.
//!
//! The wire format: ndigits (int16), weight (int16), sign (uint16), dscale
//! (uint16), then ndigits base-10000 digits (int16 each, most significant
//! first); the value is the sum of digit[i] * 10000^(weight - i).

use std::cmp::Ordering;

use super::sortkey::{KeyError, KeyKind};

const POSITIVE: u16 = 0x0000;
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const POSITIVE_INFINITY: u16 = 0xD000;
const NEGATIVE_INFINITY: u16 = 0xF000;
/// numeric_recv refuses a display scale with bits outside this mask.
const DSCALE_MASK: u16 = 0x3FFF;
const BASE: u16 = 10_000;
const HEADER_BYTES: usize = 8;

/// A decoded numeric borrowing its digits from the received value. The
/// variants are declared in ascending order, which `order` relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Rank {
    NegativeInfinity,
    Finite,
    PositiveInfinity,
    NaN,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Numeric<'a> {
    rank: Rank,
    negative: bool,
    weight: i32,
    /// Big-endian int16 digits, each checked to be below 10000.
    digits: &'a [u8],
}

impl Numeric<'_> {
    fn digit_count(&self) -> usize {
        self.digits.len() / 2
    }

    fn digit(&self, index: usize) -> u16 {
        match self.digits.get(2 * index..2 * index + 2) {
            Some(&[high, low]) => u16::from_be_bytes([high, low]),
            // Indexes come from digit_count; a missing digit reads as zero.
            _ => 0,
        }
    }
}

/// Checks a binary numeric as numeric_recv does, and decodes it.
pub(super) fn decode(raw: &[u8]) -> Result<Numeric<'_>, KeyError> {
    let malformed = |problem: String| KeyError::malformed(KeyKind::Numeric, &problem);
    let header = raw
        .get(..HEADER_BYTES)
        .ok_or_else(|| malformed(format!("{} bytes, shorter than its 8-byte header", raw.len())))?;
    let field = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let declared_digits = i16::from_be_bytes([header[0], header[1]]);
    let weight = i16::from_be_bytes([header[2], header[3]]);
    let sign = field(4);
    let dscale = field(6);
    let digit_count = usize::try_from(declared_digits)
        .map_err(|_| malformed(format!("a negative digit count {declared_digits}")))?;
    let digits = &raw[HEADER_BYTES..];
    if digits.len() != 2 * digit_count {
        return Err(malformed(format!(
            "{digit_count} digits declared but {} bytes of digits sent",
            digits.len()
        )));
    }
    if dscale & !DSCALE_MASK != 0 {
        return Err(malformed(format!("an impossible display scale {dscale:#06x}")));
    }
    let (rank, negative) = match sign {
        POSITIVE => (Rank::Finite, false),
        NEGATIVE => (Rank::Finite, true),
        NAN => (Rank::NaN, false),
        POSITIVE_INFINITY => (Rank::PositiveInfinity, false),
        NEGATIVE_INFINITY => (Rank::NegativeInfinity, false),
        other => return Err(malformed(format!("an unknown sign {other:#06x}"))),
    };
    if let Some(bad) = digits
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .find(|&digit| digit >= BASE)
    {
        return Err(malformed(format!("a base-10000 digit {bad}")));
    }
    Ok(Numeric {
        rank,
        negative,
        weight: weight.into(),
        digits,
    })
}

/// Ascending order of two numerics, as cmp_numerics.
pub(super) fn order(a: &Numeric<'_>, b: &Numeric<'_>) -> Ordering {
    if a.rank != Rank::Finite || b.rank != Rank::Finite {
        return a.rank.cmp(&b.rank);
    }
    // cmp_var_common: a value without digits is zero whatever its sign.
    match (a.digit_count() == 0, b.digit_count() == 0) {
        (true, true) => Ordering::Equal,
        (true, false) if b.negative => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, true) if a.negative => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => match (a.negative, b.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => order_magnitudes(a, b),
            (true, true) => order_magnitudes(b, a),
        },
    }
}

/// cmp_abs_common: compares |a| and |b| digit by digit once their weights
/// line up; leading or trailing zero digits change nothing.
fn order_magnitudes(a: &Numeric<'_>, b: &Numeric<'_>) -> Ordering {
    let (mut a_at, mut b_at) = (0, 0);
    let (mut a_weight, mut b_weight) = (a.weight, b.weight);
    while a_weight > b_weight && a_at < a.digit_count() {
        if a.digit(a_at) != 0 {
            return Ordering::Greater;
        }
        a_at += 1;
        a_weight -= 1;
    }
    while b_weight > a_weight && b_at < b.digit_count() {
        if b.digit(b_at) != 0 {
            return Ordering::Less;
        }
        b_at += 1;
        b_weight -= 1;
    }
    if a_weight == b_weight {
        while a_at < a.digit_count() && b_at < b.digit_count() {
            let by_digit = a.digit(a_at).cmp(&b.digit(b_at));
            if by_digit != Ordering::Equal {
                return by_digit;
            }
            a_at += 1;
            b_at += 1;
        }
    }
    if (a_at..a.digit_count()).any(|at| a.digit(at) != 0) {
        return Ordering::Greater;
    }
    if (b_at..b.digit_count()).any(|at| b.digit(at) != 0) {
        return Ordering::Less;
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary form of a numeric, as numeric_send writes it.
    fn binary(sign: u16, weight: i16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        for digit in digits {
            out.extend_from_slice(&digit.to_be_bytes());
        }
        out
    }

    fn ordered(a: &[u8], b: &[u8]) -> Ordering {
        order(&decode(a).expect("valid a"), &decode(b).expect("valid b"))
    }

    #[test]
    fn scale_does_not_change_the_value() {
        // 1.0 (dscale 1) and 1.00 (dscale 2); 1 with a trailing zero digit.
        let one_point_zero = binary(POSITIVE, 0, 1, &[1]);
        let one_point_zero_zero = binary(POSITIVE, 0, 2, &[1]);
        let one_with_zero_digit = binary(POSITIVE, 0, 4, &[1, 0]);
        assert_eq!(ordered(&one_point_zero, &one_point_zero_zero), Ordering::Equal);
        assert_eq!(ordered(&one_point_zero, &one_with_zero_digit), Ordering::Equal);
    }

    #[test]
    fn weights_signs_and_zero() {
        let zero = binary(POSITIVE, 0, 0, &[]);
        let negative_zero_scale = binary(NEGATIVE, 0, 3, &[]);
        let ten_thousand = binary(POSITIVE, 1, 0, &[1]);
        let just_below = binary(POSITIVE, 0, 4, &[9999, 9999]);
        let tiny = binary(POSITIVE, -1, 4, &[1]); // 0.0001
        let minus_tiny = binary(NEGATIVE, -1, 4, &[1]);
        let minus_big = binary(NEGATIVE, 1, 0, &[1]);
        assert_eq!(ordered(&zero, &negative_zero_scale), Ordering::Equal);
        assert_eq!(ordered(&just_below, &ten_thousand), Ordering::Less);
        assert_eq!(ordered(&tiny, &zero), Ordering::Greater);
        assert_eq!(ordered(&minus_tiny, &zero), Ordering::Less);
        assert_eq!(ordered(&minus_big, &minus_tiny), Ordering::Less);
        assert_eq!(ordered(&tiny, &just_below), Ordering::Less);
        // A leading zero digit (never sent, but numeric_recv accepts it).
        let padded_ten_thousand = binary(POSITIVE, 2, 0, &[0, 1]);
        assert_eq!(ordered(&padded_ten_thousand, &ten_thousand), Ordering::Equal);
    }

    #[test]
    fn specials_order_around_finite_values() {
        let nan = binary(NAN, 0, 0, &[]);
        let plus_inf = binary(POSITIVE_INFINITY, 0, 0, &[]);
        let minus_inf = binary(NEGATIVE_INFINITY, 0, 0, &[]);
        let huge = binary(POSITIVE, 100, 0, &[9999]);
        let minus_huge = binary(NEGATIVE, 100, 0, &[9999]);
        assert_eq!(ordered(&nan, &plus_inf), Ordering::Greater);
        assert_eq!(ordered(&nan, &nan), Ordering::Equal);
        assert_eq!(ordered(&plus_inf, &huge), Ordering::Greater);
        assert_eq!(ordered(&minus_inf, &minus_huge), Ordering::Less);
        assert_eq!(ordered(&minus_inf, &minus_inf), Ordering::Equal);
    }

    #[test]
    fn malformed_values_are_refused() {
        let mut too_short = binary(POSITIVE, 0, 0, &[1, 2]);
        too_short.pop();
        let mut negative_count = binary(POSITIVE, 0, 0, &[]);
        negative_count[..2].copy_from_slice(&(-1i16).to_be_bytes());
        let cases = [
            ("header", vec![0u8; 7]),
            ("digits", too_short),
            ("extra", [binary(POSITIVE, 0, 0, &[1]), vec![0]].concat()),
            ("digit", binary(POSITIVE, 0, 0, &[10_000])),
            ("sign", binary(0x8000, 0, 0, &[1])),
            ("scale", binary(POSITIVE, 0, 0xC000, &[1])),
            ("count", negative_count),
        ];
        for (what, raw) in cases {
            let error = decode(&raw).expect_err(what);
            assert!(error.0.contains("numeric"), "{what}: {error}");
        }
    }
}
