//! Crash points for the crash tests: with `SHARDLINE_FAILPOINT=<name>` in its
//! environment, the rebalancer aborts the process (no cleanup, no flush, as
//! `kill -9` would) when a job reaches `<name>`. Names are a phase
//! (`copying`: just after the job entered that phase) or a phase and a point
//! inside it (`fencing:after_detach`).

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Every crash point, in the order a move passes them.
pub const POINTS: &[&str] = &[
    "pending",
    "preparing",
    "preparing:after_subscription",
    "copying",
    "catching_up",
    "blocking",
    "blocking:after_block",
    "fencing",
    "fencing:after_detach",
    "syncing",
    "switching",
    "switching:after_attach",
    "switching:after_flip",
    "verifying",
    "cleaning_up",
    "cleaning_up:after_subscription",
];

/// Aborts the process if `point` is armed.
pub fn hit(point: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("SHARDLINE_FAILPOINT").ok());
    if armed.as_deref() == Some(point) {
        tracing::error!(point, "failpoint reached: aborting the process");
        eprintln!("shardline-rebalancer: failpoint {point} reached, aborting");
        std::process::abort();
    }
}
