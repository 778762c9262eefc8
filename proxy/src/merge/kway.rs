//! Choosing the next row of a k-way merge: each server's stream is already
//! sorted, so the merged output's next row is the head that comes first
//! under the statement's ORDER BY keys.
//!
//! A linear scan over the heads: k is at most 64 servers, each comparison
//! is a few integer or byte compares, and a scan needs no state between
//! rows, so the session can replace, drop or refill any stream's head in
//! any order without telling the merge.

use std::cmp::Ordering;

use super::sortkey::{compare, KeyError, SortSpec};

/// The ORDER BY of a merged statement: one spec per key, most significant
/// first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KWayMerge {
    specs: Vec<SortSpec>,
}

impl KWayMerge {
    pub fn new(specs: Vec<SortSpec>) -> KWayMerge {
        KWayMerge { specs }
    }

    pub fn specs(&self) -> &[SortSpec] {
        &self.specs
    }

    /// Orders two rows by their key values (binary, None = NULL), key by key.
    pub fn compare_rows(
        &self,
        a: &[Option<&[u8]>],
        b: &[Option<&[u8]>],
    ) -> Result<Ordering, KeyError> {
        for row in [a, b] {
            if row.len() != self.specs.len() {
                return Err(KeyError(format!(
                    "a row carries {} sort keys where the ORDER BY has {}; the proxy built \
                     the servers' statement wrongly, so report this to the shardline developers",
                    row.len(),
                    self.specs.len()
                )));
            }
        }
        for ((spec, a), b) in self.specs.iter().zip(a).zip(b) {
            let by_key = compare(spec, *a, *b)?;
            if by_key != Ordering::Equal {
                return Ok(by_key);
            }
        }
        Ok(Ordering::Equal)
    }

    /// The index of the stream whose head row comes first; `heads[i]` is
    /// stream i's head row's key values, or None when that stream has no
    /// row now. Ties go to the lowest index, so the merge is stable. None
    /// when no stream has a row. A head is checked only when it is compared:
    /// a lone head is returned unread.
    pub fn first(&self, heads: &[Option<&[Option<&[u8]>]>]) -> Result<Option<usize>, KeyError> {
        let mut best: Option<(usize, &[Option<&[u8]>])> = None;
        for (index, head) in heads.iter().enumerate() {
            let Some(head) = *head else { continue };
            best = match best {
                Some((_, leader)) if self.compare_rows(head, leader)? != Ordering::Less => best,
                _ => Some((index, head)),
            };
        }
        Ok(best.map(|(index, _)| index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::KeyKind;

    fn spec(kind: KeyKind, descending: bool) -> SortSpec {
        SortSpec::with_default_nulls(kind, descending)
    }

    /// Merges `streams` (each sorted under `merge`) and returns the rows in
    /// merged order as (stream, position) pairs.
    fn merge_all(merge: &KWayMerge, streams: &[Vec<Vec<Option<Vec<u8>>>>]) -> Vec<(usize, usize)> {
        let mut positions = vec![0; streams.len()];
        let mut out = Vec::new();
        loop {
            let keys: Vec<Option<Vec<Option<&[u8]>>>> = streams
                .iter()
                .zip(&positions)
                .map(|(rows, &at)| {
                    rows.get(at)
                        .map(|row| row.iter().map(|key| key.as_deref()).collect())
                })
                .collect();
            let heads: Vec<Option<&[Option<&[u8]>]>> = keys.iter().map(|k| k.as_deref()).collect();
            match merge.first(&heads).expect("well-formed keys") {
                Some(stream) => {
                    out.push((stream, positions[stream]));
                    positions[stream] += 1;
                }
                None => return out,
            }
        }
    }

    #[test]
    fn merging_sorted_streams_gives_the_sorted_whole() {
        // Key 1: int4 descending (NULLs first); key 2: text ascending.
        let merge = KWayMerge::new(vec![spec(KeyKind::Int4, true), spec(KeyKind::Text, false)]);
        let row = |n: Option<i32>, t: &str| vec![n.map(|n| n.to_be_bytes().to_vec()), Some(t.into())];
        let streams = vec![
            vec![row(None, "b"), row(Some(5), "a"), row(Some(1), "z")],
            vec![row(None, "a"), row(Some(5), "b"), row(Some(5), "c"), row(Some(-3), "a")],
            vec![],
            vec![row(Some(7), "q"), row(Some(5), "a"), row(Some(1), "a")],
        ];
        let merged = merge_all(&merge, &streams);
        let rows: Vec<&Vec<Option<Vec<u8>>>> =
            merged.iter().map(|&(s, at)| &streams[s][at]).collect();
        assert_eq!(rows.len(), 10);
        let borrowed = |row: &[Option<Vec<u8>>]| -> Vec<Option<Vec<u8>>> { row.to_vec() };
        for pair in rows.windows(2) {
            let (a, b) = (borrowed(pair[0]), borrowed(pair[1]));
            let a: Vec<Option<&[u8]>> = a.iter().map(|k| k.as_deref()).collect();
            let b: Vec<Option<&[u8]>> = b.iter().map(|k| k.as_deref()).collect();
            assert_ne!(merge.compare_rows(&a, &b), Ok(Ordering::Greater), "{pair:?}");
        }
        // (5, "a") is on streams 0 and 3: the lower index goes first.
        let five_a: Vec<usize> = merged
            .iter()
            .filter(|&&(s, at)| streams[s][at] == row(Some(5), "a"))
            .map(|&(s, _)| s)
            .collect();
        assert_eq!(five_a, vec![0, 3]);
    }

    #[test]
    fn no_rows_means_no_stream() {
        let merge = KWayMerge::new(vec![spec(KeyKind::Int8, false)]);
        assert_eq!(merge.first(&[None, None]), Ok(None));
        assert_eq!(merge.first(&[]), Ok(None));
    }

    #[test]
    fn bad_keys_are_errors() {
        let merge = KWayMerge::new(vec![spec(KeyKind::Int8, false)]);
        let good = 1i64.to_be_bytes();
        let short = [0u8; 3];
        let one_key: &[Option<&[u8]>] = &[Some(&good)];
        let wrong_count: &[Option<&[u8]>] = &[Some(&good), None];
        let malformed: &[Option<&[u8]>] = &[Some(&short)];
        assert!(merge.first(&[Some(one_key), Some(wrong_count)]).is_err());
        assert!(merge.first(&[Some(malformed), Some(one_key)]).is_err());
        assert_eq!(merge.first(&[None, Some(one_key)]), Ok(Some(1)));
    }
}
