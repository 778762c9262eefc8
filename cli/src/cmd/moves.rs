//! `shardctl move`, `rebalance`, `drain` and `cancel`: write move jobs to
//! etcd (or ask to cancel one); the rebalancer leader runs them. `--wait`
//! follows the jobs (see [`crate::progress`]) until they finish.

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use rebalancer::pg::partition_sizes;
use rebalancer::planner::{self, Balance, PlannedMove};
use serde::Serialize;
use shardmap::jobs::Job;
use shardmap::{Change, ClusterMap, JobStore, PartitionState, Phase, ServerState};

use crate::context::Context;
use crate::output::{human_bytes, print_json, table as new_table};
use crate::progress;

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

/// What `rebalance` and `drain` do with the moves they plan.
#[derive(Debug, Clone, Copy, Args)]
pub struct PlanOptions {
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the jobs until they finish.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub plan: PlanOptions,
    /// Balance bytes (leaf sizes) or partition counts.
    #[arg(long, value_enum, default_value = "bytes")]
    pub by: By,
    /// Accepted spread between servers, as a fraction of the mean load.
    #[arg(long, default_value_t = 0.05)]
    pub tolerance: f64,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    pub server: String,
    #[command(flatten)]
    pub plan: PlanOptions,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub job: String,
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
pub(crate) async fn busy_partitions(jobs: &JobStore) -> Result<Vec<(u32, String)>> {
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
    let jobs = context.job_store().await?;
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
        Balance::Bytes => partition_sizes(&map, &context.credentials()?).await?,
        Balance::Count => vec![0; map.partitions as usize],
    };
    let moves = planner::plan(&map, &sizes, balance, args.tolerance).map_err(anyhow::Error::msg)?;
    submit_plan(context, &map, &sizes, moves, args.plan, "rebalance").await
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
        if args.plan.dry_run {
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
    let sizes = partition_sizes(&map, &context.credentials()?).await?;
    let moves: Vec<PlannedMove> = planner::plan(&map, &sizes, Balance::Bytes, 1.0)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|m| m.from == args.server)
        .collect();
    submit_plan(context, &map, &sizes, moves, args.plan, "drain").await
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

async fn submit_plan(
    context: &Context,
    map: &ClusterMap,
    sizes: &[u64],
    moves: Vec<PlannedMove>,
    options: PlanOptions,
    reason: &str,
) -> Result<()> {
    let PlanOptions { dry_run, wait } = options;
    let jobs = if dry_run {
        None
    } else {
        Some(context.job_store().await?)
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
    let finished = progress::follow(jobs, &submitted, !context.json).await?;
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

pub async fn cancel(context: &Context, args: CancelArgs) -> Result<()> {
    let jobs = context.job_store().await?;
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
