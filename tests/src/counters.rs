//! A load of counters through a proxy, for tests of availability: each
//! worker owns one user id and increments its `n`, reading it back after
//! every increment, so a read that misses an acknowledged increment (a stale
//! copy, or no row at all) is caught. Every fourth round runs as an explicit
//! transaction in the simple protocol; the others are single statements in
//! the extended protocol.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

/// What one worker saw.
#[derive(Debug, Default)]
pub struct CounterReport {
    pub user: i64,
    /// Increments acknowledged to the worker.
    pub acked: i64,
    /// Statements refused with a SQLSTATE the test allowed.
    pub refused: u64,
    /// Anything else: errors, wrong row counts, stale reads.
    pub problems: Vec<String>,
    /// `(when it started, milliseconds)` of each single-statement increment.
    pub latencies: Vec<(Instant, f64)>,
}

/// Running totals over all workers, readable while they run.
#[derive(Debug, Default)]
struct Progress {
    acked: AtomicU64,
    refused: AtomicU64,
}

/// Workers running until `stop`.
pub struct CounterLoad {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    tasks: Vec<tokio::task::JoinHandle<CounterReport>>,
}

impl CounterLoad {
    /// One worker per `(client, user)`; errors whose SQLSTATE is in
    /// `allowed` count as refusals, any other is a problem. Each user's row
    /// must exist with `n = 0`.
    pub fn start(
        workers: Vec<(tokio_postgres::Client, i64)>,
        allowed: &'static [&'static str],
    ) -> CounterLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let tasks = workers
            .into_iter()
            .map(|(client, user)| {
                let (stop, progress) = (stop.clone(), progress.clone());
                tokio::spawn(async move { run(client, user, allowed, stop, progress).await })
            })
            .collect();
        CounterLoad {
            stop,
            progress,
            tasks,
        }
    }

    /// Increments acknowledged so far, over all workers.
    pub fn acked(&self) -> u64 {
        self.progress.acked.load(Ordering::SeqCst)
    }

    /// Statements refused so far (with an allowed SQLSTATE).
    pub fn refused(&self) -> u64 {
        self.progress.refused.load(Ordering::SeqCst)
    }

    pub async fn stop(self) -> Vec<CounterReport> {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for task in self.tasks {
            reports.push(task.await.expect("counter worker"));
        }
        reports
    }
}

// `is_multiple_of` is newer than the workspace's rust-version (1.80).
#[allow(clippy::manual_is_multiple_of)]
async fn run(
    client: tokio_postgres::Client,
    user: i64,
    allowed: &'static [&'static str],
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> CounterReport {
    let mut report = CounterReport {
        user,
        ..CounterReport::default()
    };
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        let acked = report.acked;
        let result = if round % 4 == 0 {
            transaction(&client, user, &mut report).await
        } else {
            single(&client, user, &mut report).await
        };
        if let Err(e) = result {
            match e.code().map(|c| c.code()) {
                Some(code) if allowed.contains(&code) => {
                    report.refused += 1;
                    progress.refused.fetch_add(1, Ordering::SeqCst);
                }
                _ => report.problems.push(format!("user {user}: {e}")),
            }
            // Leave no transaction open after a failure.
            let _ = client.batch_execute("ROLLBACK").await;
        }
        progress
            .acked
            .fetch_add((report.acked - acked) as u64, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report
}

async fn single(
    client: &tokio_postgres::Client,
    user: i64,
    report: &mut CounterReport,
) -> Result<(), tokio_postgres::Error> {
    let started = Instant::now();
    let updated = client
        .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&user])
        .await?;
    report
        .latencies
        .push((started, started.elapsed().as_secs_f64() * 1000.0));
    if updated != 1 {
        report
            .problems
            .push(format!("user {user}: an increment updated {updated} rows"));
        return Ok(());
    }
    report.acked += 1;
    let row = client
        .query_opt("SELECT n FROM users WHERE id = $1", &[&user])
        .await?;
    let n: Option<i64> = row.map(|r| r.get(0));
    if n != Some(report.acked) {
        report.problems.push(format!(
            "user {user}: read n = {n:?} after {} acknowledged increments",
            report.acked
        ));
    }
    Ok(())
}

async fn transaction(
    client: &tokio_postgres::Client,
    user: i64,
    report: &mut CounterReport,
) -> Result<(), tokio_postgres::Error> {
    client.simple_query("BEGIN").await?;
    let updated = client
        .simple_query(&format!("UPDATE users SET n = n + 1 WHERE id = {user}"))
        .await?
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(n),
            _ => None,
        });
    let read = client
        .simple_query(&format!("SELECT n FROM users WHERE id = {user}"))
        .await?
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<i64>().ok()),
            _ => None,
        });
    client.simple_query("COMMIT").await?;
    if updated != Some(1) {
        report.problems.push(format!(
            "user {user}: an increment in a transaction updated {updated:?} rows"
        ));
        return Ok(());
    }
    report.acked += 1;
    if read != Some(report.acked) {
        report.problems.push(format!(
            "user {user}: read n = {read:?} in a transaction after {} acknowledged increments",
            report.acked
        ));
    }
    Ok(())
}
