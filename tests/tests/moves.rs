//! Online partition moves with the real rebalancer, proxy, etcd and three
//! Postgres servers: writes and reads keep flowing through the proxy while
//! partitions move back and forth; afterwards every acknowledged write is on
//! its owner exactly once and nothing of the moves is left behind.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardline_tests::moves::{
    all_events, all_users, assert_phase, jobs, leftovers, owner_of, percentile, setup_schema,
    submit, test_config, wait_terminal, InProcessRebalancer,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::Phase;

/// What the clients saw.
#[derive(Default)]
struct Load {
    /// Acknowledged `(user_id, seq)` inserts.
    inserted: Mutex<Vec<(i64, i64)>>,
    /// Acknowledged increments per user.
    increments: Mutex<BTreeMap<i64, i64>>,
    errors: Mutex<Vec<String>>,
    /// Statement latencies in ms.
    latencies: Mutex<Vec<f64>>,
    statements: AtomicU64,
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
                load.errors
                    .lock()
                    .expect("lock")
                    .push(format!("connect: {e}"));
                return;
            }
        };
    tokio::spawn(connection);
    for id in first..first + count {
        if let Err(e) = client
            .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[&id])
            .await
        {
            load.errors
                .lock()
                .expect("lock")
                .push(format!("insert user {id}: {e}"));
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
        let record = |load: &Load, started: Instant| {
            load.latencies
                .lock()
                .expect("lock")
                .push(started.elapsed().as_secs_f64() * 1000.0);
            load.statements.fetch_add(1, Ordering::Relaxed);
        };
        record(&load, started);
        match result {
            Ok(1) => load.inserted.lock().expect("lock").push((id, seq)),
            Ok(n) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("insert affected {n} rows")),
            Err(e) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("insert ({id},{seq}): {e}")),
        }
        let started = Instant::now();
        let result = client
            .execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&id])
            .await;
        record(&load, started);
        match result {
            Ok(1) => {
                *expected.entry(id).or_insert(0) += 1;
                *load.increments.lock().expect("lock").entry(id).or_insert(0) += 1;
            }
            Ok(n) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("update of user {id} affected {n} rows")),
            Err(e) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("update {id}: {e}")),
        }
        let started = Instant::now();
        let result = client
            .query_opt("SELECT n FROM users WHERE id = $1", &[&id])
            .await;
        record(&load, started);
        match result {
            Ok(Some(row)) => {
                let n: i64 = row.get(0);
                let want = expected.get(&id).copied().unwrap_or(0);
                if n != want {
                    load.errors
                        .lock()
                        .expect("lock")
                        .push(format!("stale read of user {id}: n = {n}, wrote {want}"));
                }
            }
            Ok(None) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("user {id} not found")),
            Err(e) => load
                .errors
                .lock()
                .expect("lock")
                .push(format!("select {id}: {e}")),
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
    tokio::time::sleep(Duration::from_millis(500)).await;

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
    let blocked_p50 = percentile(&mut blocked_ms, 0.5);
    let blocked_p99 = percentile(&mut blocked_ms, 0.99);
    let blocked_max = percentile(&mut blocked_ms, 1.0);
    println!(
        "moves: {} moves, {} statements, {} events, 0 client errors; partition blocked per cutover: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         statement latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        done_jobs.len(),
        statements,
        inserted.len(),
        blocked_p50,
        blocked_p99,
        blocked_max,
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
        percentile(&mut latencies, 1.0),
    );
    assert!(
        blocked_p99 < 5000.0,
        "cutovers held the partition too long: p99 {blocked_p99} ms"
    );
}

