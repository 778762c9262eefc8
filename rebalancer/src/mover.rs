//! One move job, step by step. Each phase names the step being worked on;
//! every step checks what is already done (catalogs, map, etcd) before
//! acting, so a new leader resumes a job by running its phase again.
//!
//! Phases, and what is true once each one completes:
//! - `pending` → the map marks the partition `moving(job)`.
//! - `preparing` → target leaves exist, detached, with a validated CHECK
//!   equal to the partition bound; publication on the source; subscription
//!   (and its slot) on the target.
//! - `copying` → the initial copy finished for every leaf.
//! - `catching_up` → the subscriber is within `catch_up_lag_bytes`.
//! - `blocking` → the map marks the partition `blocked(job)` and every live
//!   proxy acknowledged that map version (or its lease expired).
//! - `fencing` → the source leaves are detached: no statement can reach them.
//! - `syncing` → the subscriber confirmed the source's WAL up to the fence.
//! - `switching` → target leaves attached; map flipped (owner = target, serving).
//! - `verifying` → row counts and checksums compared.
//! - `cleaning_up` → subscription, slot, publication and source leaves gone.
//!
//! Any failure before the flip gives the partition back (re-attach on the
//! source, unblock) and either retries the cutover later or rolls the whole
//! move back; after the flip the job can only go forward.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use shardmap::ddl::Leaf;
use shardmap::jobs::{LeafCheck, MovedLeaf};
use shardmap::store::now_unix_ms;
use shardmap::{
    Change, ClusterMap, JobStore, MapStore, PartitionState, Phase, ServerState, StoredJob,
    Versioned,
};
use tracing::{info, warn};

use crate::config::RebalancerConfig;
use crate::failpoint;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::pg::{self, partition_leaves, Credentials, Pg};
use crate::MoveError;

/// Everything a job needs, shared by the jobs the leader runs.
pub struct MoveContext {
    pub etcd: Client,
    pub store: MapStore,
    pub jobs: JobStore,
    pub cluster: String,
    pub config: RebalancerConfig,
    pub credentials: Credentials,
    pub leader: Leadership,
    /// Who changes the map, for its history.
    pub actor: String,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Runs `job` until it is done, cancelled or failed, or leadership is lost.
pub async fn run(context: Arc<MoveContext>, job: StoredJob) -> Result<Phase, MoveError> {
    let mut mover = Mover {
        context,
        job,
        snapshot: None,
        failures: 0,
    };
    mover.run().await
}

struct Mover {
    context: Arc<MoveContext>,
    job: StoredJob,
    /// A REPEATABLE READ transaction on the target opened just before the
    /// flip: verification compares the target as it was then.
    snapshot: Option<Pg>,
    /// Consecutive failures of the current step.
    failures: u32,
}

impl Mover {
    fn ctx(&self) -> &MoveContext {
        &self.context
    }

    async fn run(&mut self) -> Result<Phase, MoveError> {
        loop {
            let phase = self.job.job.phase;
            if phase.is_terminal() {
                let metrics = &self.ctx().metrics;
                match phase {
                    Phase::Done => {
                        Metrics::add(&metrics.moves_done, 1);
                        Metrics::add(&metrics.bytes_moved, self.job.job.progress.bytes_total);
                        if let Some(ms) = self.job.job.blocked_ms {
                            Metrics::set(&metrics.last_blocked_ms, ms);
                        }
                    }
                    Phase::Cancelled => Metrics::add(&metrics.moves_cancelled, 1),
                    _ => Metrics::add(&metrics.moves_failed, 1),
                }
                return Ok(phase);
            }
            self.ctx().leader.check()?;
            match self.step(phase).await {
                Ok(()) => self.failures = 0,
                Err(MoveError::NotLeader) => return Err(MoveError::NotLeader),
                Err(error) => self.on_error(error).await?,
            }
        }
    }

    // ------------------------------------------------------------ bookkeeping

