//! Embedded ids: 64-bit ids that carry their logical partition, so a photo id
//! routes to its owner's partition without a lookup.
//!
//! Layout, most significant bit first, for a cluster of `P = 2^b` partitions:
//!
//! ```text
//! | 0 (sign) | partition: b bits | milliseconds since 2025-01-01: 41 bits | node + sequence: 22-b bits |
//! ```
//!
//! The partition sits right under the sign bit (unlike Instagram's ids, which
//! put time first) so that every partition owns one contiguous id range:
//! partition `p` is exactly `[p << (63-b), (p+1) << (63-b))`. Each leaf of a
//! table keyed by embedded ids is then a plain range leaf
//! `FOR VALUES FROM (p << (63-b)) TO ((p+1) << (63-b))` (the last one `TO (MAXVALUE)`,
//! since `P << (63-b)` overflows bigint) and Postgres prunes `WHERE id = $1` to
//! one leaf. Ids stay positive, are unique per (node, millisecond, sequence),
//! and sort by time within a partition. 41 bits of milliseconds last until 2094.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::keys::KeyError;

/// Unix time, in milliseconds, of the id epoch (2025-01-01T00:00:00Z).
pub const ID_EPOCH_UNIX_MS: u64 = 1_735_689_600_000;
/// Bits of the timestamp field.
pub const TIME_BITS: u32 = 41;
/// Bits the 63 usable bits leave for the partition and the low field together.
const PARTITION_AND_LOW_BITS: u32 = 63 - TIME_BITS;
/// The largest partition count whose ids keep at least 8 low bits
/// (256 ids per millisecond per node).
pub const MAX_EMBEDDED_PARTITIONS: u32 = 1 << 14;

/// Bit layout of embedded ids for one partition count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdLayout {
    partition_bits: u32,
}

impl IdLayout {
    /// Layout for a cluster of `partitions` logical partitions (a power of two,
    /// at most [`MAX_EMBEDDED_PARTITIONS`]).
    pub fn new(partitions: u32) -> Option<IdLayout> {
        if !partitions.is_power_of_two() || partitions > MAX_EMBEDDED_PARTITIONS {
            return None;
        }
        Some(IdLayout {
            partition_bits: partitions.trailing_zeros(),
        })
    }

    /// Position of the lowest partition bit.
    pub fn partition_shift(&self) -> u32 {
        63 - self.partition_bits
    }

    /// Bits below the timestamp (node id plus per-millisecond sequence).
    pub fn low_bits(&self) -> u32 {
        PARTITION_AND_LOW_BITS - self.partition_bits
    }

    fn partitions(&self) -> u64 {
        1u64 << self.partition_bits
    }

    /// The partition an id belongs to.
    pub fn partition_of(&self, id: i64) -> Result<u32, KeyError> {
        if id < 0 {
            return Err(KeyError::NotEmbeddedId { id });
        }
        // A non-negative i64 shifted right by at least 49 bits fits in u32.
        Ok(((id as u64) >> self.partition_shift()) as u32)
    }

    /// The id range of partition `p`: `[from, to)`, `to = None` meaning
    /// MAXVALUE; `None` if `p` is not a partition of this layout.
    pub fn partition_bounds(&self, partition: u32) -> Option<(i64, Option<i64>)> {
        if u64::from(partition) >= self.partitions() {
            return None;
        }
        let shift = self.partition_shift();
        let from = (u64::from(partition) << shift) as i64;
        let next = u64::from(partition) + 1;
        let to = (next < self.partitions()).then(|| (next << shift) as i64);
        Some((from, to))
    }

    /// Builds an id from its fields; `low` is truncated to the low field.
    pub fn compose(&self, partition: u32, millis_since_epoch: u64, low: u64) -> i64 {
        let time_mask = (1u64 << TIME_BITS) - 1;
        let low_mask = (1u64 << self.low_bits()) - 1;
        let partition_mask = self.partitions() - 1;
        let id = ((u64::from(partition) & partition_mask) << self.partition_shift())
            | ((millis_since_epoch & time_mask) << self.low_bits())
            | (low & low_mask);
        id as i64
    }

    /// Milliseconds since the id epoch stored in an id.
    pub fn millis_of(&self, id: i64) -> u64 {
        ((id as u64) >> self.low_bits()) & ((1u64 << TIME_BITS) - 1)
    }
}

/// Makes unique embedded ids for one node.
///
/// Ids from two generators are distinct when their `node` numbers differ;
/// within a generator, ids are strictly increasing per partition even when the
/// wall clock steps back (the generator then keeps using its last millisecond).
#[derive(Debug)]
pub struct IdGenerator {
    layout: IdLayout,
    node: u64,
    node_bits: u32,
    state: Mutex<GeneratorState>,
}

