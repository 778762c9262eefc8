//! Degraded mode: a proxy that cannot reach etcd keeps serving from its
//! cached map, each request proving on its server that the server owns its
//! partitions. (A proxy cut off while partitions move is in `moves.rs`.)

use std::time::{Duration, Instant};

use shardline_tests::counters::{CounterLoad, CounterReport};
use shardline_tests::fixtures::{owner_of, setup_schema};
use shardline_tests::latency::percentile;
use shardline_tests::move_jobs::{test_config, InProcessRebalancer};
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
    let degraded = proxy.reaches_degraded(true, Duration::from_secs(20)).await;
    assert!(degraded, "the proxy never entered degraded mode");
    let degraded_at = Instant::now();
    let stopped_for = Duration::from_secs(60);
    tokio::time::sleep(stopped_for.saturating_sub(stopped_at.elapsed())).await;
    let during = proxy::scrape::render(std::slice::from_ref(&proxy.shared));
    drop(etcd);
    let resumed_at = Instant::now();

    let normal = proxy.reaches_degraded(false, Duration::from_secs(30)).await;
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

fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| err.to_string())
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

/// The ownership check itself, with the proxy put in degraded mode by hand
/// and a partition's leaves detached behind its back (as a cutover it did
/// not see would): reads and writes there are held, served again once the
/// leaves are back, and refused with a clear error if they stay away;
/// never an empty answer or an UPDATE of 0 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_decides_ownership_in_degraded_mode() {
    const NAME: &str = "ownercheck";
    let cluster = TestCluster::start(2);
    let (_store, map) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |c| c.limits.blocked_wait_ms = 1_000).await;
    let client = proxy.connect().await;
    // Two users on pg1, in different partitions.
    let partition_of = |id: i64| {
        map.partition_of("users", &shardmap::KeyValue::Int(id))
            .expect("partition")
    };
    let moved = (0..10_000i64)
        .find(|id| owner_of(&map, *id) == "pg1")
        .expect("a user on pg1");
    let stays = (0..10_000i64)
        .find(|id| owner_of(&map, *id) == "pg1" && partition_of(*id) != partition_of(moved))
        .expect("another partition on pg1");
    for id in [moved, stays] {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 5)", &[&id])
            .await
            .expect("insert");
    }
    let checks = |shared: &std::sync::Arc<proxy::context::Shared>| {
        let text = proxy::scrape::render(std::slice::from_ref(shared));
        (
            metric_value(&text, "shardline_owner_checks_total"),
            metric_value(&text, "shardline_owner_check_failures_total"),
        )
    };
    assert_eq!(
        checks(&proxy.shared),
        (0.0, 0.0),
        "no checks in normal mode"
    );

    let liveness = proxy.shared.liveness.clone();
    liveness.set_degraded(true);
    liveness.set_serving(false);
    let read = "SELECT n FROM users WHERE id = $1";
    let n: i64 = client
        .query_one(read, &[&moved])
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 5);
    let simple = client
        .simple_query(&format!("UPDATE users SET n = n + 1 WHERE id = {stays}"))
        .await
        .expect("simple update");
    assert!(matches!(
        simple.last(),
        Some(tokio_postgres::SimpleQueryMessage::CommandComplete(1))
    ));
    assert_eq!(checks(&proxy.shared), (2.0, 0.0));

    // The partition's leaves leave pg1 (all of them, in one transaction, as
    // a cutover's fence does).
    let pg1 = cluster.connect(0).await;
    let p = partition_of(moved);
    pg1.batch_execute(&format!(
        "BEGIN; ALTER TABLE events DETACH PARTITION events_p{p}; ALTER TABLE users DETACH PARTITION users_p{p}; COMMIT"
    ))
    .await
    .expect("detach");
    let started = Instant::now();
    let err = client
        .query_one(read, &[&moved])
        .await
        .expect_err("a read of a partition pg1 no longer has");
    assert_eq!(err.code().map(|c| c.code()), Some("55006"), "{err}");
    assert!(db_message(&err).contains("not attached"), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held first"
    );
    let err = client
        .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&moved])
        .await
        .expect_err("an UPDATE of 0 rows would be a silent lost write");
    assert_eq!(err.code().map(|c| c.code()), Some("55006"), "{err}");
    // Other partitions of the same server are unaffected.
    let n: i64 = client
        .query_one(read, &[&stays])
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 6);

    // Inside a transaction the check comes with the partition's first statement.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .query_one(read, &[&stays])
        .await
        .expect("first partition");
    let err = client
        .query_one(read, &[&moved])
        .await
        .expect_err("the moved partition in a bound transaction");
    assert_eq!(err.code().map(|c| c.code()), Some("40001"), "{err}");
    client.batch_execute("ROLLBACK").await.expect("rollback");

    // A held statement is served as soon as the server owns the partition again.
    let held = {
        let client = proxy.connect().await;
        tokio::spawn(async move {
            client
                .query_one("SELECT n FROM users WHERE id = $1", &[&moved])
                .await
                .map(|row| row.get::<_, i64>(0))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bound = format!(
        "FOR VALUES WITH (MODULUS {}, REMAINDER {p})",
        map.partitions
    );
    pg1.batch_execute(&format!(
        "BEGIN; ALTER TABLE events ATTACH PARTITION events_p{p} {bound}; ALTER TABLE users ATTACH PARTITION users_p{p} {bound}; COMMIT"
    ))
    .await
    .expect("attach again");
    assert_eq!(held.await.expect("task").expect("held read"), 5);
    let (_, failures) = checks(&proxy.shared);
    assert!(failures >= 3.0, "failed checks counted: {failures}");

    // Without the function the check cannot pass: statements are held, then
    // refused, saying why.
    pg1.batch_execute("DROP FUNCTION public.shardline_check_owner(text[], text[])")
        .await
        .expect("drop the function");
    let fresh = proxy.connect().await;
    let err = fresh
        .query_one(read, &[&moved])
        .await
        .expect_err("no function, no check");
    assert!(db_message(&err).contains("does not exist"), "{err:?}");
    // The rebalancer's leader puts it back where it is missing.
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let installed = eventually(Duration::from_secs(30), || {
        let pg1 = &pg1;
        async move {
            pg1.query_one(
                "SELECT to_regprocedure('public.shardline_check_owner(text[], text[])') IS NOT NULL",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0))
        }
    })
    .await;
    assert!(
        installed,
        "the rebalancer did not install the check function"
    );
    let n: i64 = fresh
        .query_one(read, &[&moved])
        .await
        .expect("checked read")
        .get(0);
    assert_eq!(n, 5);

    // Back to normal: no checks.
    liveness.set_serving(true);
    liveness.set_degraded(false);
    let before = checks(&proxy.shared);
    let n: i64 = fresh.query_one(read, &[&moved]).await.expect("read").get(0);
    assert_eq!(n, 5);
    assert_eq!(checks(&proxy.shared), before);
}
