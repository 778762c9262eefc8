//! Online partition moves with the real rebalancer, proxy, etcd and three
//! Postgres servers: writes and reads keep flowing through the proxy while
//! partitions move back and forth; afterwards every acknowledged write is on
//! its owner exactly once and nothing of the moves is left behind.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardline_tests::binaries::shardctl;
use shardline_tests::counters::CounterLoad;
use shardline_tests::fixtures::{all_events, all_users, owner_of, setup_schema, user_in_partition};
use shardline_tests::latency::percentile;
use shardline_tests::move_jobs::{
    assert_phase, jobs, leftovers, other_server, submit, test_config, wait_job, wait_terminal,
    InProcessRebalancer,
};
use shardline_tests::{metric_value, TestCluster, TestProxy};
use shardmap::{Group, KeyType, Phase};

/// What the clients saw.
#[derive(Default)]
struct Load {
    /// Acknowledged `(user_id, seq)` inserts.
    inserted: Mutex<Vec<(i64, i64)>>,
    /// Acknowledged increments per user.
    increments: Mutex<BTreeMap<i64, i64>>,
    errors: Mutex<Vec<String>>,
    /// Statement latencies in ms, while partitions move and before.
    latencies: Mutex<Vec<f64>>,
    latencies_before: Mutex<Vec<f64>>,
    moving: AtomicBool,
    statements: AtomicU64,
}

impl Load {
    fn error(&self, what: String) {
        self.errors.lock().expect("lock").push(what);
    }

    fn record(&self, started: Instant) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if self.moving.load(Ordering::Relaxed) {
            self.latencies.lock().expect("lock").push(ms);
        } else {
            self.latencies_before.lock().expect("lock").push(ms);
        }
        self.statements.fetch_add(1, Ordering::Relaxed);
    }
}

