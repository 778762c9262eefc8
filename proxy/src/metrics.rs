//! Prometheus metrics: counters kept by the sessions, and a minimal HTTP
//! endpoint serving them in the text exposition format (`GET /metrics`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::server::Shared;

/// Counters of one serving thread.
#[derive(Debug, Default)]
pub struct Metrics {
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    /// Client requests (a Query, or extended messages up to Sync/Flush).
    pub requests: AtomicU64,
    /// Requests refused by routing (no key, two servers, unknown table...).
    pub route_errors: AtomicU64,
    /// Requests that lost their backend connection.
    pub backend_errors: AtomicU64,
    /// Requests whose unnamed statement ran as a statement kept prepared on
    /// the server, and those sent again because its cached plan went stale.
    pub kept_prepared_runs: AtomicU64,
    pub stale_plan_retries: AtomicU64,
    /// Requests held because a partition was blocked, and for how long in total.
    pub held: AtomicU64,
    pub held_micros: AtomicU64,
    /// The longest single hold.
    pub held_max_micros: AtomicU64,
    /// Holds by duration: `held_buckets[i]` counts holds of at most
    /// `HOLD_BUCKETS_MS[i]` milliseconds (the last one: longer).
    pub held_buckets: [AtomicU64; HOLD_BUCKETS_MS.len() + 1],
}

