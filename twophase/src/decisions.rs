//! Decision records in etcd: `/shardline/<cluster>/twophase/<gid>`, one per
//! global transaction that has a decision. Presumed abort: no record means
//! abort, so only commits need writing on the commit path.
//!
//! Every record is created, never overwritten (`create_revision == 0` in the
//! transaction that writes it), so the first decision written for a gid is
//! final:
//! - the writing proxy's [`DecisionStore::record_commit`] is the commit
//!   point. It also requires the proxy's registration key to be bound to the
//!   lease the gid was made under, so once recovery may consider the writer
//!   dead (key gone or bound to a newer lease) no commit can appear for any
//!   of its gids;
//! - [`DecisionStore::settle`] writes `abort` unless `commit` is there:
//!   recovery calls it before rolling back, and a proxy calls it when it
//!   cannot tell whether its own `record_commit` reached etcd.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use shardmap::store::{now_unix_ms, with_deadline, EtcdPaths, StoreError};

use crate::gid::Gid;

/// How long one etcd request of the commit path may take. An answer that
/// does not come in time leaves the outcome unknown: see [`RecordError::Unknown`].
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// What happens to a prepared transaction everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Commit,
    Abort,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        })
    }
}

/// The value of a decision key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub gid: String,
    pub decision: Decision,
    /// Server names (as in the map) the transaction was prepared on; empty
    /// in records written by [`DecisionStore::settle`].
    #[serde(default)]
    pub participants: Vec<String>,
    /// Who wrote it: the proxy id, or `recovery:<who>`.
    pub by: String,
    pub at_unix_ms: u64,
}

/// A decision record as read, with its key's revision (a guard for deleting it).
#[derive(Debug, Clone)]
pub struct StoredDecision {
    pub key: String,
    /// The gid, if the key names a valid one.
    pub gid: Option<Gid>,
    /// The record, if it decodes.
    pub record: Option<DecisionRecord>,
    pub mod_revision: i64,
}

/// Why [`DecisionStore::record_commit`] did not record a commit.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A decision was recorded before: `Abort` means recovery (or `settle`)
    /// got there first and the transaction must be rolled back; `Commit`
    /// means an earlier call already committed it.
    #[error("transaction {gid} already has the decision {decision}")]
    AlreadyDecided { gid: String, decision: Decision },
    /// The proxy's registration is gone or belongs to a newer lease: its
    /// transactions may already be rolled back by recovery. Nothing was
    /// written, and nothing can be for this gid: roll back.
    #[error("proxy {proxy:?} no longer holds the registration transaction {gid} was made under: it cannot commit; roll it back")]
    NotRegistered { gid: String, proxy: String },
    /// etcd did not answer, or answered something undecodable: the commit
    /// may or may not have been recorded. Call [`DecisionStore::settle`]
    /// (retrying until etcd answers) for the final decision.
    #[error("cannot tell whether the commit of {gid} was recorded: {source}; settle it before doing anything else")]
    Unknown { gid: String, source: StoreError },
}

/// Reads and writes one cluster's decision records.
#[derive(Clone)]
pub struct DecisionStore {
    client: Client,
    keys: EtcdPaths,
}

impl DecisionStore {
    pub fn new(client: Client, cluster: &str) -> DecisionStore {
        DecisionStore {
            client,
            keys: EtcdPaths::new(cluster),
        }
    }

