//! Progress shown while shardctl waits: one bar per move job for `--wait`,
//! and the startup bar of `dev up`. Bars go to stderr (indicatif's default),
//! so `--json` output on stdout stays clean.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use shardmap::jobs::Job;
use shardmap::store::now_unix_ms;
use shardmap::{JobStore, Phase};

use crate::output::human_bytes;

/// How often the job records are read again while following.
const POLL: Duration = Duration::from_millis(250);

/// Follows jobs until all are terminal, with one progress bar each when
/// `bars` (hidden otherwise); returns the jobs as they ended.
pub async fn follow(jobs: &JobStore, submitted: &[Job], bars: bool) -> Result<Vec<Job>> {
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
                bail!(
                    "job {} disappeared (was it pruned?): see `shardctl status --all`",
                    job.id
                );
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
        tokio::time::sleep(POLL).await;
    }
}

/// The bar of `dev up`: a spinner with elapsed time and one step per
/// process started.
pub fn startup_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Rough overall progress of a job, for its bar: the copy is most of a
/// move's time, the phases around it little.
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

/// The phase and what is worth knowing about it, next to the bar.
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
