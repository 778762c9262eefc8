//! Degraded mode: a proxy that cannot reach etcd keeps serving from its
//! cached map, each request proving on its server that the server owns its
//! partitions. (A proxy cut off while partitions move is in `moves.rs`.)

use std::time::{Duration, Instant};

use shardline_tests::counters::{CounterLoad, CounterReport};
use shardline_tests::fixtures::{owner_of, setup_schema};
use shardline_tests::latency::percentile;
use shardline_tests::{eventually, metric_value, TestCluster, TestProxy};

/// Sends SIGSTOP to a process, and SIGCONT when dropped (so a failing test
/// does not leave etcd stopped for the cluster's shutdown).
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        signal("-STOP", pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(which: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed");
}

/// etcd stops (SIGSTOP) for 60 s under a reading and writing load over all
/// three servers: no statement fails, no read misses an acknowledged write,
/// latency stays near normal, and the proxy leaves degraded mode by itself
/// once etcd answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_stopped_for_a_minute_fails_no_statement() {
    const NAME: &str = "etcdstop";
    let cluster = TestCluster::start(3);
    let (_store, map) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    // One user per server.
    let mut users = Vec::new();
    for server in map.servers.keys() {
        let user = (0..10_000i64)
            .find(|id| owner_of(&map, *id) == *server)
            .expect("a user on every server");
        users.push(user);
    }
    let setup = proxy.connect().await;
    for user in &users {
        setup
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[user])
            .await
            .expect("insert a user");
    }
    let mut workers = Vec::new();
    for user in &users {
        workers.push((proxy.connect().await, *user));
    }
    let load = CounterLoad::start(workers, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let stopped_at = Instant::now();
    let etcd = Stopped::stop(cluster.cluster.etcd.state().pid);
    let degraded = eventually(Duration::from_secs(20), || {
        let liveness = proxy.shared.liveness.clone();
        async move { liveness.degraded() }
    })
    .await;
    assert!(degraded, "the proxy never entered degraded mode");
    let degraded_at = Instant::now();
    let stopped_for = Duration::from_secs(60);
    tokio::time::sleep(stopped_for.saturating_sub(stopped_at.elapsed())).await;
    let during = proxy::scrape::render(std::slice::from_ref(&proxy.shared));
    drop(etcd);
    let resumed_at = Instant::now();

    let normal = eventually(Duration::from_secs(30), || {
        let liveness = proxy.shared.liveness.clone();
        async move { liveness.serving() && !liveness.degraded() }
    })
    .await;
    assert!(
        normal,
        "the proxy did not leave degraded mode after etcd came back"
    );
    let normal_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reports = load.stop().await;

    let problems: Vec<&String> = reports.iter().flat_map(|r| &r.problems).collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(reports.iter().map(|r| r.refused).sum::<u64>(), 0);
    assert_stored(&setup, &reports).await;

    // Latency of the single-statement increments, normal vs degraded.
    let mut before = latencies(&reports, |t| t < stopped_at);
    let mut in_degraded = latencies(&reports, |t| t > degraded_at && t < resumed_at);
    let mut after = latencies(&reports, |t| t > normal_at);
    assert!(
        in_degraded.len() > 1000,
        "too few statements while degraded: {}",
        in_degraded.len()
    );
    let (before_p50, degraded_p50) = (
        percentile(&mut before, 0.5),
        percentile(&mut in_degraded, 0.5),
    );
    println!(
        "etcd stopped {:.0} s; degraded after {:.1} s, normal {:.1} s after etcd resumed; \
         increments {}; latency ms p50/p99: before {before_p50:.2}/{:.2}, degraded {degraded_p50:.2}/{:.2}, after {:.2}/{:.2}",
        stopped_for.as_secs_f64(),
        (degraded_at - stopped_at).as_secs_f64(),
        (normal_at - resumed_at).as_secs_f64(),
        reports.iter().map(|r| r.acked).sum::<i64>(),
        percentile(&mut before, 0.99),
        percentile(&mut in_degraded, 0.99),
        percentile(&mut after, 0.5),
        percentile(&mut after, 0.99),
    );
    assert!(
        degraded_p50 < before_p50 + 5.0,
        "degraded mode costs more than a few ms per statement: p50 {degraded_p50:.2} ms against {before_p50:.2} ms"
    );

    // What /metrics showed while etcd was stopped, and after.
    assert_eq!(metric_value(&during, "shardline_degraded"), 1.0);
    assert!(metric_value(&during, "shardline_owner_checks_total") > 1000.0);
    assert_eq!(
        metric_value(&during, "shardline_owner_check_failures_total"),
        0.0
    );
    let after_metrics = proxy::scrape::render(std::slice::from_ref(&proxy.shared));
    assert_eq!(metric_value(&after_metrics, "shardline_degraded"), 0.0);
    let seconds = metric_value(&after_metrics, "shardline_degraded_seconds_total");
    assert!(
        seconds > 30.0 && seconds < 90.0,
        "degraded for {seconds} s by /metrics"
    );
}

fn latencies(reports: &[CounterReport], when: impl Fn(Instant) -> bool) -> Vec<f64> {
    reports
        .iter()
        .flat_map(|r| &r.latencies)
        .filter(|(t, _)| when(*t))
        .map(|(_, ms)| *ms)
        .collect()
}

/// Every acknowledged increment is stored, once.
async fn assert_stored(client: &tokio_postgres::Client, reports: &[CounterReport]) {
    for report in reports {
        let n: i64 = client
            .query_one("SELECT n FROM users WHERE id = $1", &[&report.user])
            .await
            .expect("read a counter")
            .get(0);
        assert_eq!(n, report.acked, "user {}: stored n", report.user);
    }
}
