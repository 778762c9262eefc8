//! `shardctl prune`: deletes the records of finished move jobs (done,
//! failed, cancelled) from etcd. Finished jobs are kept until then so that
//! `status --all` and `history` can explain what happened; unfinished jobs
//! are never touched.

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::context::Context;
use crate::output::print_json;

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// List the jobs that would be deleted, and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Serialize)]
struct PruneReport {
    dry_run: bool,
    /// Ids of the finished jobs deleted (or, with --dry-run, to be deleted).
    jobs: Vec<String>,
}

pub async fn prune(context: &Context, args: PruneArgs) -> Result<()> {
    let jobs = context.job_store().await?;
    let finished: Vec<String> = jobs
        .list()
        .await?
        .into_iter()
        .filter(|stored| stored.job.phase.is_terminal())
        .map(|stored| stored.job.id)
        .collect();
    if !args.dry_run {
        for id in &finished {
            jobs.delete(id).await?;
        }
    }
    if context.json {
        return print_json(&PruneReport {
            dry_run: args.dry_run,
            jobs: finished,
        });
    }
    let verb = if args.dry_run {
        "would prune"
    } else {
        "pruned"
    };
    match finished.len() {
        0 => println!("no finished jobs to prune"),
        n => println!("{verb} {n} finished jobs: {}", finished.join(", ")),
    }
    Ok(())
}
