//! Move jobs: the durable state of partition moves, one etcd key per job
//! (`/shardline/<cluster>/jobs/<id>`). `shardctl` creates jobs and asks for
//! cancellation; only the elected rebalancer leader advances them, and its
//! writes are guarded by its election key so a deposed leader cannot write.
//!
//! A job's `phase` names the step being worked on. Every step is idempotent,
//! so a new leader resumes a job by running its current step again.

use std::fmt;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::store::{now_unix_ms, with_timeout, EtcdPaths, StoreError};

/// The steps of a move, in order (then the terminal states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Submitted, waiting for the leader and a free move slot.
    Pending,
    /// Target leaves, publication and subscription being created.
    Preparing,
    /// The subscription's initial copy is running.
    Copying,
    /// Streaming changes until the lag is small.
    CatchingUp,
    /// Partition marked `blocked`; waiting for every proxy to acknowledge.
    Blocking,
    /// Source leaves being detached (no write can reach them afterwards).
    Fencing,
    /// Waiting for the subscriber to reach the source's final position.
    Syncing,
    /// Target leaves being attached, then the map flipped to the target.
    Switching,
    /// Comparing row counts and checksums of both sides.
    Verifying,
    /// Dropping the subscription, slot, publication and source leaves.
    CleaningUp,
    /// Undoing a move that did not reach the flip (cancelled or failed).
    RollingBack,
    Done,
    Cancelled,
    Failed,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Cancelled | Phase::Failed)
    }

    /// Whether the map already names the target as owner (past the point of
    /// no return: the job can only go forward).
    pub fn flipped(self) -> bool {
        matches!(self, Phase::Verifying | Phase::CleaningUp | Phase::Done)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Preparing => "preparing",
            Phase::Copying => "copying",
            Phase::CatchingUp => "catching_up",
            Phase::Blocking => "blocking",
            Phase::Fencing => "fencing",
            Phase::Syncing => "syncing",
            Phase::Switching => "switching",
            Phase::Verifying => "verifying",
            Phase::CleaningUp => "cleaning_up",
            Phase::RollingBack => "rolling_back",
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
            Phase::Failed => "failed",
        }
    }

    /// Parses the names `as_str` prints.
    pub fn parse(text: &str) -> Option<Phase> {
        ALL_PHASES.iter().copied().find(|p| p.as_str() == text)
    }
}

/// Every phase, in order.
pub const ALL_PHASES: [Phase; 14] = [
    Phase::Pending,
    Phase::Preparing,
    Phase::Copying,
    Phase::CatchingUp,
    Phase::Blocking,
    Phase::Fencing,
    Phase::Syncing,
    Phase::Switching,
    Phase::Verifying,
    Phase::CleaningUp,
    Phase::RollingBack,
    Phase::Done,
    Phase::Cancelled,
    Phase::Failed,
];

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Copy and replication progress, refreshed by the leader while it waits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Size of the source leaves when the move started.
    pub bytes_total: u64,
    /// Size of the target leaves so far.
    pub bytes_copied: u64,
    /// WAL the subscriber has not confirmed yet.
    pub lag_bytes: u64,
    /// When the copy started, for the ETA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_started_unix_ms: Option<u64>,
}

impl Progress {
    /// Seconds left to copy, from the rate so far (`None` before there is a rate).
    pub fn eta_seconds(&self, now_unix_ms: u64) -> Option<u64> {
        let started = self.copy_started_unix_ms?;
        let elapsed_ms = now_unix_ms.saturating_sub(started);
        if self.bytes_copied == 0 || elapsed_ms == 0 {
            return None;
        }
        let rate = self.bytes_copied as f64 / elapsed_ms as f64; // bytes per ms
        let left = self.bytes_total.saturating_sub(self.bytes_copied) as f64;
        Some((left / rate / 1000.0).ceil() as u64)
    }
}

/// The result of comparing one moved leaf on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafCheck {
    pub leaf: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub source_checksum: i64,
    pub target_checksum: i64,
}

impl LeafCheck {
    pub fn matches(&self) -> bool {
        self.source_rows == self.target_rows && self.source_checksum == self.target_checksum
    }
}

