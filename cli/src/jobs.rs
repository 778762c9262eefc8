//! The move commands: move, rebalance, drain, status, cancel. They write job
//! records to etcd; the rebalancer leader runs them. `--wait` follows the
//! jobs with progress bars until they finish.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rebalancer::pg::{partition_sizes, Pg};
use rebalancer::planner::{self, Balance, PlannedMove};
use serde::Serialize;
use shardmap::jobs::Job;
use shardmap::store::now_unix_ms;
use shardmap::{Change, ClusterMap, JobStore, PartitionState, Phase, ServerState};

use crate::commands::Context;
use crate::output::{print_json, table as new_table};

/// Assumed copy rate for estimates before a job has its own (bytes/s).
const ESTIMATED_RATE: f64 = 50.0 * 1024.0 * 1024.0;

#[derive(Debug, Args)]
pub struct MoveArgs {
    pub partition: u32,
    /// The server to move it to.
    #[arg(long)]
    pub to: String,
    /// Follow the job until it finishes.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum By {
    Bytes,
    Count,
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Print the plan without submitting it.
    #[arg(long)]
    pub dry_run: bool,
    /// Balance bytes (leaf sizes) or partition counts.
    #[arg(long, value_enum, default_value = "bytes")]
    pub by: By,
    /// Accepted spread between servers, as a fraction of the mean load.
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
    /// Follow the jobs until they finish.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    pub server: String,
    /// Print the plan without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the jobs until they finish.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Also list finished jobs.
    #[arg(long)]
    pub all: bool,
    /// Delete the records of finished jobs.
    #[arg(long)]
    pub prune: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub job: String,
}

async fn job_store(context: &Context) -> Result<JobStore> {
    let settings = context.settings()?;
    let client = shardmap::store::connect(&settings.endpoints)
        .await
        .with_context(|| format!("cannot connect to etcd at {}", settings.endpoints.join(",")))?;
    Ok(JobStore::new(client, &settings.cluster))
}

/// Refuses a move the rebalancer would refuse anyway, with a clear reason.
fn check_move(map: &ClusterMap, partition: u32, to: &str) -> Result<String> {
    let assignment = map.assignments.get(partition as usize).ok_or_else(|| {
        anyhow!(
            "partition {partition} does not exist (the cluster has {})",
            map.partitions
        )
    })?;
    let server = map
        .servers
        .get(to)
        .ok_or_else(|| anyhow!("no server named {to:?}: see `shardctl server list`"))?;
    if server.state != ServerState::Active {
        bail!(
            "server {to} is {}; moves only go to active servers",
            server.state
        );
    }
    if assignment.owner == to {
        bail!("partition {partition} is already on {to}");
    }
    if assignment.state != PartitionState::Serving {
        bail!(
            "partition {partition} is {}: wait for that job (`shardctl status`)",
            assignment.state
        );
    }
    if let Some(region) = &assignment.region {
        if server.region.as_deref() != Some(region.as_str()) {
            bail!("partition {partition} is pinned to region {region}; {to} is not in it");
        }
    }
    Ok(assignment.owner.clone())
}

/// Partitions that already have an unfinished job.
async fn busy_partitions(jobs: &JobStore) -> Result<Vec<(u32, String)>> {
    Ok(jobs
        .list()
        .await?
        .into_iter()
        .filter(|j| !j.job.phase.is_terminal())
        .map(|j| (j.job.partition, j.job.id))
        .collect())
}

pub async fn move_partition(context: &Context, args: MoveArgs) -> Result<()> {
    let map = context.store().await?.load().await?.map;
    let from = check_move(&map, args.partition, &args.to)?;
    let jobs = job_store(context).await?;
    if let Some((_, id)) = busy_partitions(&jobs)
        .await?
        .into_iter()
        .find(|(p, _)| *p == args.partition)
    {
        bail!(
            "partition {} already has job {id}: see `shardctl status`",
            args.partition
        );
    }
    let job = Job::new(args.partition, &from, &args.to, "move");
    jobs.create(&job).await?;
    if !context.json {
        println!(
            "job {} submitted: partition {} {from} -> {}",
            job.id, args.partition, args.to
        );
    }
    finish_submission(context, &jobs, vec![job], args.wait).await
}

