//! Postgres's own hash-partitioning function, reimplemented bit for bit.
//!
//! A row goes to the leaf `FOR VALUES WITH (MODULUS m, REMAINDER r)` where
//! `r = row_hash % m`, and `row_hash` is built from the type's "extended" hash
//! support function (Bob Jenkins' lookup3, as in `src/common/hashfn.c`) seeded
//! with `HASH_PARTITION_SEED` and folded with `hash_combine64`. Matching it
//! exactly is what lets the proxy and Postgres agree on every row's partition;
//! the integration test `hash_agreement` checks it against a real server.
//!
//! Postgres's byte-reading code has big- and little-endian variants that give
//! different hashes; the servers we target are little-endian (x86_64, aarch64),
//! and this module implements that variant.

/// Seed Postgres passes to every partition hash support function.
const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// Initial value of lookup3's internal state, before the length is added.
const LOOKUP3_INIT: u32 = 0x9e37_79b9u32.wrapping_add(3_923_095);

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

#[inline]
fn seed_state(a: &mut u32, b: &mut u32, c: &mut u32, seed: u64) {
    // The seed is hashed as if it were a 12-byte chunk padded with zeroes.
    if seed != 0 {
        *a = a.wrapping_add((seed >> 32) as u32);
        *b = b.wrapping_add(seed as u32);
        mix(a, b, c);
    }
}

/// Reads up to four bytes as a little-endian word, the way the tail switch
/// of `hash_bytes_extended` adds them.
#[inline]
fn le_word(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &byte)| acc | (u32::from(byte) << (8 * i)))
}

/// `hash_bytes_extended`: 64-bit lookup3 of a byte string with a seed.
pub fn hash_bytes_extended(key: &[u8], seed: u64) -> u64 {
    // Postgres computes the initial state from an `int` length truncated to
    // uint32; keys longer than 4 GiB cannot exist in a Postgres datum anyway.
    let init = LOOKUP3_INIT.wrapping_add(key.len() as u32);
    let (mut a, mut b, mut c) = (init, init, init);
    seed_state(&mut a, &mut b, &mut c, seed);

    let mut chunks = key.chunks_exact(12);
    for chunk in &mut chunks {
        a = a.wrapping_add(le_word(&chunk[0..4]));
        b = b.wrapping_add(le_word(&chunk[4..8]));
        c = c.wrapping_add(le_word(&chunk[8..12]));
        mix(&mut a, &mut b, &mut c);
    }
    let tail = chunks.remainder();
    // The lowest byte of c is reserved for the length, so the bytes 8..11 of
    // the tail go one byte up.
    a = a.wrapping_add(le_word(&tail[..tail.len().min(4)]));
    if tail.len() > 4 {
        b = b.wrapping_add(le_word(&tail[4..tail.len().min(8)]));
    }
    if tail.len() > 8 {
        c = c.wrapping_add(le_word(&tail[8..]) << 8);
    }
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_bytes_uint32_extended`: 64-bit lookup3 of one 32-bit word with a seed.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = LOOKUP3_INIT.wrapping_add(4);
    let (mut a, mut b, mut c) = (init, init, init);
    seed_state(&mut a, &mut b, &mut c, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

/// `hash_combine64`: how Postgres folds one column's hash into the row hash.
#[inline]
fn hash_combine64(mut a: u64, b: u64) -> u64 {
    a ^= b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7);
    a
}

/// Row hash of a single-column partition key whose column hash is `column_hash`.
#[inline]
fn row_hash(column_hash: u64) -> u64 {
    hash_combine64(0, column_hash)
}

/// `hashint8extended` with the partition seed, folded into a row hash.
pub fn row_hash_int8(value: i64) -> u64 {
    // Postgres hashes an int8 so that values that fit in int4 hash like int4:
    // the high half is folded into the low half (complemented when negative).
    let low = value as u32;
    let high = (value >> 32) as u32;
    let folded = if value >= 0 { low ^ high } else { low ^ !high };
    row_hash(hash_uint32_extended(folded, HASH_PARTITION_SEED))
}

/// `hashint4extended` with the partition seed, folded into a row hash.
pub fn row_hash_int4(value: i32) -> u64 {
    row_hash(hash_uint32_extended(value as u32, HASH_PARTITION_SEED))
}

/// `hashint2extended` with the partition seed, folded into a row hash.
pub fn row_hash_int2(value: i16) -> u64 {
    row_hash(hash_uint32_extended(
        i32::from(value) as u32,
        HASH_PARTITION_SEED,
    ))
}

/// `hashtextextended` (deterministic collation: the UTF-8 bytes) with the
/// partition seed, folded into a row hash.
pub fn row_hash_text(value: &str) -> u64 {
    row_hash(hash_bytes_extended(value.as_bytes(), HASH_PARTITION_SEED))
}

/// `uuid_hash_extended` (the 16 raw bytes) with the partition seed, folded
/// into a row hash.
pub fn row_hash_uuid(value: &uuid::Uuid) -> u64 {
    row_hash(hash_bytes_extended(value.as_bytes(), HASH_PARTITION_SEED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_and_int4_agree_on_int4_range() {
        for v in [-5_i32, -1, 0, 1, 2, 17, i32::MIN, i32::MAX] {
            assert_eq!(row_hash_int8(i64::from(v)), row_hash_int4(v), "value {v}");
        }
    }

    #[test]
    fn int2_agrees_with_int4() {
        for v in [-300_i16, -1, 0, 1, 300, i16::MIN, i16::MAX] {
            assert_eq!(row_hash_int2(v), row_hash_int4(i32::from(v)));
        }
    }

    #[test]
    fn uint32_helper_matches_byte_hash_of_its_le_bytes() {
        // Postgres documents hash_bytes_uint32 as equal to hashing the four
        // bytes of the word; the extended variants keep that property.
        for k in [0u32, 1, 0xdead_beef, u32::MAX] {
            for seed in [0u64, HASH_PARTITION_SEED, 42] {
                assert_eq!(
                    hash_uint32_extended(k, seed),
                    hash_bytes_extended(&k.to_le_bytes(), seed)
                );
            }
        }
    }

    #[test]
    fn every_tail_length_is_distinct() {
        let data: Vec<u8> = (0u8..40).collect();
        let hashes: std::collections::HashSet<u64> = (0..=data.len())
            .map(|n| hash_bytes_extended(&data[..n], HASH_PARTITION_SEED))
            .collect();
        assert_eq!(hashes.len(), data.len() + 1);
    }
}