/// A leaf table a move carries, as it was on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedLeaf {
    /// The partitioned parent.
    pub table: String,
    pub name: String,
    /// `FOR VALUES ...` as in the parent's DDL.
    pub bound: String,
}

/// One partition move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub partition: u32,
    pub from: String,
    pub to: String,
    pub phase: Phase,
    /// Why it exists: `move`, `rebalance` or `drain`.
    pub reason: String,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Set by `shardctl cancel`; honoured before the flip only.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Failed attempts at the current step (reset when a step succeeds).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub progress: Progress,
    /// The leaves being moved (fixed when the move is prepared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaves: Vec<MovedLeaf>,
    /// Cutovers tried and given back (proxies slow to acknowledge, locks
    /// not granted in time, a server unreachable during the cutover).
    #[serde(default)]
    pub cutover_attempts: u32,
    /// The source's WAL position after the fence, as `X/Y`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_lsn: Option<String>,
    /// Set (and saved) before the switch attaches the target's leaves: from
    /// the attach on, a proxy cut off from etcd may write there, so a
    /// cutover may no longer be given back without asking the target.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attach_started: bool,
    /// When the partition was blocked (for the hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_unix_ms: Option<u64>,
    /// How long the partition stayed blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<LeafCheck>,
    /// Why verification could not compare both sides, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_note: Option<String>,
    /// Where a rollback ends: `cancelled` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<Phase>,
}

impl Job {
    pub fn new(partition: u32, from: &str, to: &str, reason: &str) -> Job {
        let now = now_unix_ms();
        Job {
            id: new_job_id(partition, now),
            partition,
            from: from.to_string(),
            to: to.to_string(),
            phase: Phase::Pending,
            reason: reason.to_string(),
            created_unix_ms: now,
            updated_unix_ms: now,
            cancel_requested: false,
            attempts: 0,
            last_error: None,
            progress: Progress::default(),
            leaves: Vec::new(),
            cutover_attempts: 0,
            final_lsn: None,
            attach_started: false,
            blocked_unix_ms: None,
            blocked_ms: None,
            checks: Vec::new(),
            verify_note: None,
            rollback_to: None,
        }
    }

    /// Base of the Postgres object names of this job (publication,
    /// subscription, slot): lower-case, `[a-z0-9_]`, well under 63 bytes.
    pub fn object_name(&self) -> String {
        object_name(&self.id)
    }
}

/// Postgres object name for job `id`.
pub fn object_name(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("shardline_{clean}")
}