/// One client: owns users `first..first+count`; inserts events, increments
/// its users' counters and reads them back (each read must see the client's
/// own last write: a read from a stale copy would not).
async fn client_loop(
    proxy_conninfo: String,
    first: i64,
    count: i64,
    load: Arc<Load>,
    stop: Arc<AtomicBool>,
) {
    let (client, connection) =
        match tokio_postgres::connect(&proxy_conninfo, tokio_postgres::NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                load.error(format!("connect: {e}"));
                return;
            }
        };
    tokio::spawn(connection);
    for id in first..first + count {
        if let Err(e) = client
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[&id])
            .await
        {
            load.error(format!("insert user {id}: {e}"));
            return;
        }
    }
    let mut seq = 0i64;
    let mut expected: BTreeMap<i64, i64> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let id = first + seq % count;
        seq += 1;
        let started = Instant::now();
        let result = client
            .execute(
                "INSERT INTO events (user_id, seq, payload) VALUES ($1, $2, 'x')",
                &[&id, &seq],
            )
            .await;
        load.record(started);
        match result {
            Ok(1) => load.inserted.lock().expect("lock").push((id, seq)),
            Ok(n) => load.error(format!("insert affected {n} rows")),
            Err(e) => load.error(format!("insert ({id},{seq}): {e}")),
        }
        let started = Instant::now();
        let result = client
            .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&id])
            .await;
        load.record(started);
        match result {
            Ok(1) => {
                *expected.entry(id).or_insert(0) += 1;
                *load.increments.lock().expect("lock").entry(id).or_insert(0) += 1;
            }
            Ok(n) => load.error(format!("update of user {id} affected {n} rows")),
            Err(e) => load.error(format!("update {id}: {e}")),
        }
        let started = Instant::now();
        let result = client
            .query_opt("SELECT n FROM users WHERE id = $1", &[&id])
            .await;
        load.record(started);
        match result {
            Ok(Some(row)) => {
                let n: i64 = row.get(0);
                let want = expected.get(&id).copied().unwrap_or(0);
                if n != want {
                    load.error(format!("stale read of user {id}: n = {n}, wrote {want}"));
                }
            }
            Ok(None) => load.error(format!("user {id} not found")),
            Err(e) => load.error(format!("select {id}: {e}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_back_and_forth_under_load_without_client_errors() {
    const NAME: &str = "moves";
    let cluster = TestCluster::start(3);
    let (_store, map) = setup_schema(&cluster, NAME, 16).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;

    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6i64 {
        clients.push(tokio::spawn(client_loop(
            proxy.conninfo(),
            c * 1000,
            40,
            load.clone(),
            stop.clone(),
        )));
    }
    // A baseline of the same load with nothing moving.
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.moving.store(true, Ordering::Relaxed);

    // Six partitions, one to each other server and back: 12 moves.
    let servers: Vec<String> = map.servers.keys().cloned().collect();
    let moved: Vec<u32> = vec![0, 3, 6, 9, 12, 15];
    let mut blocked_ms = Vec::new();
    let mut done_jobs = Vec::new();
    for round in 0..2 {
        let current = cluster.store(NAME).await.load().await.expect("map").map;
        let mut ids = Vec::new();
        for p in &moved {
            let owner = &current.assignments[*p as usize].owner;
            let home = &map.assignments[*p as usize].owner;
            let to = if round == 0 {
                servers
                    .iter()
                    .find(|s| *s != owner)
                    .expect("another server")
                    .clone()
            } else {
                home.clone()
            };
            ids.push(submit(&jobs, &current, *p, &to).await);
        }
        for id in ids {
            let job = wait_terminal(&jobs, &id, Duration::from_secs(180)).await;
            assert_phase(&job, Phase::Done);
            assert!(!job.checks.is_empty(), "job {id} compared nothing");
            assert!(
                job.checks.iter().all(|c| c.matches()),
                "job {id}: {:?}",
                job.checks
            );
            blocked_ms.push(job.blocked_ms.unwrap_or(0) as f64);
            done_jobs.push(job);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }

    let errors = load.errors.lock().expect("lock").clone();
    assert!(
        errors.is_empty(),
        "clients saw {} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let statements = load.statements.load(Ordering::Relaxed);
    assert!(
        statements > 500,
        "too little load to mean anything: {statements} statements"
    );

    // Every acknowledged insert exactly once, on the owner of its partition.
    let final_map = cluster.store(NAME).await.load().await.expect("map").map;
    for p in &moved {
        assert_eq!(
            final_map.assignments[*p as usize].owner,
            map.assignments[*p as usize].owner
        );
        assert_eq!(
            final_map.assignments[*p as usize].state,
            shardmap::PartitionState::Serving
        );
    }
    let rows = all_events(&cluster).await;
    let mut seen = HashSet::new();
    for (key, server) in &rows {
        assert!(seen.insert(*key), "event {key:?} is stored twice");
        assert_eq!(
            *server,
            owner_of(&final_map, key.0),
            "event {key:?} is on {server}, not its owner"
        );
    }
    let inserted = load.inserted.lock().expect("lock").clone();
    for key in &inserted {
        assert!(seen.contains(key), "acknowledged event {key:?} is missing");
    }
    assert_eq!(
        rows.len(),
        inserted.len(),
        "rows that were never acknowledged exist"
    );
    let users = all_users(&cluster).await;
    for (id, increments) in load.increments.lock().expect("lock").iter() {
        let copies = &users[id];
        assert_eq!(copies.len(), 1, "user {id} stored {} times", copies.len());
        assert_eq!(
            copies[0].0, *increments,
            "user {id}: acknowledged increments lost"
        );
        assert_eq!(copies[0].1, owner_of(&final_map, *id));
    }
    let left = leftovers(&cluster).await;
    assert!(left.is_empty(), "left behind: {left:?}");

    let mut latencies = load.latencies.lock().expect("lock").clone();
    let mut before = load.latencies_before.lock().expect("lock").clone();
    // The proxy's own record of every statement it held for a blocked partition.
    let histogram = proxy.shared.metrics.hold_histogram();
    let held: u64 = histogram.iter().map(|(_, n)| n).sum();
    let bound_at = |q: f64| -> String {
        let wanted = (held as f64 * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bound, n) in &histogram {
            seen += n;
            if seen >= wanted {
                return bound.map_or("> 10000 ms".into(), |ms| format!("<= {ms} ms"));
            }
        }
        "n/a".into()
    };
    let held_max_ms = proxy.shared.metrics.held_max_micros.load(Ordering::Relaxed) as f64 / 1000.0;
    println!(
        "holds: {held} statements held during cutovers; hold p50 {}, p99 {}, max {held_max_ms:.1} ms",
        bound_at(0.5),
        bound_at(0.99)
    );
    assert!(
        held > 0,
        "no statement was ever held: the cutovers were not exercised by the load"
    );
    let blocked_p50 = percentile(&mut blocked_ms, 0.5);
    let blocked_p99 = percentile(&mut blocked_ms, 0.99);
    let blocked_max = percentile(&mut blocked_ms, 1.0);
    println!(
        "moves: {} moves, {} statements, {} events, 0 client errors; partition blocked per cutover: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         statement latency while moving p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms (before the moves: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms)",
        done_jobs.len(),
        statements,
        inserted.len(),
        blocked_p50,
        blocked_p99,
        blocked_max,
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
        percentile(&mut latencies, 1.0),
        percentile(&mut before, 0.5),
        percentile(&mut before, 0.99),
        percentile(&mut before, 1.0),
    );
    assert!(
        blocked_p99 < 5000.0,
        "cutovers held the partition too long: p99 {blocked_p99} ms"
    );
}

/// A proxy cut off from etcd while a partition moves away from the server
/// its cached map names, and back. The cutovers still wait for its lease to
/// expire (that keeps holds short for proxies that are in touch), but the
/// proxy keeps serving in degraded mode: on the moving partition each
/// statement is held or refused with a clear error while its server does not
/// own the partition — never answered from a stale or missing copy — and
/// served again once the partition is back, still cut off; statements on
/// the other partitions succeed throughout; no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_cut_off_from_etcd_serves_degraded_while_a_partition_moves_away_and_back() {
    const NAME: &str = "cutoff";
    let cluster = TestCluster::start(3);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let etcd = cluster.etcd_endpoints()[0]
        .trim_start_matches("http://")
        .to_string();
    let cutter = shardline_tests::Cutter::start(&etcd).await;
    let _proxy_a = TestProxy::start(&cluster, NAME, |_| {}).await;
    // Proxy B holds statements at most 2 s, then refuses them.
    let proxy_b = TestProxy::start(&cluster, NAME, |c| {
        c.etcd.endpoints = vec![cutter.endpoint()];
        c.limits.blocked_wait_ms = 2_000;
    })
    .await;
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;

    let user: i64 = 7;
    let partition = map
        .partition_of("users", &shardmap::KeyValue::Int(user))
        .expect("partition");
    let owner = map.assignments[partition as usize].owner.clone();
    // A user on each server, none in the moving partition (one shares its server).
    let others: Vec<i64> = map
        .servers
        .keys()
        .map(|server| {
            (0..10_000i64)
                .find(|id| {
                    owner_of(&map, *id) == *server
                        && map
                            .partition_of("users", &shardmap::KeyValue::Int(*id))
                            .ok()
                            != Some(partition)
                })
                .expect("a user on every server outside the moving partition")
        })
        .collect();
    let setup = proxy_b.connect().await;
    for id in others.iter().chain([&user]) {
        setup
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[id])
            .await
            .expect("insert through proxy b");
    }
    let moving = CounterLoad::start(
        vec![(proxy_b.connect().await, user)],
        &["55006", "40001", "57P03"],
    );
    let mut steady_workers = Vec::new();
    for id in &others {
        steady_workers.push((proxy_b.connect().await, *id));
    }
    let steady = CounterLoad::start(steady_workers, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;

    cutter.cut();
    let cut_at = Instant::now();
    // Away: the cutover waits for B's lease, not for B to stop.
    let to = other_server(&map, &owner);
    let id = submit(&jobs, &map, partition, &to).await;
    let degraded = proxy_b
        .reaches_degraded(true, Duration::from_secs(20))
        .await;
    assert!(degraded, "proxy B never entered degraded mode");
    let job = wait_terminal(&jobs, &id, Duration::from_secs(90)).await;
    assert_phase(&job, Phase::Done);
    let waited = cut_at.elapsed();
    let blocked_ms = job.blocked_ms.unwrap_or(0);
    let proxies = shardmap::proxies::list(
        &shardmap::store::connect(&cluster.etcd())
            .await
            .expect("etcd"),
        NAME,
    )
    .await
    .expect("proxies");
    assert_eq!(
        proxies.len(),
        1,
        "proxy B's registration should have expired: {proxies:?}"
    );
    assert!(
        blocked_ms >= 3_000,
        "the cutover did not wait for the cut-off proxy's lease (blocked {blocked_ms} ms)"
    );
    let away_acked = moving.acked();

    // Back, while B is still cut off.
    let current = store.load().await.expect("map").map;
    let id = submit(&jobs, &current, partition, &owner).await;
    let job = wait_terminal(&jobs, &id, Duration::from_secs(90)).await;
    assert_phase(&job, Phase::Done);
    let back_acked = moving.acked();
    let served_again = shardline_tests::eventually(Duration::from_secs(30), || {
        let acked = moving.acked();
        async move { acked >= back_acked + 20 }
    })
    .await;
    assert!(
        served_again,
        "proxy B did not serve the partition again once its server owned it"
    );
    assert!(
        proxy_b.shared.liveness.degraded(),
        "proxy B was not cut off for the whole test"
    );
    let metrics = proxy::scrape::render(std::slice::from_ref(&proxy_b.shared));
    let failed_checks = metric_value(&metrics, "shardline_owner_check_failures_total");
    assert!(
        failed_checks > 0.0,
        "no ownership check failed while the partition was away"
    );

    // In touch again: B leaves degraded mode by itself.
    cutter.restore();
    let normal = proxy_b
        .reaches_degraded(false, Duration::from_secs(30))
        .await;
    assert!(
        normal,
        "proxy B did not serve normally after etcd came back"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = moving.refused();
    let moving = moving.stop().await;
    let steady = steady.stop().await;

    let problems: Vec<&String> = moving
        .iter()
        .chain(&steady)
        .flat_map(|r| &r.problems)
        .collect();
    assert!(problems.is_empty(), "through proxy B: {problems:?}");
    assert_eq!(
        steady.iter().map(|r| r.refused).sum::<u64>(),
        0,
        "statements on other partitions were refused"
    );
    let final_map = store.load().await.expect("map").map;
    assert_eq!(final_map.assignments[partition as usize].owner, owner);
    let users = all_users(&cluster).await;
    for report in moving.iter().chain(&steady) {
        let copies = &users[&report.user];
        assert_eq!(
            copies.len(),
            1,
            "user {} stored {} times",
            report.user,
            copies.len()
        );
        assert_eq!(
            copies[0].0, report.acked,
            "user {}: acknowledged increments lost",
            report.user
        );
    }
    assert_eq!(
        users[&user][0].1, owner,
        "the user is not back on its owner"
    );
    println!(
        "cut-off proxy: first cutover held the partition {blocked_ms} ms waiting for B's lease (move done {:.1} s after the cut); \
         moving partition: {} increments between the ends of the two moves (after the move back attached it), {} after, {refused} statements refused, {failed_checks} failed ownership checks; \
         other partitions: {} increments, none refused; nothing lost, no stale read",
        waited.as_secs_f64(),
        back_acked.saturating_sub(away_acked),
        moving[0].acked as u64 - back_acked,
        steady.iter().map(|r| r.acked).sum::<i64>(),
    );
}

/// The target of a move is down: the move pauses with a clear error and
/// resumes once the server is back; the moving partition keeps being served
/// by its source, and partitions on other servers are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_down_pauses_the_move_and_other_partitions_keep_working() {
    const NAME: &str = "serverdown";
    let mut cluster = TestCluster::start(3);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;
    let client = proxy.connect().await;
    for id in 0..200i64 {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[&id])
            .await
            .expect("insert");
    }
    let servers: Vec<String> = cluster
        .cluster
        .servers
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    let partition = (0..8u32)
        .find(|p| map.assignments[*p as usize].owner == servers[0])
        .expect("a partition on the first server");
    let on_partition = user_in_partition(&map, partition, 200);
    let elsewhere = (0..200i64)
        .find(|id| owner_of(&map, *id) == servers[2])
        .expect("a user on the third server");

    // A clean shutdown: the test servers run without fsync, so an immediate
    // one would lose their own recent commits, which is not what this tests.
    cluster.cluster.servers[1].stop().expect("stop the target");
    let id = submit(&jobs, &map, partition, &servers[1]).await;
    let paused = shardline_tests::eventually(Duration::from_secs(20), || {
        let jobs = jobs.clone();
        let id = id.clone();
        async move {
            let job = jobs.get(&id).await.ok().flatten().map(|s| s.job);
            job.is_some_and(|j| j.last_error.is_some())
        }
    })
    .await;
    assert!(paused, "the move did not report the unreachable target");
    let job = jobs.get(&id).await.expect("job").expect("exists").job;
    assert!(
        !job.phase.is_terminal(),
        "the move gave up instead of pausing: {job:?}"
    );
    let error = job.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&servers[1]),
        "the error does not name the server: {error}"
    );
    println!(
        "server down: move paused in {} with: {}",
        job.phase,
        job.last_error.clone().unwrap_or_default()
    );

    // The moving partition is served by its source; the third server's too.
    for user in [on_partition, elsewhere] {
        let updated = client
            .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&user])
            .await
            .expect("update while the target is down");
        assert_eq!(updated, 1);
        let n: i64 = client
            .query_one("SELECT n FROM users WHERE id = $1", &[&user])
            .await
            .expect("read while the target is down")
            .get(0);
        assert_eq!(n, 1);
    }

    cluster.cluster.servers[1]
        .restart()
        .expect("restart the target");
    let job = wait_terminal(&jobs, &id, Duration::from_secs(120)).await;
    assert_phase(&job, Phase::Done);
    let final_map = store.load().await.expect("map").map;
    assert_eq!(final_map.assignments[partition as usize].owner, servers[1]);
    let users = all_users(&cluster).await;
    assert_eq!(users.len(), 200, "users lost or added");
    for (user, copies) in &users {
        assert_eq!(copies.len(), 1, "user {user} stored {} times", copies.len());
        assert_eq!(
            copies[0].1,
            owner_of(&final_map, *user),
            "user {user} not on its owner"
        );
    }
    assert_eq!(
        users[&on_partition][0].0, 1,
        "the write made while the target was down is lost"
    );
    let left = leftovers(&cluster).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A fourth server joins: `shardctl server add` creates the tables there,
