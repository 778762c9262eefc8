//! The rebalancer leader dies (abort, as kill -9) at every step of a move;
//! the next leader finishes the job. Writes keep flowing through the proxy
//! the whole time; afterwards nothing is lost or duplicated, the map is
//! right, and no slot, publication, subscription or table is left behind.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rebalancer::failpoint::POINTS;
use shardline_tests::binaries::RebalancerProcess;
use shardline_tests::fixtures::{all_events, owner_of, setup_schema};
use shardline_tests::move_jobs::{
    assert_phase, jobs, leftovers, other_server, submit, test_config, wait_leader, wait_terminal,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{PartitionState, Phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_dies_at_every_step_and_the_next_one_finishes_the_move() {
    const NAME: &str = "crashes";
    let cluster = TestCluster::start(3);
    let (store, _) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let jobs = jobs(&cluster, NAME).await;
    let mut config = test_config(&cluster, NAME);
    config.leader_ttl_seconds = 2;
    let dir = tempfile::tempdir().expect("temp dir");

    // One writer through the proxy, on users of every partition.
    let acknowledged = Arc::new(Mutex::new(Vec::<(i64, i64)>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, errors, stop) = (acknowledged.clone(), errors.clone(), stop.clone());
        let client = proxy.connect().await;
        tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let user = seq % 64;
                match client
                    .execute(
                        "INSERT INTO events (user_id, seq, payload) VALUES ($1, $2, 'x')",
                        &[&user, &seq],
                    )
                    .await
                {
                    Ok(_) => acknowledged.lock().expect("lock").push((user, seq)),
                    Err(e) => errors
                        .lock()
                        .expect("lock")
                        .push(format!("({user},{seq}): {e}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let partition = 1u32;
    for (round, point) in POINTS.iter().enumerate() {
        let current = store.load().await.expect("map").map;
        let owner = current.assignments[partition as usize].owner.clone();
        let to = other_server(&current, &owner);

        let crasher_id = format!("crasher-{round}");
        let mut crasher = RebalancerProcess::start(&config, &crasher_id, Some(point), dir.path());
        assert!(
            wait_leader(&cluster, NAME, &crasher_id, Duration::from_secs(30)).await,
            "{crasher_id} never became leader"
        );
        let id = submit(&jobs, &current, partition, &to).await;
        let status = crasher
            .wait_exit(Duration::from_secs(90))
            .await
            .unwrap_or_else(|| panic!("the rebalancer never reached failpoint {point}"));
        assert!(
            !status.success(),
            "{point}: the rebalancer exited cleanly instead of crashing"
        );
        let crashed_in = jobs.get(&id).await.expect("job").expect("exists").job.phase;

        let survivor_id = format!("survivor-{round}");
        let _survivor = RebalancerProcess::start(&config, &survivor_id, None, dir.path());
        let job = wait_terminal(&jobs, &id, Duration::from_secs(120)).await;
        assert_phase(&job, Phase::Done);
        let after = store.load().await.expect("map").map;
        let assignment = &after.assignments[partition as usize];
        assert_eq!(
            assignment.owner, to,
            "{point}: the partition is not on the target"
        );
        assert_eq!(assignment.state, PartitionState::Serving, "{point}");
        let left = leftovers(&cluster).await;
        assert!(left.is_empty(), "{point}: left behind {left:?}");
        println!(
            "crash at {point:<32} (job was {crashed_in}): finished by the next leader, verify: {}",
            if job.checks.is_empty() {
                job.verify_note.clone().unwrap_or_default()
            } else {
                format!("{} leaves match", job.checks.len())
            }
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    let errors = errors.lock().expect("lock").clone();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    let final_map = store.load().await.expect("map").map;
    let rows = all_events(&cluster).await;
    let mut seen = HashSet::new();
    for (key, server) in &rows {
        assert!(seen.insert(*key), "event {key:?} stored twice");
        assert_eq!(
            *server,
            owner_of(&final_map, key.0),
            "event {key:?} on {server}, not its owner"
        );
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    for key in &acknowledged {
        assert!(seen.contains(key), "acknowledged event {key:?} lost");
    }
    assert_eq!(rows.len(), acknowledged.len());
    println!(
        "crashes: {} failpoints, {} acknowledged writes, none lost or duplicated",
        POINTS.len(),
        acknowledged.len()
    );
}