    /// Writes the job, guarded by leadership. A concurrent write (only
    /// `shardctl cancel` writes jobs besides the leader) is merged.
    async fn save(&mut self) -> Result<(), MoveError> {
        for _ in 0..5 {
            self.ctx().leader.check()?;
            let guard = self.ctx().leader.guard();
            let job = self.job.job.clone();
            if let Some(written) = self.ctx().jobs.write(&self.job, &job, &[guard]).await? {
                self.job = written;
                return Ok(());
            }
            let Some(stored) = self.ctx().jobs.get(&job.id).await? else {
                return Err(MoveError::Fatal(format!(
                    "job {} was deleted while running",
                    job.id
                )));
            };
            let cancel = stored.job.cancel_requested;
            self.job = StoredJob {
                job,
                revision: stored.revision,
            };
            self.job.job.cancel_requested |= cancel;
        }
        Err(MoveError::NotLeader)
    }

    /// Moves to `phase` (the current step is done) and persists it.
    async fn advance(&mut self, phase: Phase) -> Result<(), MoveError> {
        self.advance_noting(phase, None).await
    }

    /// Like [`advance`](Self::advance), keeping `error` in the record (why a
    /// rollback or a retried cutover started) in the same write.
    async fn advance_noting(
        &mut self,
        phase: Phase,
        error: Option<String>,
    ) -> Result<(), MoveError> {
        info!(job = %self.job.job.id, from = %self.job.job.phase, to = %phase, "move advances");
        self.job.job.phase = phase;
        self.job.job.attempts = 0;
        self.job.job.last_error = error;
        self.save().await?;
        failpoint::hit(phase.as_str());
        Ok(())
    }

    /// Refreshes `cancel_requested` from etcd.
    async fn cancel_requested(&mut self) -> Result<bool, MoveError> {
        if let Some(stored) = self.ctx().jobs.get(&self.job.job.id).await? {
            if stored.job.cancel_requested && !self.job.job.cancel_requested {
                self.job.job.cancel_requested = true;
                self.job.revision = stored.revision;
            }
        }
        Ok(self.job.job.cancel_requested)
    }