/// `shardctl rebalance` moves about a quarter of the partitions to it, and
/// the servers end within 10% of each other in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_a_fourth_server_and_rebalancing_evens_out_the_sizes() {
    const NAME: &str = "grow";
    const PARTITIONS: u32 = 32;
    let cluster = TestCluster::start(4);
    let servers = cluster.map_servers();
    let store = cluster.store(NAME).await;
    let map = shardmap::ClusterMap::new(NAME, PARTITIONS, servers[..3].to_vec()).expect("map");
    store.initialize(map, "test").await.expect("init");
    store
        .update("test", |map| {
            map.declare(Group::hash("users", KeyType::Bigint).table("users", "id"));
            Ok(shardmap::Change::new("test-schema", "users"))
        })
        .await
        .expect("declare users");
    shardctl(
        &cluster,
        NAME,
        &[
            "table",
            "create",
            "users",
            "--columns",
            "id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0, payload text",
        ],
    );
    // Fill each leaf on its owner.
    let map = store.load().await.expect("map").map;
    for (index, server) in servers[..3].iter().enumerate() {
        let client = cluster.connect(index).await;
        for p in (0..PARTITIONS).filter(|p| map.assignments[*p as usize].owner == server.name) {
            client
                .batch_execute(&format!(
                    "INSERT INTO users_p{p} SELECT g, 0, repeat('x', 200) FROM generate_series(1, 64000) g \
                     WHERE satisfies_hash_partition('users'::regclass, {PARTITIONS}, {p}, g::bigint)"
                ))
                .await
                .expect("fill a leaf");
        }
    }
    let fourth = &servers[3];
    let added = shardctl(
        &cluster,
        NAME,
        &["server", "add", &fourth.name, &fourth.primary.to_string()],
    );
    assert!(added.contains("1 tables created"), "{added}");
    let parent_on_fourth: bool = cluster
        .connect(3)
        .await
        .query_one("SELECT to_regclass('users') IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'users'::regclass)", &[])
        .await
        .expect("look at the new server")
        .get(0);
    assert!(
        parent_on_fourth,
        "the new server should have the parent and no leaves"
    );

    let plan = shardctl(&cluster, NAME, &["rebalance", "--dry-run"]);
    println!("{plan}");
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let submitted: serde_json::Value =
        serde_json::from_str(&shardctl(&cluster, NAME, &["rebalance", "--json"]))
            .expect("json plan");
    let moves = submitted.as_array().expect("a list of moves").len();
    let jobs = jobs(&cluster, NAME).await;
    for job in submitted.as_array().expect("list") {
        let id = job["job"].as_str().expect("job id");
        assert_phase(
            &wait_terminal(&jobs, id, Duration::from_secs(300)).await,
            Phase::Done,
        );
    }
    let final_map = store.load().await.expect("map").map;
    let sizes =
        rebalancer::pg::partition_sizes(&final_map, &rebalancer::pg::Credentials::default())
            .await
            .expect("sizes");
    let loads = rebalancer::planner::loads_after(&final_map, &sizes, &[]);
    let max = *loads.values().max().expect("loads") as f64;
    let min = *loads.values().min().expect("loads") as f64;
    let on_fourth = final_map
        .assignments
        .iter()
        .filter(|a| a.owner == fourth.name)
        .count();
    println!(
        "grow: {moves} of {PARTITIONS} partitions moved, {on_fourth} now on {}; sizes {:?}; spread {:.1}%",
        fourth.name,
        loads,
        (max - min) / max * 100.0
    );
    assert!(
        (6..=10).contains(&moves),
        "expected about a quarter of {PARTITIONS} partitions to move, moved {moves}"
    );
    assert!((max - min) / max < 0.10, "sizes not within 10%: {loads:?}");
    let status: serde_json::Value =
        serde_json::from_str(&shardctl(&cluster, NAME, &["status", "--json"]))
            .expect("status json");
    assert_eq!(
        status["orphans"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    let left = leftovers(&cluster).await;
    assert!(left.is_empty(), "left behind: {left:?}");

    // And out again: drain the fourth server, then remove it from the map.
    let drained: serde_json::Value = serde_json::from_str(&shardctl(
        &cluster,
        NAME,
        &["drain", &fourth.name, "--wait", "--json"],
    ))
    .expect("drain json");
    let drained = drained.as_array().expect("finished jobs");
    assert_eq!(
        drained.len(),
        on_fourth,
        "drain moved {} of {on_fourth}",
        drained.len()
    );
    assert!(drained.iter().all(|j| j["phase"] == "done"), "{drained:?}");
    shardctl(&cluster, NAME, &["server", "remove", &fourth.name]);
    let final_map = store.load().await.expect("map").map;
    assert!(!final_map.servers.contains_key(&fourth.name));
    let mut rows = 0i64;
    for index in 0..3 {
        let n: i64 = cluster
            .connect(index)
            .await
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .expect("count")
            .get(0);
        rows += n;
    }
    assert_eq!(rows, 64_000, "rows lost or duplicated across the moves");
    println!(
        "drain: {} partitions moved off {}, server removed, all 64000 rows on the other three",
        drained.len(),
        fourth.name
    );
}

/// `shardctl cancel` during the copy: the move is rolled back, the partition
/// stays on its source and serving, and nothing of the move is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_move_is_rolled_back_and_leaves_nothing() {
    const NAME: &str = "cancel";
    let cluster = TestCluster::start(3);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;
    let partition = 0u32;
    let owner = map.assignments[partition as usize].owner.clone();
    let index = cluster.server_index(&owner);
    // Enough rows that the copy takes a moment.
    cluster
        .connect(index)
        .await
        .batch_execute(
            "INSERT INTO users_p0 SELECT g, 0 FROM generate_series(1, 2400000) g \
             WHERE satisfies_hash_partition('users'::regclass, 8, 0, g::bigint)",
        )
        .await
        .expect("fill the partition");
    let to = other_server(&map, &owner);
    let id = submit(&jobs, &map, partition, &to).await;
    let copying = wait_job(&jobs, &id, Duration::from_secs(60), |j| {
        j.phase == Phase::Copying
    })
    .await;
    assert!(copying, "the move never reached the copy");
    jobs.request_cancel(&id).await.expect("cancel");
    let job = wait_terminal(&jobs, &id, Duration::from_secs(60)).await;
    assert_phase(&job, Phase::Cancelled);
    let after = store.load().await.expect("map").map;
    assert_eq!(after.assignments[partition as usize].owner, owner);
    assert_eq!(
        after.assignments[partition as usize].state,
        shardmap::PartitionState::Serving
    );
    let left = leftovers(&cluster).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    let rows: i64 = cluster
        .connect(index)
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert!(rows > 250_000, "the source lost rows: {rows}");
    // A finished job cannot be cancelled again.
    let error = jobs
        .request_cancel(&id)
        .await
        .expect_err("already cancelled");
    assert!(error.to_string().contains("already cancelled"), "{error}");
}