/// A proxy cut off from etcd during a cutover: the cutover waits for its
/// lease to expire, the proxy stops serving before that (no stale read, no
/// lost write), and serves again once it has re-synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_cut_off_from_etcd_stops_serving_and_the_cutover_waits_for_its_lease() {
    const NAME: &str = "cutoff";
    let cluster = TestCluster::start(3);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let etcd = cluster.etcd_endpoints()[0].trim_start_matches("http://").to_string();
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
    let client_b = proxy_b.connect().await;
    client_b
        .execute("INSERT INTO users (id, n) VALUES ($1, 0)", &[&user])
        .await
        .expect("insert through proxy b");

    // Through proxy B: increment, then read back; a read must show every
    // acknowledged increment (a stale copy would not).
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let loop_task = {
        let (acked, refused, problems, stop) = (acked.clone(), refused.clone(), problems.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client_b.execute("UPDATE users SET n = n + 1 WHERE id = $1", &[&user]).await {
                    Ok(1) => {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(n) => problems.lock().expect("lock").push(format!("update hit {n} rows")),
                    Err(e) if e.code().map(|c| c.code()) == Some("57P03") => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Err(e) => problems.lock().expect("lock").push(format!("update: {e}")),
                }
                match client_b.query_one("SELECT n FROM users WHERE id = $1", &[&user]).await {
                    Ok(row) => {
                        let n: i64 = row.get(0);
                        let want = acked.load(Ordering::SeqCst) as i64;
                        if n != want {
                            problems.lock().expect("lock").push(format!("stale read: n = {n}, acknowledged {want}"));
                        }
                    }
                    Err(e) if e.code().map(|c| c.code()) == Some("57P03") => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => problems.lock().expect("lock").push(format!("select: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    cutter.cut();
    let cut_at = Instant::now();
    let owner = map.assignments[partition as usize].owner.clone();
    let to = map.servers.keys().find(|s| **s != owner).expect("another server").clone();
    let id = submit(&jobs, &map, partition, &to).await;
    let job = wait_terminal(&jobs, &id, Duration::from_secs(90)).await;
    assert_phase(&job, Phase::Done);
    let waited = cut_at.elapsed();
    let blocked_ms = job.blocked_ms.unwrap_or(0);
    let proxies = shardmap::proxies::list(&shardmap::store::connect(&cluster.etcd_endpoints()).await.expect("etcd"), NAME)
        .await
        .expect("proxies");
    assert_eq!(proxies.len(), 1, "proxy B's registration should have expired: {proxies:?}");
    assert!(
        blocked_ms >= 3_000,
        "the cutover did not wait for the cut-off proxy's lease (blocked {blocked_ms} ms)"
    );
    assert!(!proxy_b.shared.liveness.serving(), "proxy B still serves without its lease");
    let refused_while_cut = refused.load(Ordering::SeqCst);
    assert!(refused_while_cut > 0, "proxy B never refused while cut off");

    // Back in touch: B re-registers, catches up, and serves from the new owner.
    cutter.restore();
    let serving = shardline_tests::eventually(Duration::from_secs(30), || {
        let shared = proxy_b.shared.clone();
        async move { shared.liveness.serving() }
    })
    .await;
    assert!(serving, "proxy B did not serve again after etcd came back");
    let before = acked.load(Ordering::SeqCst);
    let resumed = shardline_tests::eventually(Duration::from_secs(30), || {
        let acked = acked.clone();
        async move { acked.load(Ordering::SeqCst) >= before + 20 }
    })
    .await;
    assert!(resumed, "writes through proxy B did not resume");
    stop.store(true, Ordering::Relaxed);
    loop_task.await.expect("loop");

    let problems = problems.lock().expect("lock").clone();
    assert!(problems.is_empty(), "through proxy B: {problems:?}");
    let final_map = store.load().await.expect("map").map;
    assert_eq!(final_map.assignments[partition as usize].owner, to);
    let users = all_users(&cluster).await;
    let copies = &users[&user];
    assert_eq!(copies.len(), 1, "user stored {} times", copies.len());
    assert_eq!(copies[0].0, acked.load(Ordering::SeqCst) as i64, "acknowledged increments lost");
    assert_eq!(copies[0].1, to, "the user is not on the new owner");
    println!(
        "cut-off proxy: cutover held the partition {blocked_ms} ms waiting for the lease (job done {:.1} s after the cut); \
         proxy B refused {refused_while_cut} statements while cut off; {} increments, none lost, no stale read",
        waited.as_secs_f64(),
        acked.load(Ordering::SeqCst)
    );
}