    async fn on_error(&mut self, error: MoveError) -> Result<(), MoveError> {
        self.failures += 1;
        let phase = self.job.job.phase;
        warn!(job = %self.job.job.id, %phase, error = %error, failures = self.failures, "move step failed");
        self.job.job.attempts = self.failures;
        self.job.job.last_error = Some(error.to_string());
        // Best effort: the record shows the error even if etcd is the problem.
        if let Err(MoveError::NotLeader) = self.save().await {
            return Err(MoveError::NotLeader);
        }
        let in_cutover = matches!(
            phase,
            Phase::Blocking | Phase::Fencing | Phase::Syncing | Phase::Switching
        );
        let fatal = match &error {
            MoveError::Fatal(_) => true,
            MoveError::Retry(_) => self.failures >= 10,
            _ => false,
        };
        if in_cutover {
            // Never keep a partition blocked while retrying: give it back.
            return self.abort_cutover(fatal).await;
        }
        if fatal && !phase.flipped() && phase != Phase::RollingBack {
            return self.start_rollback(Phase::Failed).await;
        }
        let backoff = Duration::from_millis((250u64 << self.failures.min(6)).min(10_000));
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    async fn start_rollback(&mut self, end: Phase) -> Result<(), MoveError> {
        self.job.job.rollback_to = Some(end);
        let error = self.job.job.last_error.take();
        self.advance_noting(Phase::RollingBack, error).await
    }

    async fn connect(&self, server: &str) -> Result<Pg, MoveError> {
        let map = self.ctx().store.load().await?.map;
        self.connect_in(&map, server).await
    }

    /// Connects to `server` as `map` defines it (no etcd read).
    async fn connect_in(&self, map: &ClusterMap, server: &str) -> Result<Pg, MoveError> {
        let definition = map
            .servers
            .get(server)
            .ok_or_else(|| MoveError::Fatal(format!("server {server} is no longer in the map")))?;
        Pg::connect(definition, &self.ctx().credentials, "shardline-rebalancer").await
    }

    /// Changes the map with `edit` (which returns `None` when nothing needs
    /// to change), guarded by leadership; returns the map after.
    async fn update_map<F>(&self, mut edit: F) -> Result<Versioned, MoveError>
    where
        F: FnMut(&mut ClusterMap) -> Result<Option<Change>, MoveError>,
    {
        for _ in 0..10 {
            self.ctx().leader.check()?;
            let current = self.ctx().store.load().await?;
            let mut next = current.map.clone();
            let Some(change) = edit(&mut next)? else {
                return Ok(current);
            };
            let guard = self.ctx().leader.guard();
            match self
                .ctx()
                .store
                .compare_and_swap_guarded(&current, next, &self.ctx().actor, &change, &[guard])
                .await
            {
                Ok(written) => return Ok(written),
                Err(shardmap::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(MoveError::Retry(
            "the map kept changing concurrently".into(),
        ))
    }

    fn leaves(&self) -> Vec<(String, Leaf)> {
        self.job
            .job
            .leaves
            .iter()
            .map(|l| {
                (
                    l.table.clone(),
                    Leaf {
                        name: l.name.clone(),
                        bound: l.bound.clone(),
                    },
                )
            })
            .collect()
    }

    fn leaf_pairs(&self) -> Vec<(String, String)> {
        self.job
            .job
            .leaves
            .iter()
            .map(|l| (l.table.clone(), l.name.clone()))
            .collect()
    }

    fn leaf_names(&self) -> Vec<String> {
        self.job.job.leaves.iter().map(|l| l.name.clone()).collect()
    }

    // ------------------------------------------------------------ steps

    async fn step(&mut self, phase: Phase) -> Result<(), MoveError> {
        match phase {
            Phase::Pending => self.start().await,
            Phase::Preparing => self.prepare().await,
            Phase::Copying => self.copy().await,
            Phase::CatchingUp => self.catch_up().await,
            Phase::Blocking => self.block().await,
            Phase::Fencing => self.fence().await,
            Phase::Syncing => self.sync().await,
            Phase::Switching => self.switch().await,
            Phase::Verifying => self.verify().await,
            Phase::CleaningUp => self.clean_up().await,
            Phase::RollingBack => self.roll_back().await,
            Phase::Done | Phase::Cancelled | Phase::Failed => Ok(()),
        }
    }

    /// Claims the partition in the map (`moving`).
    async fn start(&mut self) -> Result<(), MoveError> {
        failpoint::hit("pending");
        if self.cancel_requested().await? {
            return self.advance(Phase::Cancelled).await;
        }
        let job = self.job.job.clone();
        self.update_map(|map| {
            let target = map.servers.get(&job.to).ok_or_else(|| {
                MoveError::Fatal(format!("target server {} is not in the map", job.to))
            })?;
            if target.state != ServerState::Active {
                return Err(MoveError::Fatal(format!(
                    "target server {} is {:?}, not active",
                    job.to, target.state
                )));
            }
            let assignment = map
                .assignments
                .get_mut(job.partition as usize)
                .ok_or_else(|| {
                    MoveError::Fatal(format!("partition {} does not exist", job.partition))
                })?;
            if let Some(region) = &assignment.region {
                if target.region.as_deref() != Some(region.as_str()) {
                    return Err(MoveError::Fatal(format!(
                        "partition {} is pinned to region {region}; server {} is not in it",
                        job.partition, job.to
                    )));
                }
            }
            match &assignment.state {
                PartitionState::Moving { job: id } if *id == job.id => return Ok(None),
                PartitionState::Serving if assignment.owner == job.from => {}
                PartitionState::Serving => {
                    return Err(MoveError::Fatal(format!(
                        "partition {} is owned by {}, not {}",
                        job.partition, assignment.owner, job.from
                    )))
                }
                other => {
                    return Err(MoveError::Fatal(format!(
                        "partition {} is busy: {other}",
                        job.partition
                    )))
                }
            }
            assignment.state = PartitionState::Moving {
                job: job.id.clone(),
            };
            Ok(Some(Change::new(
                "move-start",
                format!(
                    "partition {} {} -> {} (job {})",
                    job.partition, job.from, job.to, job.id
                ),
            )))
        })
        .await?;
        self.advance(Phase::Preparing).await
    }

    async fn prepare(&mut self) -> Result<(), MoveError> {
        if self.cancel_requested().await? {
            return self.start_rollback(Phase::Cancelled).await;
        }
        let map = self.ctx().store.load().await?.map;
        let source = self.connect_in(&map, &self.job.job.from).await?;
        let target = self.connect_in(&map, &self.job.job.to).await?;
        if self.job.job.leaves.is_empty() {
            let mut leaves = Vec::new();
            for (table, leaf) in partition_leaves(&map, self.job.job.partition)? {
                if source.attached(&table, &leaf.name).await? {
                    leaves.push(MovedLeaf {
                        table,
                        name: leaf.name,
                        bound: leaf.bound,
                    });
                }
            }
            self.job.job.leaves = leaves;
            self.job.job.progress.bytes_total = source.total_size(&self.leaf_names()).await?;
            self.save().await?;
        }
        let name = self.job.job.object_name();
        // A proxy cut off from etcd checks ownership on the target once it
        // owns the partition (a server that joined may lack the function).
        target.ensure_owner_check().await?;
        if !self.job.job.leaves.is_empty() {
            for (table, leaf) in self.leaves() {
                if target.attached(&table, &leaf.name).await? {
                    return Err(MoveError::Fatal(format!(
                        "{} is already a partition of {table} on target {}: the servers disagree with the map; check them by hand",
                        leaf.name, self.job.job.to
                    )));
                }
                let constraint = source.partition_constraint(&leaf.name).await?;
                target
                    .create_detached_leaf(&table, &leaf.name, &constraint)
                    .await?;
            }
            source.create_publication(&name, &self.leaf_names()).await?;
            let source_server = map.servers.get(&self.job.job.from).ok_or_else(|| {
                MoveError::Fatal(format!("server {} is not in the map", self.job.job.from))
            })?;
            let conninfo = pg::conninfo(source_server, &self.ctx().credentials)?;
            if !target.subscription_exists(&name).await? {
                // A slot left by an attempt that died between creating the
                // slot and committing the subscription.
                source.drop_slot(&name).await?;
            }
            target.create_subscription(&name, &conninfo).await?;
            failpoint::hit("preparing:after_subscription");
        }
        self.job.job.progress.copy_started_unix_ms = Some(now_unix_ms());
        self.advance(Phase::Copying).await
    }

    async fn copy(&mut self) -> Result<(), MoveError> {
        if self.job.job.leaves.is_empty() {
            return self.advance(Phase::CatchingUp).await;
        }
        let target = self.connect(&self.job.job.to.clone()).await?;
        let name = self.job.job.object_name();
        let mut last_save = Instant::now();
        let errors_at_start = target.subscription_errors(&name).await?;
        loop {
            if self.cancel_requested().await? {
                return self.start_rollback(Phase::Cancelled).await;
            }
            let synced = target.subscription_synced(&name).await?;
            let copied = target.total_size(&self.leaf_names()).await?;
            self.job.job.progress.bytes_copied = copied;
            if synced {
                self.job.job.progress.bytes_copied = copied.max(self.job.job.progress.bytes_total);
                return self.advance(Phase::CatchingUp).await;
            }
            let errors = target.subscription_errors(&name).await?;
            if errors > errors_at_start {
                self.job.job.last_error = Some(format!(
                    "the subscription on {} reported {} errors so far (see that server's log)",
                    self.job.job.to,
                    errors - errors_at_start
                ));
            }
            if last_save.elapsed() >= Duration::from_secs(1) {
                self.save().await?;
                last_save = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn catch_up(&mut self) -> Result<(), MoveError> {
        if self.job.job.leaves.is_empty() {
            return self.advance(Phase::Blocking).await;
        }
        let source = self.connect(&self.job.job.from.clone()).await?;
        let target = self.connect(&self.job.job.to.clone()).await?;
        let name = self.job.job.object_name();
        target.subscription_confirm_promptly(&name).await?;
        let mut last_save = Instant::now();
        loop {
            if self.cancel_requested().await? {
                return self.start_rollback(Phase::Cancelled).await;
            }
            let lag = source.slot_lag(&name).await?.ok_or_else(|| {
                MoveError::Fatal(format!(
                    "replication slot {name} is missing on {}",
                    self.job.job.from
                ))
            })?;
            self.job.job.progress.lag_bytes = lag;
            if lag <= self.ctx().config.catch_up_lag_bytes {
                return self.advance(Phase::Blocking).await;
            }
            if last_save.elapsed() >= Duration::from_secs(1) {
                self.save().await?;
                last_save = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Blocks the partition and waits for every proxy's acknowledgement.
    async fn block(&mut self) -> Result<(), MoveError> {
        let job = self.job.job.clone();
        let blocked = self
            .update_map(|map| {
                let assignment = assignment_mut(map, job.partition)?;
                match &assignment.state {
                    PartitionState::Blocked { job: id } if *id == job.id => Ok(None),
                    PartitionState::Moving { job: id } if *id == job.id => {
                        assignment.state = PartitionState::Blocked {
                            job: job.id.clone(),
                        };
                        Ok(Some(Change::new(
                            "move-block",
                            format!(
                                "partition {} blocked for cutover (job {})",
                                job.partition, job.id
                            ),
                        )))
                    }
                    other => Err(MoveError::Fatal(format!(
                        "partition {} is {other}, not moving for job {}",
                        job.partition, job.id
                    ))),
                }
            })
            .await?;
        if self.job.job.blocked_unix_ms.is_none() {
            self.job.job.blocked_unix_ms = Some(now_unix_ms());
            self.save().await?;
        }
        failpoint::hit("blocking:after_block");
        let version = blocked.map.version;
        let deadline = Instant::now() + self.ctx().config.ack_timeout();
        loop {
            self.ctx().leader.check()?;
            let proxies = shardmap::proxies::list(&self.ctx().etcd, &self.ctx().cluster).await?;
            let waiting: Vec<String> = proxies
                .iter()
                .filter(|p| p.record.acked_map_version < version)
                .map(|p| p.record.id.clone())
                .collect();
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(MoveError::Retry(format!(
                    "proxies {} did not acknowledge map version {version} within {:?}",
                    waiting.join(", "),
                    self.ctx().config.ack_timeout()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.advance(Phase::Fencing).await
    }

    async fn fence(&mut self) -> Result<(), MoveError> {
        let source = self.connect(&self.job.job.from.clone()).await?;
        source
            .detach(&self.leaf_pairs(), self.ctx().config.lock_timeout())
            .await?;
        failpoint::hit("fencing:after_detach");
        // Every write to the leaves committed before the detach did, and the
        // detach's commit is flushed: the flush position covers them all.
        self.job.job.final_lsn = Some(source.flush_lsn().await?);
        self.advance(Phase::Syncing).await
    }

    async fn sync(&mut self) -> Result<(), MoveError> {
        if !self.job.job.leaves.is_empty() {
            let source = self.connect(&self.job.job.from.clone()).await?;
            let lsn = match self.job.job.final_lsn.clone() {
                Some(lsn) => lsn,
                None => source.flush_lsn().await?,
            };
            let name = self.job.job.object_name();
            let deadline = Instant::now() + self.ctx().config.sync_timeout();
            while !source.slot_reached(&name, &lsn).await? {
                if Instant::now() >= deadline {
                    return Err(MoveError::Retry(format!(
                        "the subscriber did not reach {lsn} within {:?}",
                        self.ctx().config.sync_timeout()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.advance(Phase::Switching).await
    }

    async fn switch(&mut self) -> Result<(), MoveError> {
        let map = self.ctx().store.load().await?.map;
        let flipped = is_switched(&map, &self.job.job);
        if !flipped {
            let target = self.connect(&self.job.job.to.clone()).await?;
            let attached_before = match self.job.job.leaves.first() {
                Some(leaf) => target.attached(&leaf.table, &leaf.name).await?,
                None => true,
            };
            if !attached_before {
                // The snapshot to verify against is taken before the attach:
                // once attached, a proxy cut off from etcd whose cached map
                // names the target may write there (its ownership check
                // passes), and those writes are not the source's.
                let snapshot = self.connect(&self.job.job.to.clone()).await?;
                snapshot
                    .execute(
                        "opening the verification snapshot",
                        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;",
                    )
                    .await?;
                self.snapshot = Some(snapshot);
            }
            if !self.job.job.attach_started {
                self.job.job.attach_started = true;
                self.save().await?;
            }
            target
                .attach(&self.leaves(), self.ctx().config.lock_timeout())
                .await?;
            failpoint::hit("switching:after_attach");
            let job = self.job.job.clone();
            self.update_map(|map| {
                let assignment = assignment_mut(map, job.partition)?;
                if assignment.owner == job.to {
                    return Ok(None);
                }
                match &assignment.state {
                    PartitionState::Blocked { job: id } if *id == job.id => {}
                    other => {
                        return Err(MoveError::Fatal(format!(
                            "partition {} is {other}, not blocked for job {}",
                            job.partition, job.id
                        )))
                    }
                }
                assignment.owner = job.to.clone();
                assignment.state = PartitionState::Serving;
                Ok(Some(Change::new(
                    "move-switch",
                    format!(
                        "partition {} now on {} (job {})",
                        job.partition, job.to, job.id
                    ),
                )))
            })
            .await?;
            failpoint::hit("switching:after_flip");
        }
        if let Some(blocked_at) = self.job.job.blocked_unix_ms {
            self.job.job.blocked_ms = Some(now_unix_ms().saturating_sub(blocked_at));
        }
        self.advance(Phase::Verifying).await
    }

    async fn verify(&mut self) -> Result<(), MoveError> {
        let Some(snapshot) = self.snapshot.take() else {
            if !self.job.job.leaves.is_empty() && self.job.job.checks.is_empty() {
                self.job.job.verify_note = Some(
                    "not compared: the leader that switched the partition stopped before checking, \
                     and the target has taken writes since"
                        .into(),
                );
            }
            return self.advance(Phase::CleaningUp).await;
        };
        let source = self.connect(&self.job.job.from.clone()).await?;
        let mut checks = Vec::new();
        for leaf in self.leaf_names() {
            // Both sides at once: each is a full scan of the leaf.
            let (source_side, target_side) =
                tokio::join!(source.checksum(&leaf), snapshot.checksum(&leaf));
            let (source_rows, source_checksum) = source_side?;
            let (target_rows, target_checksum) = target_side?;
            checks.push(LeafCheck {
                leaf,
                source_rows,
                target_rows,
                source_checksum,
                target_checksum,
            });
        }
        let _ = snapshot.execute("closing the snapshot", "COMMIT").await;
        let mismatched: Vec<String> = checks
            .iter()
            .filter(|c| !c.matches())
            .map(|c| format!("{} (rows {} vs {})", c.leaf, c.source_rows, c.target_rows))
            .collect();
        self.job.job.checks = checks;
        if !mismatched.is_empty() {
            // Keep the source leaves for the DBA; the partition is already
            // served from the target.
            self.job.job.last_error = Some(format!(
                "verification failed for {}: the source leaves are kept (detached) on {} for inspection",
                mismatched.join(", "),
                self.job.job.from
            ));
            self.job.job.verify_note = Some("mismatch".into());
            self.job.job.phase = Phase::Failed;
            return self.save().await;
        }
        self.advance(Phase::CleaningUp).await
    }

    async fn clean_up(&mut self) -> Result<(), MoveError> {
        let name = self.job.job.object_name();
        let target = self.connect(&self.job.job.to.clone()).await?;
        let source = self.connect(&self.job.job.from.clone()).await;
        match &source {
            Ok(_) => target.drop_subscription(&name, true).await?,
            // The source is down: drop the subscription here now, and its
            // slot on the source once the source is back.
            Err(_) => target.drop_subscription(&name, false).await?,
        }
        failpoint::hit("cleaning_up:after_subscription");
        let source = source?;
        source.drop_slot(&name).await?;
        source.drop_publication(&name).await?;
        source.drop_detached(&self.leaf_pairs()).await?;
        self.advance(Phase::Done).await
    }

    /// Gives a blocked partition back to its source and returns to catching
    /// up (or rolls the move back after too many attempts).
    async fn abort_cutover(&mut self, fatal: bool) -> Result<(), MoveError> {
        let map = self.ctx().store.load().await?.map;
        if is_switched(&map, &self.job.job) {
            // The flip happened (only recording it failed): go forward.
            self.snapshot = None;
            return self.advance(Phase::Verifying).await;
        }
        let mut round = 0u32;
        loop {
            self.ctx().leader.check()?;
            let attempt = match self.target_attached().await {
                Ok(true) => {
                    // Past the attach: only forward (see `target_attached`).
                    warn!(job = %self.job.job.id, "the cutover failed after the target's leaves were attached: switching again instead of giving the partition back");
                    self.job.job.last_error.take();
                    return self.advance(Phase::Switching).await;
                }
                Ok(false) => self.give_back().await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => break,
                Err(MoveError::NotLeader) => return Err(MoveError::NotLeader),
                Err(e) => {
                    round += 1;
                    warn!(job = %self.job.job.id, error = %e, "cannot give the partition back yet; retrying");
                    let backoff = Duration::from_millis((100u64 << round.min(6)).min(5_000));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
        self.snapshot = None;
        Metrics::add(&self.ctx().metrics.cutovers_given_back, 1);
        self.job.job.cutover_attempts += 1;
        self.job.job.final_lsn = None;
        self.job.job.attach_started = false;
        self.job.job.blocked_unix_ms = None;
        let error = self.job.job.last_error.take();
        if fatal || self.job.job.cutover_attempts >= self.ctx().config.max_cutover_attempts {
            self.job.job.rollback_to = Some(Phase::Failed);
            self.advance_noting(Phase::RollingBack, error).await
        } else {
            self.advance_noting(Phase::CatchingUp, error).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(())
        }
    }

    /// Whether the switch attached the target's leaves. From the attach on,
    /// a proxy cut off from etcd whose cached map names the target may
    /// write there (its ownership check passes): giving the partition back
    /// would lose those writes, so a cutover past that point only goes
    /// forward. Before the switch recorded `attach_started` the answer is
    /// no without asking; after, the target must answer (an unreachable
    /// target makes the caller retry, never guess).
    async fn target_attached(&self) -> Result<bool, MoveError> {
        let job = &self.job.job;
        if !job.attach_started || job.leaves.is_empty() {
            return Ok(false);
        }
        let target = self.connect(&job.to).await.map_err(|e| {
            MoveError::Retry(format!(
                "cannot give the partition back before knowing whether the target's leaves are attached: {e}"
            ))
        })?;
        let leaf = &job.leaves[0];
        target.attached(&leaf.table, &leaf.name).await
    }

    /// Undoes a cutover that has not flipped: source leaves attached again,
    /// target leaves detached, the partition `moving` again.
    async fn give_back(&mut self) -> Result<(), MoveError> {
        let map = self.ctx().store.load().await?.map;
        let job = self.job.job.clone();
        if is_switched(&map, &job) {
            return Err(MoveError::Fatal(
                "the partition was already switched; the move can only go forward".into(),
            ));
        }
        if !job.leaves.is_empty() {
            let source = self.connect(&job.from).await?;
            source
                .attach(&self.leaves(), self.ctx().config.lock_timeout())
                .await?;
            if let Ok(target) = self.connect(&job.to).await {
                target
                    .detach(&self.leaf_pairs(), self.ctx().config.lock_timeout())
                    .await?;
            }
        }
        self.update_map(|map| {
            let assignment = assignment_mut(map, job.partition)?;
            match &assignment.state {
                PartitionState::Blocked { job: id } if *id == job.id => {
                    assignment.state = PartitionState::Moving {
                        job: job.id.clone(),
                    };
                    Ok(Some(Change::new(
                        "move-unblock",
                        format!(
                            "partition {} given back to {} (job {})",
                            job.partition, job.from, job.id
                        ),
                    )))
                }
                _ => Ok(None),
            }
        })
        .await?;
        Ok(())
    }

    async fn roll_back(&mut self) -> Result<(), MoveError> {
        let map = self.ctx().store.load().await?.map;
        let job = self.job.job.clone();
        if is_switched(&map, &job) {
            // Switched before the rollback began (a crash between the flip
            // and recording it): finish the move instead.
            return self.advance(Phase::Verifying).await;
        }
        let name = job.object_name();
        if self.target_attached().await? {
            warn!(job = %job.id, "the target's leaves are attached already: finishing the move instead of rolling it back");
            self.job.job.rollback_to = None;
            return self.advance(Phase::Switching).await;
        }
        if !job.leaves.is_empty() {
            let source = self.connect(&job.from).await?;
            // The source must serve again before the partition is released.
            source
                .attach(&self.leaves(), self.ctx().config.lock_timeout())
                .await?;
            let target = self.connect(&job.to).await;
            if let Ok(target) = &target {
                target
                    .detach(&self.leaf_pairs(), self.ctx().config.lock_timeout())
                    .await?;
            }
            self.release_partition().await?;
            let target = target?;
            target.drop_subscription(&name, true).await?;
            source.drop_slot(&name).await?;
            source.drop_publication(&name).await?;
            target.drop_detached(&self.leaf_pairs()).await?;
        } else {
            self.release_partition().await?;
        }
        let end = job.rollback_to.unwrap_or(Phase::Failed);
        let error = self.job.job.last_error.take();
        self.advance_noting(end, error).await
    }

    /// The partition back to `serving` on its source.
    async fn release_partition(&self) -> Result<(), MoveError> {
        let job = self.job.job.clone();
        self.update_map(|map| {
            let assignment = assignment_mut(map, job.partition)?;
            match &assignment.state {
                PartitionState::Blocked { job: id } | PartitionState::Moving { job: id }
                    if *id == job.id =>
                {
                    assignment.state = PartitionState::Serving;
                    Ok(Some(Change::new(
                        "move-release",
                        format!(
                            "partition {} stays on {} (job {} rolled back)",
                            job.partition, job.from, job.id
                        ),
                    )))
                }
                _ => Ok(None),
            }
        })
        .await?;
        Ok(())
    }
}

/// The assignment of `partition`, for a map edit.
fn assignment_mut(
    map: &mut ClusterMap,
    partition: u32,
) -> Result<&mut shardmap::Assignment, MoveError> {
    map.assignments
        .get_mut(partition as usize)
        .ok_or_else(|| MoveError::Fatal(format!("partition {partition} is not in the map")))
}

/// Whether the map already names the job's target as the owner.
fn is_switched(map: &ClusterMap, job: &shardmap::Job) -> bool {
    map.assignments
        .get(job.partition as usize)
        .is_some_and(|a| a.owner == job.to)
}
