//! Prometheus metrics of a rebalancer daemon: atomics bumped by the daemon,
//! encoded by `prometheus-client` and served at `GET /metrics` when
//! `metrics_listen` is set.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

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
    /// Dead proxies' prepared transactions committed / rolled back by recovery.
    pub twophase_committed: AtomicU64,
    pub twophase_rolled_back: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }

    /// The metrics as OpenMetrics text.
    pub fn render(self: &Arc<Self>) -> String {
        telemetry::encode(self.clone())
    }
}

type Field = fn(&Metrics) -> &AtomicU64;

/// Name, help and field of each gauge.
const GAUGES: [(&str, &str, Field); 3] = [
    (
        "shardline_rebalancer_leader",
        "1 while this daemon leads.",
        |m| &m.leader,
    ),
    (
        "shardline_rebalancer_jobs_running",
        "Move jobs this daemon runs now.",
        |m| &m.jobs_running,
    ),
    (
        "shardline_rebalancer_last_blocked_milliseconds",
        "How long the last cutover blocked its partition.",
        |m| &m.last_blocked_ms,
    ),
];

/// Name (the encoder adds `_total`), help and field of each counter.
const COUNTERS: [(&str, &str, Field); 7] = [
    ("shardline_rebalancer_moves_done", "Moves finished.", |m| {
        &m.moves_done
    }),
    (
        "shardline_rebalancer_moves_failed",
        "Moves that failed.",
        |m| &m.moves_failed,
    ),
    (
        "shardline_rebalancer_moves_cancelled",
        "Moves cancelled and rolled back.",
        |m| &m.moves_cancelled,
    ),
    (
        "shardline_rebalancer_cutovers_given_back",
        "Cutovers that gave the partition back to its source to retry later.",
        |m| &m.cutovers_given_back,
    ),
    (
        "shardline_rebalancer_bytes_moved",
        "Bytes of the partitions moved.",
        |m| &m.bytes_moved,
    ),
    (
        "shardline_rebalancer_twophase_committed",
        "Prepared transactions of dead proxies committed by recovery (their decision record said commit).",
        |m| &m.twophase_committed,
    ),
    (
        "shardline_rebalancer_twophase_rolled_back",
        "Prepared transactions of dead proxies rolled back by recovery (no commit record: presumed abort).",
        |m| &m.twophase_rolled_back,
    ),
];

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let value = |field: Field| field(self).load(Ordering::Relaxed);
        for (name, help, field) in GAUGES {
            telemetry::gauge(&mut encoder, name, help, None, value(field) as f64)?;
        }
        for (name, help, field) in COUNTERS {
            telemetry::counter(&mut encoder, name, help, value(field))?;
        }
        Ok(())
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
        let metrics = Arc::new(Metrics::default());
        Metrics::add(&metrics.moves_done, 3);
        Metrics::set(&metrics.leader, 1);
        let text = metrics.render();
        assert!(
            text.contains("shardline_rebalancer_moves_done_total 3"),
            "{text}"
        );
        assert!(text.contains("shardline_rebalancer_leader 1"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 10);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
