//! What Prometheus sees at `GET /metrics` of a proxy: the counters of every
//! serving thread summed, connected clients, the map version in use and the
//! backend pools, encoded by `prometheus-client` (OpenMetrics text). It
//! sits above the serving threads' contexts and reads them only when
//! scraped: nothing on the request path calls into here.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use tokio::net::TcpListener;

use crate::context::Shared;
use crate::metrics::{Metrics, HOLD_BUCKETS_MS};

/// The serving threads' metrics, read at each scrape.
struct ProxyCollector {
    threads: Vec<Arc<Shared>>,
}

impl fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyCollector")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl ProxyCollector {
    fn sum(&self, counter: impl Fn(&Metrics) -> &AtomicU64) -> u64 {
        self.threads
            .iter()
            .map(|t| counter(&t.metrics).load(Ordering::Relaxed))
            .sum()
    }
}

/// The per-thread counters, summed: name (the encoder adds `_total`), help,
/// and where the counter is.
type CounterOf = fn(&Metrics) -> &AtomicU64;
const COUNTERS: [(&str, &str, CounterOf); 22] = [
    ("shardline_logins", "Client logins that succeeded.", |m| &m.logins),
    ("shardline_login_failures", "Client logins refused.", |m| &m.login_failures),
    (
        "shardline_auth_failures",
        "Client logins refused for a wrong password or an unknown user.",
        |m| &m.auth_failures,
    ),
    (
        "shardline_auth_throttled",
        "Client logins refused before authenticating: too many recent failures from their address.",
        |m| &m.auth_throttled,
    ),
    (
        "shardline_requests",
        "Client requests (Query, or extended messages up to Sync).",
        |m| &m.requests,
    ),
    (
        "shardline_route_errors",
        "Requests refused because they could not be routed to one server.",
        |m| &m.route_errors,
    ),
    (
        "shardline_backend_errors",
        "Requests whose server connection failed.",
        |m| &m.backend_errors,
    ),
    (
        "shardline_kept_prepared_runs",
        "Requests whose repeated unnamed statement ran kept prepared on the server (no parse there).",
        |m| &m.kept_prepared_runs,
    ),
    (
        "shardline_stale_plan_retries",
        "Requests sent again unprepared because a kept statement's plan no longer fit its tables.",
        |m| &m.stale_plan_retries,
    ),
    (
        "shardline_writes_unkept_for_rules",
        "Simple-protocol writes not kept prepared because a rule of their database may turn writes into SELECTs (whose rows only a Query returns).",
        |m| &m.writes_unkept_for_rules,
    ),
    (
        "shardline_scatter_reads",
        "Reads that ran on several servers and were merged by the proxy.",
        |m| &m.scatter_reads,
    ),
    (
        "shardline_cross_server_transactions",
        "Transactions that reached a second server.",
        |m| &m.cross_server_transactions,
    ),
    (
        "shardline_ddl_across_servers",
        "DDL statements of sharded or reference tables run on every server.",
        |m| &m.ddl_across_servers,
    ),
    (
        "shardline_reference_writes",
        "Writes to reference tables run on every server.",
        |m| &m.reference_writes,
    ),
    (
        "shardline_two_phase_commits",
        "Transactions over several servers committed with two-phase commit.",
        |m| &m.two_phase_commits,
    ),
    (
        "shardline_two_phase_rollbacks",
        "Two-phase commits rolled back because a server could not prepare or the decision could not be recorded.",
        |m| &m.two_phase_rollbacks,
    ),
    (
        "shardline_two_phase_unknown",
        "Two-phase commits whose decision write to etcd had an unknown outcome (finished by recovery).",
        |m| &m.two_phase_unknown,
    ),
    (
        "shardline_twophase_recovered_commits",
        "Prepared transactions an earlier life of this proxy left, committed at start by their decision record.",
        |m| &m.recovered_commits,
    ),
    (
        "shardline_twophase_recovered_rollbacks",
        "Prepared transactions an earlier life of this proxy left without a commit record, rolled back at start.",
        |m| &m.recovered_rollbacks,
    ),
    (
        "shardline_owner_checks",
        "Requests that proved on their server that it owns their partitions (degraded mode).",
        |m| &m.owner_checks,
    ),
    (
        "shardline_owner_check_failures",
        "Ownership checks that failed: the server named by the cached map no longer had the partition attached (degraded mode).",
        |m| &m.owner_check_failures,
    ),
    (
        "shardline_blocked_holds",
        "Requests held while a partition was blocked for a move.",
        |m| &m.held,
    ),
];

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        use telemetry::{counter, gauge};
        let e = &mut encoder;
        for (name, help, value) in COUNTERS {
            counter(e, name, help, self.sum(value))?;
        }
        counter(
            e,
            "shardline_sends_gathered",
            "Sends made together with the others of one pass of a serving thread's event loop (one io_uring_enter per pass); stays 0 where io_uring is not available or gather_sends is off.",
            crate::outbox::sends_gathered(),
        )?;
        let longest = self
            .threads
            .iter()
            .map(|t| t.metrics.held_max_micros.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        gauge(
            e,
            "shardline_blocked_hold_max",
            "The longest time one request was held for a blocked partition.",
            Some(&Unit::Seconds),
            longest as f64 / 1e6,
        )?;
        self.encode_holds(e)?;
        let clients: usize = self
            .threads
            .iter()
            .map(|t| t.active_clients.load(Ordering::Relaxed))
            .sum();
        gauge(
            e,
            "shardline_clients",
            "Connected clients.",
            None,
            clients as f64,
        )?;
        if let Some(first) = self.threads.first() {
            // Shared by every serving thread: read once.
            gauge(
                e,
                "shardline_auth_tracked_addresses",
                "Client addresses with recent failed logins remembered (IPv6 per /64).",
                None,
                first.logins.failures.tracked() as f64,
            )?;
            gauge(
                e,
                "shardline_degraded",
                "1 while the proxy cannot prove its etcd lease alive and serves from its cached map, checking ownership on the servers.",
                None,
                if first.liveness.degraded() { 1.0 } else { 0.0 },
            )?;
            let degraded = ConstCounter::new(first.liveness.degraded_time().as_secs_f64());
            degraded.encode(e.encode_descriptor(
                "shardline_degraded",
                "Time spent in degraded mode.",
                Some(&Unit::Seconds),
                degraded.metric_type(),
            )?)?;
            let version = first.map.borrow().as_ref().map_or(0, |v| v.map.version);
            gauge(
                e,
                "shardline_map_version",
                "Version of the shard map in use.",
                None,
                version as f64,
            )?;
        }
        self.encode_pools(e)
    }
}