pub async fn rebalance(context: &Context, args: RebalanceArgs) -> Result<()> {
    let map = context.store().await?.load().await?.map;
    let balance = match args.by {
        By::Bytes => Balance::Bytes,
        By::Count => Balance::Count,
    };
    let sizes = match balance {
        Balance::Bytes => partition_sizes(&map, &context.credentials).await?,
        Balance::Count => vec![0; map.partitions as usize],
    };
    let moves = planner::plan(&map, &sizes, balance, args.tolerance).map_err(anyhow::Error::msg)?;
    submit_plan(
        context,
        &map,
        &sizes,
        moves,
        args.dry_run,
        args.wait,
        "rebalance",
    )
    .await
}

pub async fn drain(context: &Context, args: DrainArgs) -> Result<()> {
    let store = context.store().await?;
    let mut map = store.load().await?.map;
    let server = map.servers.get(&args.server).ok_or_else(|| {
        anyhow!(
            "no server named {:?}: see `shardctl server list`",
            args.server
        )
    })?;
    if server.state != ServerState::Draining {
        if args.dry_run {
            map.servers
                .get_mut(&args.server)
                .ok_or_else(|| anyhow!("server vanished"))?
                .state = ServerState::Draining;
        } else {
            let name = args.server.clone();
            map = store
                .update(&context.actor, |map| {
                    let server = map.servers.get_mut(&name).ok_or("server vanished")?;
                    server.state = ServerState::Draining;
                    Ok(Change::new("server drain", name.clone()))
                })
                .await?
                .map;
        }
    }
    let sizes = partition_sizes(&map, &context.credentials).await?;
    let moves: Vec<PlannedMove> = planner::plan(&map, &sizes, Balance::Bytes, 1.0)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|m| m.from == args.server)
        .collect();
    submit_plan(
        context,
        &map,
        &sizes,
        moves,
        args.dry_run,
        args.wait,
        "drain",
    )
    .await
}

#[derive(Serialize)]
struct PlanRow<'a> {
    partition: u32,
    from: &'a str,
    to: &'a str,
    bytes: u64,
    estimated_seconds: u64,
    reason: &'a str,
    job: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn submit_plan(
    context: &Context,
    map: &ClusterMap,
    sizes: &[u64],
    moves: Vec<PlannedMove>,
    dry_run: bool,
    wait: bool,
    reason: &str,
) -> Result<()> {
    let jobs = if dry_run {
        None
    } else {
        Some(job_store(context).await?)
    };
    let busy = match &jobs {
        Some(jobs) => busy_partitions(jobs).await?,
        None => Vec::new(),
    };
    let mut submitted = Vec::new();
    let mut rows = Vec::new();
    for m in &moves {
        let mut job_id = None;
        if let Some(jobs) = &jobs {
            if !busy.iter().any(|(p, _)| *p == m.partition) {
                let job = Job::new(m.partition, &m.from, &m.to, reason);
                jobs.create(&job).await?;
                job_id = Some(job.id.clone());
                submitted.push(job);
            }
        }
        rows.push(PlanRow {
            partition: m.partition,
            from: &m.from,
            to: &m.to,
            bytes: m.bytes,
            estimated_seconds: (m.bytes as f64 / ESTIMATED_RATE).ceil() as u64,
            reason: m.reason,
            job: job_id,
        });
    }
    if context.json && (dry_run || !wait) {
        return print_json(&rows);
    }
    if !context.json {
        if rows.is_empty() {
            println!("nothing to move: the servers are balanced within the tolerance");
        } else {
            let mut out = new_table(&[
                "partition",
                "from",
                "to",
                "bytes",
                "est. time",
                "reason",
                "job",
            ]);
            for row in &rows {
                out.add_row(vec![
                    row.partition.to_string(),
                    row.from.to_string(),
                    row.to.to_string(),
                    human_bytes(row.bytes),
                    format!("{}s", row.estimated_seconds),
                    row.reason.to_string(),
                    row.job.clone().unwrap_or_else(|| {
                        if dry_run {
                            "(dry run)".into()
                        } else {
                            "(busy)".into()
                        }
                    }),
                ]);
            }
            println!("{out}");
            let after = planner::loads_after(map, sizes, &moves);
            let summary: Vec<String> = after
                .iter()
                .map(|(s, b)| format!("{s} {}", human_bytes(*b)))
                .collect();
            println!("{} moves; sizes after: {}", moves.len(), summary.join(", "));
        }
    }
    match jobs {
        Some(jobs) => finish_submission(context, &jobs, submitted, wait).await,
        None => Ok(()),
    }
}