/// A long transaction on the source holds a lock on the moving table: the
/// fence cannot get its lock in time, so the cutover gives the partition
/// back (re-attach, unblock) and tries again; once the transaction ends the
/// move finishes. Clients through the proxy see no error meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fence_that_cannot_get_its_lock_gives_the_partition_back_and_retries() {
    const NAME: &str = "giveback";
    let cluster = TestCluster::start(3);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;
    let client = proxy.connect().await;
    for id in 0..100i64 {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[&id])
            .await
            .expect("insert");
    }
    let partition = 2u32;
    let owner = map.assignments[partition as usize].owner.clone();
    let owner_index = cluster.server_index(&owner);
    let user = user_in_partition(&map, partition, 100);

    // A transaction straight on the source that has read the table and
    // stays open: DETACH must wait for it.
    let blocker = cluster.connect(owner_index).await;
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM users;")
        .await
        .expect("open the long transaction");

    let to = other_server(&map, &owner);
    let id = submit(&jobs, &map, partition, &to).await;
    let given_back = wait_job(&jobs, &id, Duration::from_secs(60), |j| {
        j.cutover_attempts >= 1
    })
    .await;
    assert!(given_back, "the cutover never gave the partition back");
    // While the move retries, the partition keeps answering through the proxy.
    for _ in 0..20 {
        client
            .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&user])
            .await
            .expect("update while the cutover retries");
    }
    blocker
        .batch_execute("COMMIT")
        .await
        .expect("end the long transaction");
    let job = wait_terminal(&jobs, &id, Duration::from_secs(120)).await;
    assert_phase(&job, Phase::Done);
    let final_map = store.load().await.expect("map").map;
    assert_eq!(final_map.assignments[partition as usize].owner, to);
    let users = all_users(&cluster).await;
    assert_eq!(users.len(), 100);
    assert_eq!(users[&user].len(), 1);
    assert_eq!(
        users[&user][0].0, 20,
        "increments made during the retries were lost"
    );
    assert_eq!(users[&user][0].1, to);
    let left = leftovers(&cluster).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    println!(
        "give back: {} cutover attempts given back while a transaction held the table; then done, held {} ms",
        job.cutover_attempts,
        job.blocked_ms.unwrap_or(0)
    );
}

