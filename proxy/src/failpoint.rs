//! Crash points for the crash tests: with `SHARDLINE_FAILPOINT=<name>` in its
//! environment, the proxy aborts the process (no cleanup, no flush, as
//! `kill -9` would) when a two-phase commit reaches `<name>`.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Every crash point, in the order a two-phase commit passes them.
pub const POINTS: &[&str] = &[
    // One leg prepared, the others not yet.
    "2pc:after_first_prepare",
    // Every leg prepared, no decision yet.
    "2pc:after_prepares",
    // The decision is in etcd, nothing committed yet.
    "2pc:after_decision",
    // One leg committed, the others still prepared.
    "2pc:after_first_commit",
];

/// Whether `point` is armed (the commit then runs its legs one at a time,
/// so that "after the first" means exactly one).
pub fn armed(point: &str) -> bool {
    ARMED
        .get_or_init(|| std::env::var("SHARDLINE_FAILPOINT").ok())
        .as_deref()
        == Some(point)
}

/// Aborts the process if `point` is armed.
pub fn hit(point: &str) {
    if armed(point) {
        tracing::error!(point, "failpoint reached: aborting the process");
        eprintln!("shardline-proxy: failpoint {point} reached, aborting");
        std::process::abort();
    }
}