async fn finish_submission(
    context: &Context,
    jobs: &JobStore,
    submitted: Vec<Job>,
    wait: bool,
) -> Result<()> {
    if !wait {
        if context.json {
            return print_json(&submitted);
        }
        return Ok(());
    }
    let finished = follow(jobs, &submitted, !context.json).await?;
    if context.json {
        return print_json(&finished);
    }
    let failed: Vec<&Job> = finished.iter().filter(|j| j.phase != Phase::Done).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} moves did not finish: {}",
            failed.len(),
            finished.len(),
            failed
                .iter()
                .map(|j| format!(
                    "{} {} ({})",
                    j.id,
                    j.phase,
                    j.last_error.clone().unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    println!("{} moves done", finished.len());
    Ok(())
}

/// Follows jobs with one progress bar each until all are terminal.
async fn follow(jobs: &JobStore, submitted: &[Job], bars: bool) -> Result<Vec<Job>> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>24} [{bar:30}] {percent:>3}% {msg}")
        .map_err(|e| anyhow!("progress style: {e}"))?
        .progress_chars("=> ");
    let progress: Vec<ProgressBar> = submitted
        .iter()
        .map(|job| {
            let bar = if bars {
                multi.add(ProgressBar::new(100))
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(style.clone());
            bar.set_prefix(format!("p{} {}->{}", job.partition, job.from, job.to));
            bar
        })
        .collect();
    loop {
        let mut finished = Vec::new();
        for (job, bar) in submitted.iter().zip(&progress) {
            let Some(stored) = jobs.get(&job.id).await? else {
                bail!("job {} disappeared", job.id);
            };
            let job = stored.job;
            bar.set_position(percent(&job));
            bar.set_message(describe(&job));
            if job.phase.is_terminal() {
                bar.finish();
                finished.push(job);
            }
        }
        if finished.len() == submitted.len() {
            return Ok(finished);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Rough overall progress of a job, for its bar.
fn percent(job: &Job) -> u64 {
    let copied = if job.progress.bytes_total == 0 {
        1.0
    } else {
        (job.progress.bytes_copied as f64 / job.progress.bytes_total as f64).min(1.0)
    };
    match job.phase {
        Phase::Pending => 0,
        Phase::Preparing => 2,
        Phase::Copying => 5 + (copied * 80.0) as u64,
        Phase::CatchingUp => 86,
        Phase::Blocking | Phase::Fencing | Phase::Syncing | Phase::Switching => 90,
        Phase::Verifying => 95,
        Phase::CleaningUp => 98,
        _ => 100,
    }
}

fn describe(job: &Job) -> String {
    let mut text = job.phase.to_string();
    if job.phase == Phase::Copying {
        text.push_str(&format!(
            " {}/{}",
            human_bytes(job.progress.bytes_copied),
            human_bytes(job.progress.bytes_total)
        ));
        if let Some(eta) = job.progress.eta_seconds(now_unix_ms()) {
            text.push_str(&format!(" eta {eta}s"));
        }
    }
    if job.phase == Phase::CatchingUp {
        text.push_str(&format!(" lag {}", human_bytes(job.progress.lag_bytes)));
    }
    if let Some(ms) = job.blocked_ms {
        text.push_str(&format!(" (held {ms} ms)"));
    }
    if let Some(error) = &job.last_error {
        text.push_str(&format!(" — {error}"));
    }
    text
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[derive(Serialize)]
struct StatusReport {
    leader: Option<String>,
    jobs: Vec<Job>,
    /// Replication objects of shardline moves that no unfinished job owns.
    orphans: Vec<Orphan>,
    unreachable: Vec<String>,
}

#[derive(Serialize)]
struct Orphan {
    server: String,
    kind: String,
    name: String,
}

pub async fn status(context: &Context, args: StatusArgs) -> Result<()> {
    let settings = context.settings()?;
    let client = shardmap::store::connect(&settings.endpoints)
        .await
        .with_context(|| format!("cannot connect to etcd at {}", settings.endpoints.join(",")))?;
    let jobs = JobStore::new(client.clone(), &settings.cluster);
    let keys = shardmap::store::EtcdPaths::new(&settings.cluster);
    let leader = rebalancer::leader::current_leader(&client, &keys.election()).await?;
    let all = jobs.list().await?;
    if args.prune {
        let mut pruned = 0;
        for stored in all.iter().filter(|j| j.job.phase.is_terminal()) {
            jobs.delete(&stored.job.id).await?;
            pruned += 1;
        }
        if !context.json {
            println!("{pruned} finished jobs pruned");
        }
    }
    let active_names: Vec<String> = all
        .iter()
        .filter(|j| !j.job.phase.is_terminal())
        .map(|j| j.job.object_name())
        .collect();
    let map = context.store().await?.load().await?.map;
    let mut orphans = Vec::new();
    let mut unreachable = Vec::new();
    for server in map.servers.values() {
        match Pg::connect(server, &context.credentials, "shardctl").await {
            Ok(pg) => {
                for (kind, name) in pg.leftovers().await? {
                    if !active_names.iter().any(|n| name.starts_with(n.as_str())) {
                        orphans.push(Orphan {
                            server: server.name.clone(),
                            kind,
                            name,
                        });
                    }
                }
            }
            Err(e) => unreachable.push(format!("{}: {e}", server.name)),
        }
    }
    let shown: Vec<Job> = all
        .into_iter()
        .map(|j| j.job)
        .filter(|j| args.all || !j.phase.is_terminal())
        .collect();
    if context.json {
        return print_json(&StatusReport {
            leader,
            jobs: shown,
            orphans,
            unreachable,
        });
    }
    match &leader {
        Some(id) => println!("rebalancer leader: {id}"),
        None => println!(
            "rebalancer leader: none (start shardline-rebalancer; jobs wait until one runs)"
        ),
    }
    if shown.is_empty() {
        println!("no {}jobs", if args.all { "" } else { "unfinished " });
    } else {
        let mut out = new_table(&[
            "job",
            "partition",
            "from",
            "to",
            "phase",
            "copied",
            "lag",
            "eta",
            "held",
            "note",
        ]);
        let now = now_unix_ms();
        for job in &shown {
            out.add_row(vec![
                job.id.clone(),
                job.partition.to_string(),
                job.from.clone(),
                job.to.clone(),
                job.phase.to_string(),
                format!(
                    "{}/{}",
                    human_bytes(job.progress.bytes_copied),
                    human_bytes(job.progress.bytes_total)
                ),
                human_bytes(job.progress.lag_bytes),
                job.progress
                    .eta_seconds(now)
                    .filter(|_| job.phase == Phase::Copying)
                    .map_or("-".into(), |s| format!("{s}s")),
                job.blocked_ms.map_or("-".into(), |ms| format!("{ms} ms")),
                job.last_error
                    .clone()
                    .or(job.verify_note.clone())
                    .unwrap_or_default(),
            ]);
        }
        println!("{out}");
    }
    for orphan in &orphans {
        println!(
            "warning: {} {} on {} belongs to no unfinished job{}",
            orphan.kind,
            orphan.name,
            orphan.server,
            if orphan.kind == "slot" {
                " (it keeps WAL on that server: drop it)"
            } else {
                ""
            }
        );
    }
    for server in &unreachable {
        println!("warning: cannot check {server}");
    }
    Ok(())
}

pub async fn cancel(context: &Context, args: CancelArgs) -> Result<()> {
    let jobs = job_store(context).await?;
    let stored = jobs.request_cancel(&args.job).await?;
    if context.json {
        return print_json(&stored.job);
    }
    println!(
        "cancel requested for job {} (now {}); the rebalancer rolls it back",
        stored.job.id, stored.job.phase
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GB");
    }
}
