//! The watch cache against a real etcd: it sees every change, in order, even
//! when etcd is killed and restarted mid-stream, and reloads after compaction.

use std::sync::Arc;
use std::time::Duration;

use shardline_tests::TestCluster;
use shardmap::{Change, MapCache, MapStore, Versioned};
use tokio::sync::mpsc;

async fn bump(store: &MapStore, n: usize) {
    for i in 0..n {
        store
            .update("test", |_| Ok(Change::new("bump", format!("{i}"))))
            .await
            .expect("update");
    }
}

/// Collects observed versions until `version` arrives or `timeout` passes.
async fn collect_until(
    rx: &mut mpsc::UnboundedReceiver<Arc<Versioned>>,
    seen: &mut Vec<u64>,
    version: u64,
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while seen.last().copied() != Some(version) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => seen.push(v.map.version),
            _ => break,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_update_is_lost_across_an_etcd_restart() {
    let mut cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("watched", 8).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cache = MapCache::spawn_observed(cluster.etcd(), "watched", Some(tx));
    let mut seen = Vec::new();
    collect_until(
        &mut rx,
        &mut seen,
        first.map.version,
        Duration::from_secs(10),
    )
    .await;

    bump(&store, 50).await;
    collect_until(&mut rx, &mut seen, 51, Duration::from_secs(10)).await;
    assert_eq!(seen.last(), Some(&51));

    // Kill etcd hard while the watch is open, bring it back on the same port
    // and data, and write more before the cache has had time to reconnect.
    cluster.cluster.etcd.kill().expect("kill etcd");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!cache.health().watching, "the cache noticed etcd is gone");
    cluster.cluster.etcd.restart().expect("restart etcd");
    let store = cluster.store("watched").await;
    bump(&store, 50).await;
    collect_until(&mut rx, &mut seen, 101, Duration::from_secs(20)).await;

    let expected: Vec<u64> = (1..=101).collect();
    assert_eq!(
        seen, expected,
        "every version observed exactly once, in order"
    );
    assert_eq!(cache.current().map(|v| v.map.version), Some(101));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_resume_point_triggers_a_full_reload() {
    let cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("compacted", 8).await;
    bump(&store, 20).await;
    let latest = store.load().await.expect("load");
    let mut client = etcd_client::Client::connect(cluster.etcd_endpoints(), None)
        .await
        .expect("connect");
    client
        .compact(latest.revision, None)
        .await
        .expect("compact");

    // A cache that last saw version 1 must not try to replay from there.
    let cache = MapCache::spawn_resuming(
        cluster.etcd(),
        "compacted",
        Arc::new(first.clone()),
        first.revision,
    );
    let reloaded = cache
        .wait_for_version(latest.map.version, Duration::from_secs(10))
        .await
        .expect("cache reloaded the compacted map");
    assert_eq!(reloaded.map, latest.map);

    // And it keeps following afterwards.
    bump(&store, 1).await;
    assert!(cache
        .wait_for_version(latest.map.version + 1, Duration::from_secs(10))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_a_watching_process_quickly() {
    let cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("fast", 8).await;
    let cache = MapCache::spawn(cluster.etcd(), "fast");
    assert!(cache
        .wait_for_version(first.map.version, Duration::from_secs(10))
        .await
        .is_some());
    for _ in 0..20 {
        let saved = store
            .update("test", |_| Ok(Change::new("bump", "")))
            .await
            .expect("update");
        // Generous bound: this is a correctness check (the change arrives by
        // watch, not by polling), not a benchmark; bench/watch_latency.sh measures.
        assert!(
            cache
                .wait_for_version(saved.map.version, Duration::from_secs(2))
                .await
                .is_some(),
            "version {} not seen by the watcher",
            saved.map.version
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_cache_replays_every_missed_change_in_order() {
    // Deterministic version of the restart test: the cache starts from an old
    // revision, as after a disconnect, and must replay each change since.
    let cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("replay", 8).await;
    bump(&store, 30).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cache = MapCache::spawn_resuming_observed(
        cluster.etcd(),
        "replay",
        Arc::new(first.clone()),
        first.revision,
        Some(tx),
    );
    let mut seen = Vec::new();
    collect_until(&mut rx, &mut seen, 31, Duration::from_secs(10)).await;
    assert_eq!(seen, (2..=31).collect::<Vec<u64>>());
    assert!(cache.health().map_current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_map_keeps_the_last_good_one_and_says_so() {
    let cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("corrupt", 8).await;
    let cache = MapCache::spawn(cluster.etcd(), "corrupt");
    assert!(cache
        .wait_for_version(first.map.version, Duration::from_secs(10))
        .await
        .is_some());
    let mut client = etcd_client::Client::connect(cluster.etcd_endpoints(), None)
        .await
        .expect("connect");
    client
        .put(store.keys().map(), "{not json", None)
        .await
        .expect("put garbage");
    let stale = shardline_tests::eventually(Duration::from_secs(5), || async {
        !cache.health().map_current
    })
    .await;
    assert!(stale, "the cache reports that its map is out of date");
    assert_eq!(
        cache.current().map(|v| v.map.version),
        Some(first.map.version),
        "last good map kept"
    );

    // A valid map written again (with a CAS from the last good state would
    // fail, so write it raw) makes the cache current again.
    let mut fixed = first.map.clone();
    fixed.version = 7;
    client
        .put(
            store.keys().map(),
            serde_json::to_vec(&fixed).expect("encode"),
            None,
        )
        .await
        .expect("put good map");
    assert!(cache
        .wait_for_version(7, Duration::from_secs(5))
        .await
        .is_some());
    assert!(cache.health().map_current);

    client
        .delete(store.keys().map(), None)
        .await
        .expect("delete");
    let gone = shardline_tests::eventually(Duration::from_secs(5), || async {
        cache.current().is_none()
    })
    .await;
    assert!(gone, "a deleted map empties the cache");
}