#[derive(Debug, Default)]
struct GeneratorState {
    last_millis: u64,
    sequence: u64,
}

impl IdGenerator {
    /// A generator for a single node (all low bits are sequence).
    pub fn new(layout: IdLayout) -> IdGenerator {
        IdGenerator {
            layout,
            node: 0,
            node_bits: 0,
            state: Mutex::new(GeneratorState::default()),
        }
    }

    /// A generator for node `node` out of `2^node_bits` nodes; at least 4 low bits
    /// must remain for the sequence.
    pub fn with_node(layout: IdLayout, node: u64, node_bits: u32) -> Option<IdGenerator> {
        if node_bits + 4 > layout.low_bits() || node >= (1u64 << node_bits) {
            return None;
        }
        Some(IdGenerator {
            layout,
            node,
            node_bits,
            state: Mutex::new(GeneratorState::default()),
        })
    }

    fn sequence_bits(&self) -> u32 {
        self.layout.low_bits() - self.node_bits
    }

    /// A new id in `partition`, or `None` if the layout has no such partition.
    pub fn next_id(&self, partition: u32) -> Option<i64> {
        if u64::from(partition) >= self.layout.partitions() {
            return None;
        }
        let max_sequence = (1u64 << self.sequence_bits()) - 1;
        let now = now_millis_since_epoch();
        // A poisoned lock only means another thread panicked mid-update of two
        // integers; the values are still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now > state.last_millis {
            state.last_millis = now;
            state.sequence = 0;
        } else if state.sequence < max_sequence {
            state.sequence += 1;
        } else {
            // Sequence exhausted in this millisecond (or the clock stepped
            // back): borrow the next millisecond instead of waiting, so ids
            // stay unique and increasing and no thread blocks.
            state.last_millis += 1;
            state.sequence = 0;
        }
        let low = (self.node << self.sequence_bits()) | state.sequence;
        Some(self.layout.compose(partition, state.last_millis, low))
    }
}

fn now_millis_since_epoch() -> u64 {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    unix_ms.saturating_sub(ID_EPOCH_UNIX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_partition() {
        let layout = IdLayout::new(1024).expect("valid layout");
        let generator = IdGenerator::new(layout);
        for partition in [0, 1, 17, 511, 1023] {
            let id = generator.next_id(partition).expect("valid partition");
            assert!(id > 0 || partition == 0);
            assert_eq!(layout.partition_of(id), Ok(partition));
            let (from, to) = layout.partition_bounds(partition).expect("valid partition");
            assert!(
                id >= from && to.is_none_or(|to| id < to),
                "{id} outside its partition range"
            );
        }
    }

    #[test]
    fn bounds_tile_the_positive_range() {
        let layout = IdLayout::new(8).expect("valid layout");
        let bounds = |p| layout.partition_bounds(p).expect("valid partition");
        assert_eq!(bounds(0).0, 0);
        for p in 0..7 {
            assert_eq!(bounds(p).1, Some(bounds(p + 1).0));
        }
        assert_eq!(bounds(7).1, None);
        assert_eq!(layout.partition_bounds(8), None);
        assert_eq!(layout.partition_of(i64::MAX), Ok(7));
    }

    #[test]
    fn ids_are_unique_and_increasing() {
        let layout = IdLayout::new(16384).expect("valid layout");
        let generator = IdGenerator::new(layout);
        let mut last = -1;
        for _ in 0..20_000 {
            let id = generator.next_id(5).expect("valid partition");
            assert!(id > last);
            last = id;
        }
        assert_eq!(generator.next_id(16384), None);
    }

    #[test]
    fn nodes_do_not_collide() {
        let layout = IdLayout::new(1024).expect("valid layout");
        let a = IdGenerator::with_node(layout, 0, 2).expect("node 0");
        let b = IdGenerator::with_node(layout, 1, 2).expect("node 1");
        let ids_a: std::collections::HashSet<i64> =
            (0..5000).filter_map(|_| a.next_id(3)).collect();
        assert_eq!(ids_a.len(), 5000);
        assert!((0..5000)
            .filter_map(|_| b.next_id(3))
            .all(|id| !ids_a.contains(&id)));
        assert!(IdGenerator::with_node(layout, 4, 2).is_none());
    }

    #[test]
    fn negative_ids_are_refused_and_big_clusters_have_no_layout() {
        let layout = IdLayout::new(64).expect("valid layout");
        assert!(layout.partition_of(-1).is_err());
        assert!(IdLayout::new(1 << 15).is_none());
        assert!(IdLayout::new(100).is_none());
    }
}