/// `m<ms in base 36>p<partition>`: sortable by creation time, readable, unique
/// enough with the random suffix.
fn new_job_id(partition: u32, now_ms: u64) -> String {
    let suffix: u16 = (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16;
    format!("{}-p{partition}-{suffix:04x}", base36(now_ms))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// A job with the etcd mod-revision it was read at (the guard of its next write).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub job: Job,
    pub revision: i64,
}

/// The jobs of one cluster in etcd.
#[derive(Clone)]
pub struct JobStore {
    client: Client,
    keys: EtcdPaths,
}

impl JobStore {
    pub fn new(client: Client, cluster: &str) -> JobStore {
        JobStore {
            client,
            keys: EtcdPaths::new(cluster),
        }
    }

    pub fn key(&self, id: &str) -> String {
        format!("{}{id}", self.keys.jobs_prefix())
    }

    /// Creates a job; fails if the id exists.
    pub async fn create(&self, job: &Job) -> Result<StoredJob, StoreError> {
        let key = self.key(&job.id);
        let value = encode(job)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.txn(txn)).await?;
        if !response.succeeded() {
            return Err(StoreError::Rejected(format!(
                "job {} already exists",
                job.id
            )));
        }
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(StoredJob {
            job: job.clone(),
            revision,
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<StoredJob>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.get(self.key(id), None)).await?;
        match response.kvs().first() {
            Some(kv) => Ok(Some(StoredJob {
                job: decode(kv.value())?,
                revision: kv.mod_revision(),
            })),
            None => Ok(None),
        }
    }

    /// Every job, oldest first (ids sort by creation time).
    pub async fn list(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.get(
            self.keys.jobs_prefix(),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let mut jobs = Vec::new();
        for kv in response.kvs() {
            jobs.push(StoredJob {
                job: decode(kv.value())?,
                revision: kv.mod_revision(),
            });
        }
        jobs.sort_by(|a, b| {
            (a.job.created_unix_ms, &a.job.id).cmp(&(b.job.created_unix_ms, &b.job.id))
        });
        Ok(jobs)
    }

    /// Writes `job` if it is unchanged since `current` was read and every
    /// `guards` compare holds (the leader's election key). `None`: a guard failed.
    pub async fn write(
        &self,
        current: &StoredJob,
        job: &Job,
        guards: &[Compare],
    ) -> Result<Option<StoredJob>, StoreError> {
        let key = self.key(&job.id);
        let mut job = job.clone();
        job.updated_unix_ms = now_unix_ms();
        let mut compares = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            current.revision,
        )];
        compares.extend(guards.iter().cloned());
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::put(key, encode(&job)?, None)]);
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.txn(txn)).await?;
        if !response.succeeded() {
            return Ok(None);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(Some(StoredJob { job, revision }))
    }

    /// Sets `cancel_requested` (retrying on concurrent writes).
    pub async fn request_cancel(&self, id: &str) -> Result<StoredJob, StoreError> {
        for _ in 0..8 {
            let Some(current) = self.get(id).await? else {
                return Err(StoreError::Rejected(format!(
                    "no job {id:?}: see `shardctl status` for the job ids"
                )));
            };
            if current.job.phase.is_terminal() {
                return Err(StoreError::Rejected(format!(
                    "job {id} is already {}",
                    current.job.phase
                )));
            }
            if current.job.phase.flipped() {
                return Err(StoreError::Rejected(format!(
                    "job {id} has already switched partition {} to {}; it can only finish (it is {})",
                    current.job.partition, current.job.to, current.job.phase
                )));
            }
            let mut job = current.job.clone();
            job.cancel_requested = true;
            if let Some(written) = self.write(&current, &job, &[]).await? {
                return Ok(written);
            }
        }
        Err(StoreError::Rejected(format!(
            "job {id} kept changing; try `shardctl cancel {id}` again"
        )))
    }

    /// Deletes a job record (finished jobs are kept until `shardctl prune`).
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        with_timeout(kv.delete(self.key(id), None)).await?;
        Ok(())
    }

    /// Puts `value` under `key` with `lease` (used for leader bookkeeping).
    pub async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        with_timeout(kv.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(())
    }
}

fn encode(job: &Job) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(job).map_err(|e| StoreError::Rejected(e.to_string()))
}

fn decode(bytes: &[u8]) -> Result<Job, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        cluster: String::new(),
        why: format!("a job record cannot be decoded: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_order() {
        for phase in ALL_PHASES {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
            let json = serde_json::to_string(&phase).expect("encode");
            assert_eq!(json, format!("\"{}\"", phase.as_str()));
        }
        assert!(Phase::Preparing < Phase::Switching);
        assert!(Phase::Verifying.flipped() && !Phase::Switching.flipped());
    }

    #[test]
    fn object_names_are_safe_identifiers() {
        let job = Job::new(17, "pg1", "pg2", "move");
        let name = job.object_name();
        assert!(name.starts_with("shardline_"));
        assert!(name.len() < 63, "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert_eq!(object_name("AB-c.1"), "shardline_ab_c_1");
    }

    #[test]
    fn eta_from_rate() {
        let progress = Progress {
            bytes_total: 1000,
            bytes_copied: 250,
            lag_bytes: 0,
            copy_started_unix_ms: Some(10_000),
        };
        // 250 bytes in 1 s: 750 left take 3 s.
        assert_eq!(progress.eta_seconds(11_000), Some(3));
        assert_eq!(Progress::default().eta_seconds(11_000), None);
    }

    #[test]
    fn base36_is_monotonic() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert!(base36(1_700_000_000_000) < base36(1_800_000_000_000));
    }
}
