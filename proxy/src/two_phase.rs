//! The proxy's side of two-phase commit: ids from the current registration
//! (see [`crate::liveness::Liveness::gids`]), the decision record written at
//! the commit point through [`twophase::DecisionStore`], and its deletion.
//! A decision whose write has an unknown outcome is settled (read back, or
//! recorded as abort so that no commit can follow) for a few seconds before
//! the proxy gives up and leaves it to recovery.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tracing::warn;
use twophase::{Decision, DecisionStore, Gid, RecordError};

use crate::liveness::Liveness;

/// How long a commit whose decision write timed out keeps trying to learn
/// the outcome before answering "unknown".
const SETTLE_FOR: Duration = Duration::from_secs(5);

/// Why a commit could not be decided.
#[derive(Debug)]
pub struct DecisionError {
    message: String,
    /// The write may have reached etcd and could not be settled: the
    /// prepared transactions are left to recovery, which reads the record.
    unknown: bool,
}

impl DecisionError {
    pub fn outcome_unknown(&self) -> bool {
        self.unknown
    }

    fn definite(message: impl Into<String>) -> DecisionError {
        DecisionError {
            message: message.into(),
            unknown: false,
        }
    }
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// This process's two-phase commits: shared by every serving thread.
pub struct TwoPhase {
    etcd: Option<(settings::EtcdSettings, String)>,
    store: OnceCell<DecisionStore>,
}

impl TwoPhase {
    /// Decisions go to the cluster `cluster` of the etcd `etcd` says
    /// (connected on first use).
    pub fn new(etcd: settings::EtcdSettings, cluster: String) -> TwoPhase {
        TwoPhase {
            etcd: Some((etcd, cluster)),
            store: OnceCell::new(),
        }
    }

    /// A proxy embedded without etcd: cross-server commits are rolled back
    /// with a clear error (there is nowhere to record a decision).
    pub fn unconfigured() -> TwoPhase {
        TwoPhase {
            etcd: None,
            store: OnceCell::new(),
        }
    }

    /// A gid of the current registration; `None` while unregistered (no
    /// commit could be recorded then).
    pub fn next_gid(&self, liveness: &Liveness) -> Option<Gid> {
        liveness.gids().map(|gids| gids.next())
    }

    async fn store(&self) -> Result<&DecisionStore, DecisionError> {
        let Some((etcd, cluster)) = &self.etcd else {
            return Err(DecisionError::definite(
                "this proxy has no etcd to record two-phase commit decisions in",
            ));
        };
        self.store
            .get_or_try_init(|| async {
                shardmap::store::connect(etcd)
                    .await
                    .map(|client| DecisionStore::new(client, cluster))
                    .map_err(|e| DecisionError::definite(format!("cannot reach etcd: {e}")))
            })
            .await
    }

    /// Records the decision to commit `gid`: Ok means committed.
    pub async fn record_commit(&self, gid: &Gid, servers: &[String]) -> Result<(), DecisionError> {
        let store = self.store().await?;
        match store.record_commit(gid, servers).await {
            Ok(()) => Ok(()),
            Err(RecordError::AlreadyDecided {
                decision: Decision::Commit,
                ..
            }) => Ok(()),
            Err(e @ (RecordError::AlreadyDecided { .. } | RecordError::NotRegistered { .. })) => {
                Err(DecisionError::definite(e.to_string()))
            }
            Err(RecordError::Unknown { source, .. }) => {
                warn!(%gid, error = %source, "two-phase commit: the decision's write has an unknown outcome; settling it");
                self.settle(store, gid, &source.to_string()).await
            }
        }
    }

    /// Learns the final decision of a gid whose record write timed out.
    async fn settle(
        &self,
        store: &DecisionStore,
        gid: &Gid,
        first: &str,
    ) -> Result<(), DecisionError> {
        let deadline = tokio::time::Instant::now() + SETTLE_FOR;
        let mut last = first.to_string();
        while tokio::time::Instant::now() < deadline {
            match store.settle(gid, gid.proxy()).await {
                Ok(Decision::Commit) => return Ok(()),
                Ok(Decision::Abort) => {
                    return Err(DecisionError::definite(format!(
                        "etcd did not confirm the decision in time ({first})"
                    )))
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(DecisionError {
            message: format!("etcd did not answer ({last})"),
            unknown: true,
        })
    }

    /// Deletes the record once every participant committed (best effort:
    /// recovery deletes what is left).
    pub async fn forget(self: &Arc<Self>, gid: &Gid) {
        if let Ok(store) = self.store().await {
            if let Err(e) = store.forget(gid).await {
                warn!(%gid, error = %e, "two-phase commit: could not delete the decision record; recovery will");
            }
        }
    }
}