impl ProxyCollector {
    /// Hold times as a histogram; its `_sum` is the total time held.
    fn encode_holds(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = HOLD_BUCKETS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0)
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, bound)| (bound, self.sum(|m| &m.held_buckets[i])))
            .collect();
        let mut metric = encoder.encode_descriptor(
            "shardline_blocked_hold",
            "Requests held for blocked partitions, by hold time.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum(|m| &m.held_micros) as f64 / 1e6,
            self.sum(|m| &m.held),
            &buckets,
            None,
        )
    }

    /// Connections per server pool (each serving thread has its own pools).
    fn encode_pools(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let pools: Vec<_> = self.threads.iter().flat_map(|t| t.pools.all()).collect();
        let labels = |pool: &crate::pool::Pool| {
            [
                ("server", pool.server.to_string()),
                ("endpoint", pool.endpoint.to_string()),
            ]
        };
        let mut family = encoder.encode_descriptor(
            "shardline_pool_connections",
            "Server connections by pool and state.",
            None,
            MetricType::Gauge,
        )?;
        for pool in &pools {
            let [server, endpoint] = labels(pool);
            for (state, count) in [("in_use", pool.in_use()), ("idle", pool.idle_count())] {
                let set = [
                    server.clone(),
                    endpoint.clone(),
                    ("state", state.to_string()),
                ];
                ConstGauge::new(count as i64).encode(family.encode_family(&set)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "shardline_pool_connects",
            "Server connections opened.",
            None,
            MetricType::Counter,
        )?;
        for pool in &pools {
            let connects = pool.stats.connects.load(Ordering::Relaxed);
            ConstCounter::new(connects).encode(family.encode_family(&labels(pool))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "shardline_pool_checkouts",
            "Server connections handed to clients.",
            None,
            MetricType::Counter,
        )?;
        for pool in &pools {
            let checkouts = pool.stats.checkouts.load(Ordering::Relaxed);
            ConstCounter::new(checkouts).encode(family.encode_family(&labels(pool))?)?;
        }
        Ok(())
    }
}

/// The metrics of every serving thread, summed, as OpenMetrics text.
pub fn render(threads: &[Arc<Shared>]) -> String {
    telemetry::encode(ProxyCollector {
        threads: threads.to_vec(),
    })
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped.
pub async fn serve(listener: TcpListener, threads: Vec<Arc<Shared>>) {
    telemetry::serve(listener, move || render(&threads)).await
}
