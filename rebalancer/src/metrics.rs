//! Prometheus metrics of a rebalancer daemon, served as text at
//! `GET /metrics` when `metrics_listen` is set.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

#[derive(Debug, Default)]
pub struct Metrics {
    /// 1 while this daemon is the leader.
    pub leader: AtomicU64,
    /// Jobs this daemon is running now.
    pub jobs_running: AtomicU64,
    pub moves_done: AtomicU64,
    pub moves_failed: AtomicU64,
    pub moves_cancelled: AtomicU64,
    /// Cutovers given back to the source (to be retried).
    pub cutovers_given_back: AtomicU64,
    /// Bytes of the partitions moved (their size at the start of the move).
    pub bytes_moved: AtomicU64,
    /// How long the last cutover blocked its partition.
    pub last_blocked_ms: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let mut line = |name: &str, kind: &str, help: &str, value: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        };
        line(
            "shardline_rebalancer_leader",
            "gauge",
            "1 while this daemon leads.",
            &self.leader,
        );
        line(
            "shardline_rebalancer_jobs_running",
            "gauge",
            "Move jobs this daemon runs now.",
            &self.jobs_running,
        );
        line(
            "shardline_rebalancer_moves_done_total",
            "counter",
            "Moves finished.",
            &self.moves_done,
        );
        line(
            "shardline_rebalancer_moves_failed_total",
            "counter",
            "Moves that failed.",
            &self.moves_failed,
        );
        line(
            "shardline_rebalancer_moves_cancelled_total",
            "counter",
            "Moves cancelled and rolled back.",
            &self.moves_cancelled,
        );
        line(
            "shardline_rebalancer_cutovers_given_back_total",
            "counter",
            "Cutovers that gave the partition back to its source to retry later.",
            &self.cutovers_given_back,
        );
        line(
            "shardline_rebalancer_bytes_moved_total",
            "counter",
            "Bytes of the partitions moved.",
            &self.bytes_moved,
        );
        line(
            "shardline_rebalancer_last_blocked_milliseconds",
            "gauge",
            "How long the last cutover blocked its partition.",
            &self.last_blocked_ms,
        );
        out
    }
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    telemetry::serve(listener, move || metrics.render()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.moves_done, 3);
        Metrics::set(&metrics.leader, 1);
        let text = metrics.render();
        assert!(
            text.contains("shardline_rebalancer_moves_done_total 3"),
            "{text}"
        );
        assert!(text.contains("shardline_rebalancer_leader 1"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 8);
    }
}
