//! `shardctl status`: move jobs (phase, bytes copied, lag, ETA), the
//! rebalancer leader, and replication objects on the servers that no
//! unfinished job owns (a leftover slot keeps WAL forever), servers that
//! refuse two-phase commit, and prepared transactions of shardline still
//! waiting on a server. Read-only:
//! `shardctl prune` deletes finished jobs.

use anyhow::{bail, Result};
use clap::Args;
use rebalancer::pg::Pg;
use serde::Serialize;
use shardmap::jobs::Job;
use shardmap::store::{now_unix_ms, EtcdPaths};
use shardmap::{JobStore, Phase};

use crate::cmd::servers::two_phase_warning;
use crate::context::Context;
use crate::output::{human_bytes, print_json, table as new_table};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Also list finished jobs.
    #[arg(long)]
    pub all: bool,
    /// Replaced by `shardctl prune` (kept hidden only to say so).
    #[arg(long, hide = true)]
    pub prune: bool,
}

#[derive(Serialize)]
struct StatusReport {
    leader: Option<String>,
    jobs: Vec<Job>,
    /// Replication objects of shardline moves that no unfinished job owns.
    orphans: Vec<Orphan>,
    unreachable: Vec<String>,
    /// Servers whose `max_prepared_transactions` is 0 (no two-phase commit).
    two_phase_disabled: Vec<String>,
    /// Servers holding prepared transactions of shardline.
    prepared: Vec<Prepared>,
}

#[derive(Serialize)]
struct Prepared {
    server: String,
    count: i64,
    oldest_seconds: i64,
}

#[derive(Serialize)]
struct Orphan {
    server: String,
    kind: String,
    name: String,
}

pub async fn status(context: &Context, args: StatusArgs) -> Result<()> {
    if args.prune {
        bail!("`status --prune` is now its own command: run `shardctl prune`");
    }
    let (client, settings) = context.etcd().await?;
    let jobs = JobStore::new(client.clone(), &settings.cluster);
    let election = EtcdPaths::new(&settings.cluster).election();
    let leader = rebalancer::leader::current_leader(&client, &election).await?;
    let all = jobs.list().await?;
    let active_names: Vec<String> = all
        .iter()
        .filter(|j| !j.job.phase.is_terminal())
        .map(|j| j.job.object_name())
        .collect();
    let map = context.store().await?.load().await?.map;
    let mut orphans = Vec::new();
    let mut unreachable = Vec::new();
    let mut two_phase_disabled = Vec::new();
    let mut prepared = Vec::new();
    let credentials = context.credentials()?;
    for server in map.servers.values() {
        match Pg::connect(server, &credentials, "shardctl").await {
            Ok(pg) => {
                if pg.max_prepared_transactions().await? == 0 {
                    two_phase_disabled.push(server.name.clone());
                }
                let (count, oldest_seconds) = pg.shardline_prepared().await?;
                if count > 0 {
                    prepared.push(Prepared {
                        server: server.name.clone(),
                        count,
                        oldest_seconds,
                    });
                }
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
            two_phase_disabled,
            prepared,
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
    for server in &two_phase_disabled {
        println!("{}", two_phase_warning(server));
    }
    for p in &prepared {
        println!(
            "{}: {} prepared transaction(s) of shardline, the oldest {}s old{}",
            p.server,
            p.count,
            p.oldest_seconds,
            if p.oldest_seconds > 60 {
                " (in doubt: their proxy is still registered, or no rebalancer leader runs recovery)"
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
