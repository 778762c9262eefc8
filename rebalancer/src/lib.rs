//! The shardline rebalancer: plans and runs partition moves (copy with logical
//! replication, catch up, cut over, verify, clean up) as durable jobs in etcd.
//! Depends on `shardmap` and the small `settings` and `telemetry` crates;
//! never on `proxy`.
//!
//! - [`config`]: the daemon's settings (shared parts from the `settings` crate).
//! - [`leader`]: etcd election; only the leader acts, and its etcd writes are
//!   guarded by its election key.
//! - [`pg`]: every catalog fact and action on a Postgres server, idempotent.
//! - [`mover`]: one job's state machine, step by step (the move protocol).
//! - [`daemon`]: the leader loop that picks jobs and runs several at once.
//! - [`planner`]: which partitions to move for `rebalance` and `drain`.
//! - [`failpoint`]: deterministic crash points for the crash tests.
//! - [`metrics`]: Prometheus metrics of the daemon.
//! - [`recovery`]: the leader's periodic two-phase commit recovery (the
//!   `twophase` crate, shared with the proxy).

pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod leader;
pub mod metrics;
pub mod mover;
pub mod owner_check;
pub mod pg;
pub mod planner;
pub mod recovery;

/// How a step failed, which decides what the job does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MoveError {
    /// A server could not be reached: the job pauses and retries later.
    #[error("{0}")]
    Unreachable(String),
    /// A transient failure (a lock not granted in time, a slot still busy):
    /// retried a few times, then treated as fatal.
    #[error("{0}")]
    Retry(String),
    /// The move cannot go on: it is rolled back (or, past the flip, retried).
    #[error("{0}")]
    Fatal(String),
    /// etcd could not be read or written.
    #[error("etcd: {0}")]
    Etcd(String),
    /// This process is no longer the leader: stop without writing anything.
    #[error("no longer the rebalancer leader")]
    NotLeader,
}

impl MoveError {
    pub fn from_pg(server: &str, what: &str, e: tokio_postgres::Error) -> MoveError {
        let message = match e.as_db_error() {
            Some(db) => format!(
                "{what} on server {server}: {} ({})",
                db.message(),
                db.code().code()
            ),
            None => format!("{what} on server {server}: {}", error_chain(&e)),
        };
        match e.code().map(|c| c.code()) {
            None => MoveError::Unreachable(message),
            Some(code) if code.starts_with("08") || code.starts_with("57P") => {
                MoveError::Unreachable(message)
            }
            // lock_not_available, serialization/deadlock, query_canceled,
            // object_in_use (a slot still active).
            Some("55P03" | "40001" | "40P01" | "57014" | "55006") => MoveError::Retry(message),
            Some(_) => MoveError::Fatal(message),
        }
    }
}

/// An error with its causes (tokio-postgres puts the useful part in the source).
pub use settings::error_chain;

impl From<shardmap::StoreError> for MoveError {
    fn from(e: shardmap::StoreError) -> MoveError {
        MoveError::Etcd(e.to_string())
    }
}
