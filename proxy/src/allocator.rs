//! How the proxy's allocator (mimalloc, the binary's global allocator) gives
//! freed memory back to the system.
//!
//! A busy client holds read and write buffers and a request state; an idle
//! one gives them back (see `session::client`). When thousands of clients are
//! busy at once and then go idle, mimalloc 3 keeps their freed pages for a
//! second (its `purge_delay`, and ten times that for whole arena chunks), and
//! purges only when a thread allocates again. A proxy whose clients have gone
//! quiet allocates nothing, so the pages stayed resident: after 1,000
//! `pgbench -S` clients stopped beside 10,000 idle ones, the proxy kept 5 KB
//! per idle client instead of under 2 KB (docs/PERFORMANCE.md, "Memory per
//! idle client"). A 10 ms delay (mimalloc 2's default) returns that memory
//! while the burst winds down and still reuses pages within a burst.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the libmimalloc-sys
/// bindings do not name it).
const PURGE_DELAY: mi_option_t = 15;
/// mimalloc 3's default for `PURGE_DELAY`, in milliseconds: what the option
/// reads when the numbering above is right and nobody has set it.
const MIMALLOC_DEFAULT_PURGE_DELAY_MS: i64 = 1000;
/// The delay the proxy runs with, in milliseconds.
pub const PURGE_DELAY_MS: i64 = 10;

/// What [`purge_freed_memory_promptly`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeDelay {
    /// Set to [`PURGE_DELAY_MS`].
    Set,
    /// `MIMALLOC_PURGE_DELAY` is set in the environment: the operator's value stands.
    FromEnvironment,
    /// The option did not read mimalloc 3's default, so this build's mimalloc
    /// numbers its options otherwise: left alone rather than set another option.
    UnknownLayout(i64),
}

/// Lowers mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the
/// environment sets it. Call once, early in `main`.
pub fn purge_freed_memory_promptly() -> PurgeDelay {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return PurgeDelay::FromEnvironment;
    }
    // SAFETY: mi_option_get and mi_option_set read and write one integer
    // option of the allocator; mimalloc allows both at any time, from any thread.
    #[allow(clippy::useless_conversion)] // c_long is i32 on some targets
    let current = i64::from(unsafe { mi_option_get(PURGE_DELAY) });
    if current != MIMALLOC_DEFAULT_PURGE_DELAY_MS && current != PURGE_DELAY_MS {
        return PurgeDelay::UnknownLayout(current);
    }
    // SAFETY: as above.
    unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS as _) };
    PurgeDelay::Set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_set_where_mimalloc_keeps_it() {
        // The test binary links the same mimalloc as the proxy; the
        // environment of `cargo test` does not set MIMALLOC_PURGE_DELAY.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            assert_eq!(purge_freed_memory_promptly(), PurgeDelay::FromEnvironment);
            return;
        }
        assert_eq!(purge_freed_memory_promptly(), PurgeDelay::Set);
        // SAFETY: reads one integer option.
        #[allow(clippy::useless_conversion)] // c_long is i32 on some targets
        let now = i64::from(unsafe { mi_option_get(PURGE_DELAY) });
        assert_eq!(now, PURGE_DELAY_MS);
        // A second call finds its own value and keeps it.
        assert_eq!(purge_freed_memory_promptly(), PurgeDelay::Set);
    }
}
