//! The proxy's counters: plain atomics, one set per serving thread, bumped
//! on the request path with relaxed ordering (no lock, no allocation). How
//! they are summed and shown to Prometheus is `scrape`'s business.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one serving thread.
#[derive(Debug, Default)]
pub struct Metrics {
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    /// Logins refused for a wrong password or an unknown user.
    pub auth_failures: AtomicU64,
    /// Logins refused before authenticating: too many recent failures from
    /// their address.
    pub auth_throttled: AtomicU64,
    /// Client requests (a Query, or extended messages up to Sync/Flush).
    pub requests: AtomicU64,
    /// Requests refused by routing (no key, two servers, unknown table...).
    pub route_errors: AtomicU64,
    /// Requests that lost their backend connection.
    pub backend_errors: AtomicU64,
    /// Requests whose unnamed statement (or simple Query) ran as a statement
    /// kept prepared on the server, transaction control aside (BEGIN,
    /// COMMIT and ROLLBACK run kept once a transaction holds a server), and
    /// those sent again because its cached plan went stale.
    pub kept_prepared_runs: AtomicU64,
    pub stale_plan_retries: AtomicU64,
    /// Simple-protocol writes sent as they are, not kept, because a rule of
    /// their database may turn writes into SELECTs (`Backend::read_rules`),
    /// or may have since the rules were read.
    pub writes_unkept_for_rules: AtomicU64,
    /// Reads that ran on several servers and were merged by the proxy.
    pub scatter_reads: AtomicU64,
    /// Transactions that reached a second server.
    pub cross_server_transactions: AtomicU64,
    /// DDL of sharded or reference tables run on every server (`session::ddl`).
    pub ddl_across_servers: AtomicU64,
    /// Writes to reference tables run on every server.
    pub reference_writes: AtomicU64,
    /// Two-phase commits: committed, rolled back (a PREPARE or the decision
    /// failed), and ended with an unknown outcome (left to recovery).
    pub two_phase_commits: AtomicU64,
    pub two_phase_rollbacks: AtomicU64,
    pub two_phase_unknown: AtomicU64,
    /// Prepared transactions of an earlier life of this proxy that its
    /// recovery at start committed or rolled back (main thread only).
    pub recovered_commits: AtomicU64,
    pub recovered_rollbacks: AtomicU64,
    /// Degraded mode: ownership checks run (one per request that touched
    /// partitions), and those that failed (a partition was not attached on
    /// the server the cached map named).
    pub owner_checks: AtomicU64,
    pub owner_check_failures: AtomicU64,
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
