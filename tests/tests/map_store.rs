//! The map store against a real etcd: compare-and-swap, history, validation.

use std::sync::Arc;

use shardline_tests::TestCluster;
use shardmap::{Change, MapStore, ServerState, StoreError};
use tokio::sync::Barrier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_never_both_win_the_same_revision() {
    const ROUNDS: usize = 1000;
    let cluster = TestCluster::start(0);
    let (_, first) = cluster.init_map("race", 16).await;
    // Two writers with their own etcd connections.
    let writers = [cluster.store("race").await, cluster.store("race").await];
    let barrier = Arc::new(Barrier::new(2));
    let mut handles = Vec::new();
    for (id, store) in writers.into_iter().enumerate() {
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            // For each round: (revision read, whether our write won).
            let mut outcomes = Vec::with_capacity(ROUNDS);
            for round in 0..ROUNDS {
                barrier.wait().await; // both read after the previous round's writes
                let current = store.load().await.expect("load");
                barrier.wait().await; // both have read before either writes
                let mut next = current.map.clone();
                let owner = "placeholder".to_string();
                next.assignments[round % 16].owner = owner;
                let change = Change::new("race", format!("writer {id} round {round}"));
                let won = match store
                    .compare_and_swap(&current, next, "test", &change)
                    .await
                {
                    Ok(_) => true,
                    Err(StoreError::Conflict { .. }) => false,
                    Err(e) => panic!("unexpected store error: {e}"),
                };
                outcomes.push((current.revision, won));
            }
            outcomes
        }));
    }
    let b = handles
        .pop()
        .expect("writer b")
        .await
        .expect("writer b ran");
    let a = handles
        .pop()
        .expect("writer a")
        .await
        .expect("writer a ran");
    let mut wins = 0;
    for round in 0..ROUNDS {
        let ((rev_a, won_a), (rev_b, won_b)) = (a[round], b[round]);
        assert_eq!(
            rev_a, rev_b,
            "round {round}: both writers read the same revision"
        );
        assert!(
            !(won_a && won_b),
            "round {round}: both writers won from revision {rev_a}"
        );
        assert!(
            won_a || won_b,
            "round {round}: neither writer won from revision {rev_a}"
        );
        wins += 1;
    }
    let store = cluster.store("race").await;
    let last = store.load().await.expect("load");
    assert_eq!(last.map.version, first.map.version + wins);
    let history = store.history(None).await.expect("history");
    assert_eq!(
        history.len() as u64,
        last.map.version,
        "one history entry per version"
    );
    assert!(
        history.windows(2).all(|w| w[1].version == w[0].version + 1),
        "history is contiguous"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_changes_are_refused_and_leave_the_map_alone() {
    let cluster = TestCluster::start(0);
    let (store, saved) = cluster.init_map("valid", 8).await;

    let err = store
        .update("test", |map| {
            map.assignments[3].owner = "ghost".into();
            Ok(Change::new("bad", "unknown owner"))
        })
        .await
        .expect_err("unknown server refused");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(
        err.to_string()
            .contains("partition 3 is owned by unknown server \"ghost\""),
        "{err}"
    );

    let err = store
        .update("test", |_| Err("refused by the edit".to_string()))
        .await
        .expect_err("edit refusal propagates");
    assert!(err.to_string().contains("refused by the edit"));

    let again = store.load().await.expect("load");
    assert_eq!(again, saved, "nothing was written");
    assert_eq!(store.history(None).await.expect("history").len(), 1);

    let err = store
        .initialize(saved.map.clone(), "test")
        .await
        .expect_err("second init refused");
    assert!(matches!(err, StoreError::AlreadyInitialized(_)), "{err}");

    let missing = MapStore::connect(&cluster.etcd(), "nothing-here")
        .await
        .expect("connect");
    assert!(matches!(
        missing.load().await,
        Err(StoreError::NotInitialized(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_retries_after_a_concurrent_change_and_records_history() {
    let cluster = TestCluster::start(0);
    let (store, saved) = cluster.init_map("retry", 8).await;
    let other = cluster.store("retry").await;
    let mut first_attempt = true;
    let result = store
        .update("alice", |map| {
            if first_attempt {
                first_attempt = false;
                // Someone else changes the map between our read and our write.
                let other = other.clone();
                let current = load_from_another_thread(&other);
                let mut next = current.map.clone();
                next.servers
                    .values_mut()
                    .for_each(|s| s.region = Some("eu".into()));
                write_from_another_thread(&other, &current, next);
            }
            map.servers
                .values_mut()
                .for_each(|s| s.state = ServerState::Draining);
            Ok(Change::new("server drain", "all"))
        })
        .await
        .expect("update succeeds after retrying");
    assert_eq!(result.map.version, saved.map.version + 2);
    // The retried edit was applied on top of the concurrent change, not over it.
    assert!(result
        .map
        .servers
        .values()
        .all(|s| s.region.as_deref() == Some("eu")));
    assert!(result
        .map
        .servers
        .values()
        .all(|s| s.state == ServerState::Draining));
    let history = store.history(Some(2)).await.expect("history");
    let actors: Vec<&str> = history.iter().map(|h| h.actor.as_str()).collect();
    assert_eq!(actors, vec!["bob", "alice"]);
}

/// Runs a store call to completion from inside a synchronous edit closure.
fn load_from_another_thread(store: &MapStore) -> shardmap::Versioned {
    let store = store.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(store.load()).expect("load")
    })
    .join()
    .expect("load thread")
}

fn write_from_another_thread(
    store: &MapStore,
    current: &shardmap::Versioned,
    next: shardmap::ClusterMap,
) {
    let (store, current) = (store.clone(), current.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(store.compare_and_swap(&current, next, "bob", &Change::new("region", "eu")))
            .expect("concurrent write")
    })
    .join()
    .expect("cas thread");
}