    /// Records `commit` for `gid`, prepared on `participants` (server names).
    /// This write is the commit point: call it after every PREPARE
    /// TRANSACTION succeeded, and COMMIT PREPARED only after it returned
    /// `Ok`. See [`RecordError`] for what each failure means.
    pub async fn record_commit(
        &self,
        gid: &Gid,
        participants: &[String],
    ) -> Result<(), RecordError> {
        let key = self.keys.decision(gid.as_str());
        let registration = self.keys.proxy(gid.proxy());
        let record = DecisionRecord {
            gid: gid.to_string(),
            decision: Decision::Commit,
            participants: participants.to_vec(),
            by: gid.proxy().to_string(),
            at_unix_ms: now_unix_ms(),
        };
        let unknown = |source| RecordError::Unknown {
            gid: gid.to_string(),
            source,
        };
        let value = encode(&record).map_err(unknown)?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                // A missing key compares as lease 0, which no gid carries.
                Compare::lease(registration, CompareOp::Equal, gid.incarnation()),
            ])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut kv = self.client.kv_client();
        let response = with_deadline(REQUEST_DEADLINE, kv.txn(txn))
            .await
            .map_err(unknown)?;
        if response.succeeded() {
            return Ok(());
        }
        match existing(&response.op_responses()) {
            Some(bytes) => match decode(&key, &bytes) {
                Ok(stored) => Err(RecordError::AlreadyDecided {
                    gid: gid.to_string(),
                    decision: stored.decision,
                }),
                Err(e) => Err(unknown(e)),
            },
            None => Err(RecordError::NotRegistered {
                gid: gid.to_string(),
                proxy: gid.proxy().to_string(),
            }),
        }
    }

    /// The recorded decision of `gid`, if any (none means abort, unless the
    /// writer is alive and may still record a commit).
    pub async fn decision(&self, gid: &Gid) -> Result<Option<DecisionRecord>, StoreError> {
        let key = self.keys.decision(gid.as_str());
        let mut kv = self.client.kv_client();
        let response = with_deadline(REQUEST_DEADLINE, kv.get(key.clone(), None)).await?;
        match response.kvs().first() {
            Some(stored) => decode(&key, stored.value()).map(Some),
            None => Ok(None),
        }
    }

    /// The final decision of `gid`: the recorded one, or `abort`, recorded
    /// now so that no commit can follow. `by` says who settled it.
    pub async fn settle(&self, gid: &Gid, by: &str) -> Result<Decision, StoreError> {
        let key = self.keys.decision(gid.as_str());
        let record = DecisionRecord {
            gid: gid.to_string(),
            decision: Decision::Abort,
            participants: Vec::new(),
            by: by.to_string(),
            at_unix_ms: now_unix_ms(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), encode(&record)?, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut kv = self.client.kv_client();
        let response = with_deadline(REQUEST_DEADLINE, kv.txn(txn)).await?;
        if response.succeeded() {
            return Ok(Decision::Abort);
        }
        match existing(&response.op_responses()) {
            Some(bytes) => Ok(decode(&key, &bytes)?.decision),
            // Deleted between the compare and the read cannot happen inside
            // one transaction; an empty answer is etcd misbehaving.
            None => Err(StoreError::Rejected(format!(
                "etcd refused to create {key} yet returned no record"
            ))),
        }
    }

    /// Deletes the record of `gid`: call it once COMMIT PREPARED succeeded
    /// on every participant (recovery deletes what a crash left).
    pub async fn forget(&self, gid: &Gid) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        with_deadline(
            REQUEST_DEADLINE,
            kv.delete(self.keys.decision(gid.as_str()), None),
        )
        .await?;
        Ok(())
    }

    /// Every decision record of the cluster.
    pub async fn list(&self) -> Result<Vec<StoredDecision>, StoreError> {
        let prefix = self.keys.decisions_prefix();
        let mut kv = self.client.kv_client();
        let response = with_deadline(
            REQUEST_DEADLINE,
            kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|stored| {
                let key = String::from_utf8_lossy(stored.key()).into_owned();
                let gid = key
                    .strip_prefix(&prefix)
                    .and_then(|text| Gid::parse(text).ok());
                StoredDecision {
                    record: decode(&key, stored.value()).ok(),
                    gid,
                    key,
                    mod_revision: stored.mod_revision(),
                }
            })
            .collect())
    }

    /// Deletes a listed record, unless it changed since it was read.
    pub(crate) async fn remove(&self, stored: &StoredDecision) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                stored.key.clone(),
                CompareOp::Equal,
                stored.mod_revision,
            )])
            .and_then([TxnOp::delete(stored.key.clone(), None)]);
        let mut kv = self.client.kv_client();
        let response = with_deadline(REQUEST_DEADLINE, kv.txn(txn)).await?;
        Ok(response.succeeded())
    }
}

fn encode(record: &DecisionRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| {
        StoreError::Rejected(format!("cannot encode the decision of {}: {e}", record.gid))
    })
}

fn decode(key: &str, bytes: &[u8]) -> Result<DecisionRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Rejected(format!(
            "the decision record {key} cannot be decoded ({e}): inspect it with etcdctl"
        ))
    })
}

/// The value a failed transaction's `or_else` read, if the key existed.
fn existing(responses: &[TxnOpResponse]) -> Option<Vec<u8>> {
    responses.iter().find_map(|response| match response {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    })
}