/// The verification checksum hashes rows by their columns' hash functions,
/// falls back to their text for types without one (json), and changes when
/// a row changes.
#[tokio::test]
async fn leaf_checksums_detect_changes_with_and_without_column_hashes() {
    let cluster = TestCluster::start(1);
    let server = &cluster.map_servers()[0];
    let pg = rebalancer::pg::Pg::connect(server, &rebalancer::pg::Credentials::default(), "test")
        .await
        .expect("connect");
    pg.execute(
        "setup",
        "CREATE TABLE plain (id bigint PRIMARY KEY, v text);
         INSERT INTO plain SELECT g, 'v' || g FROM generate_series(1, 1000) g;
         CREATE TABLE docs (id bigint PRIMARY KEY, doc json);
         INSERT INTO docs SELECT g, json_build_object('g', g) FROM generate_series(1, 1000) g;",
    )
    .await
    .expect("create tables");
    for table in ["plain", "docs"] {
        let (rows, first) = pg.checksum(table).await.expect("checksum");
        assert_eq!(rows, 1000);
        assert_eq!(
            pg.checksum(table).await.expect("again"),
            (1000, first),
            "{table}: not stable"
        );
        pg.execute(
            "change a row",
            &format!("UPDATE {table} SET id = 5000 WHERE id = 7"),
        )
        .await
        .expect("update");
        let (rows, changed) = pg.checksum(table).await.expect("checksum after");
        assert_eq!(rows, 1000);
        assert_ne!(changed, first, "{table}: a changed row went unnoticed");
    }
}