/// Upper bounds of the hold-duration histogram, in milliseconds.
pub const HOLD_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000];

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one statement held for `micros`.
    pub fn record_hold(&self, micros: u64) {
        Metrics::add(&self.held, 1);
        Metrics::add(&self.held_micros, micros);
        self.held_max_micros.fetch_max(micros, Ordering::Relaxed);
        let bucket = HOLD_BUCKETS_MS
            .iter()
            .position(|ms| micros <= ms * 1000)
            .unwrap_or(HOLD_BUCKETS_MS.len());
        Metrics::add(&self.held_buckets[bucket], 1);
    }

    /// Hold durations as (upper bound in ms, or `None` for the last bucket; count).
    pub fn hold_histogram(&self) -> Vec<(Option<u64>, u64)> {
        self.held_buckets
            .iter()
            .enumerate()
            .map(|(i, count)| {
                (
                    HOLD_BUCKETS_MS.get(i).copied(),
                    count.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Renders the metrics of every serving thread, summed.
pub fn render(threads: &[Arc<Shared>]) -> String {
    let sum = |f: &dyn Fn(&Metrics) -> &AtomicU64| -> u64 {
        threads
            .iter()
            .map(|t| f(&t.metrics).load(Ordering::Relaxed))
            .sum()
    };
    let mut out = String::with_capacity(4096);
    counter(
        &mut out,
        "shardline_logins_total",
        "Client logins that succeeded.",
        sum(&|m| &m.logins),
    );
    counter(
        &mut out,
        "shardline_login_failures_total",
        "Client logins refused.",
        sum(&|m| &m.login_failures),
    );
    counter(
        &mut out,
        "shardline_requests_total",
        "Client requests (Query, or extended messages up to Sync).",
        sum(&|m| &m.requests),
    );
    counter(
        &mut out,
        "shardline_route_errors_total",
        "Requests refused because they could not be routed to one server.",
        sum(&|m| &m.route_errors),
    );
    counter(
        &mut out,
        "shardline_backend_errors_total",
        "Requests whose server connection failed.",
        sum(&|m| &m.backend_errors),
    );
    counter(
        &mut out,
        "shardline_kept_prepared_runs_total",
        "Requests whose repeated unnamed statement ran kept prepared on the server (no parse there).",
        sum(&|m| &m.kept_prepared_runs),
    );
    counter(
        &mut out,
        "shardline_stale_plan_retries_total",
        "Requests sent again unprepared because a kept statement's plan no longer fit its tables.",
        sum(&|m| &m.stale_plan_retries),
    );
    counter(
        &mut out,
        "shardline_blocked_holds_total",
        "Requests held while a partition was blocked for a move.",
        sum(&|m| &m.held),
    );
    gauge(
        &mut out,
        "shardline_blocked_hold_seconds_total",
        "Total time requests were held for blocked partitions.",
        sum(&|m| &m.held_micros) as f64 / 1e6,
    );
    let max_micros = threads
        .iter()
        .map(|t| t.metrics.held_max_micros.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    gauge(
        &mut out,
        "shardline_blocked_hold_max_seconds",
        "The longest time one request was held for a blocked partition.",
        max_micros as f64 / 1e6,
    );
    let _ = writeln!(out, "# HELP shardline_blocked_hold_seconds Requests held for blocked partitions, by hold time.\n# TYPE shardline_blocked_hold_seconds histogram");
    let mut cumulative = 0u64;
    for (i, bound) in HOLD_BUCKETS_MS.iter().map(Some).chain([None]).enumerate() {
        cumulative += threads
            .iter()
            .map(|t| t.metrics.held_buckets[i].load(Ordering::Relaxed))
            .sum::<u64>();
        let le = bound.map_or("+Inf".to_string(), |ms| format!("{}", *ms as f64 / 1000.0));
        let _ = writeln!(
            out,
            "shardline_blocked_hold_seconds_bucket{{le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "shardline_blocked_hold_seconds_sum {}",
        sum(&|m| &m.held_micros) as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "shardline_blocked_hold_seconds_count {}",
        sum(&|m| &m.held)
    );
    let clients: usize = threads
        .iter()
        .map(|t| t.active_clients.load(Ordering::Relaxed))
        .sum();
    gauge(
        &mut out,
        "shardline_clients",
        "Connected clients.",
        clients as f64,
    );
    if let Some(first) = threads.first() {
        let map = first.map.borrow().clone();
        gauge(
            &mut out,
            "shardline_map_version",
            "Version of the shard map in use.",
            map.map_or(0.0, |v| v.map.version as f64),
        );
    }
    let _ = writeln!(out, "# HELP shardline_pool_connections Server connections by pool and state.\n# TYPE shardline_pool_connections gauge");
    let mut pool_lines = Vec::new();
    for thread in threads {
        for pool in thread.pools.all() {
            pool_lines.push((
                pool.server.to_string(),
                pool.endpoint.to_string(),
                pool.in_use(),
                pool.idle_count(),
                pool.stats.connects.load(Ordering::Relaxed),
                pool.stats.checkouts.load(Ordering::Relaxed),
            ));
        }
    }
    for (server, endpoint, in_use, idle, _, _) in &pool_lines {
        let _ = writeln!(out, "shardline_pool_connections{{server=\"{server}\",endpoint=\"{endpoint}\",state=\"in_use\"}} {in_use}");
        let _ = writeln!(out, "shardline_pool_connections{{server=\"{server}\",endpoint=\"{endpoint}\",state=\"idle\"}} {idle}");
    }
    let _ = writeln!(out, "# HELP shardline_pool_connects_total Server connections opened.\n# TYPE shardline_pool_connects_total counter");
    for (server, endpoint, _, _, connects, _) in &pool_lines {
        let _ = writeln!(out, "shardline_pool_connects_total{{server=\"{server}\",endpoint=\"{endpoint}\"}} {connects}");
    }
    let _ = writeln!(out, "# HELP shardline_pool_checkouts_total Server connections handed to clients.\n# TYPE shardline_pool_checkouts_total counter");
    for (server, endpoint, _, _, _, checkouts) in &pool_lines {
        let _ = writeln!(out, "shardline_pool_checkouts_total{{server=\"{server}\",endpoint=\"{endpoint}\"}} {checkouts}");
    }
    out
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped.
pub async fn serve(listener: TcpListener, threads: Vec<Arc<Shared>>) {
    telemetry::serve(listener, move || render(&threads)).await
}
