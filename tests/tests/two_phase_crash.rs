//! A real `shardline-proxy` process aborted (as `kill -9` would) at each
//! point of a two-phase commit over three real Postgres servers — after the
//! first PREPARE, after all PREPAREs, after the decision record, after the
//! first COMMIT PREPARED — then recovered: by the same proxy restarting, or,
//! for a proxy that never comes back, by the rebalancer leader once its
//! registration has expired. Afterwards no prepared transaction is left on
//! any server and each transaction's rows are on every server or on none:
//! committed exactly when the decision was recorded.

use std::sync::Arc;
use std::time::Duration;

use shardline_tests::binaries::ProxyProcess;
use shardline_tests::fixtures::{create_table, init_schema, key_per_server};
use shardline_tests::move_jobs::test_config;
use shardline_tests::{eventually, TestCluster};
use shardmap::{ClusterMap, Group, KeyType};

const CLUSTER: &str = "tpccrash";

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("accounts", "user_id"));
    })
    .await;
    create_table(cluster, &map, "accounts", "user_id bigint, note text").await;
    map
}

/// Per server: rows with `note`, and prepared transactions of any kind.
async fn state(cluster: &TestCluster, note: &str) -> (Vec<i64>, i64) {
    let mut rows = Vec::new();
    let mut prepared = 0;
    for index in 0..3 {
        let client = cluster.connect(index).await;
        let row = client
            .query_one("SELECT count(*) FROM accounts WHERE note = $1", &[&note])
            .await
            .expect("count rows");
        rows.push(row.get::<_, i64>(0));
        let row = client
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("count prepared");
        prepared += row.get::<_, i64>(0);
    }
    (rows, prepared)
}

/// Runs a transaction over the three servers through a proxy armed to
/// abort at `point`; returns once the proxy process is gone.
async fn crash_at(cluster: &TestCluster, keys: &[i64], id: &str, point: &str) {
    let mut proxy = ProxyProcess::start(cluster, CLUSTER, id, Some(point)).await;
    let (client, connection) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.expect("BEGIN");
    for key in keys {
        client
            .execute(
                "INSERT INTO accounts (user_id, note) VALUES ($1, $2)",
                &[key, &point],
            )
            .await
            .expect("INSERT in the transaction");
    }
    let commit = client.batch_execute("COMMIT").await;
    assert!(
        commit.is_err(),
        "the proxy should have died during COMMIT at {point}"
    );
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the proxy did not abort at {point}: {status:?}; COMMIT answered {commit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_at_each_point_of_a_commit_is_recovered() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let keys = key_per_server(&cluster, &map, "accounts");
    let committed_points = ["2pc:after_decision", "2pc:after_first_commit"];

    // The same proxy restarts and finishes what its earlier life left.
    for (index, point) in proxy::failpoint::POINTS.iter().enumerate() {
        let id = format!("crash-restart-{index}");
        crash_at(&cluster, &keys, &id, point).await;
        let (_, prepared) = state(&cluster, point).await;
        if *point != "2pc:after_first_prepare" {
            assert!(
                prepared > 0,
                "the crash at {point} should leave prepared transactions"
            );
        }
        let restarted = ProxyProcess::start(&cluster, CLUSTER, &id, None).await;
        let want: Vec<i64> = if committed_points.contains(point) {
            vec![1, 1, 1]
        } else {
            vec![0, 0, 0]
        };
        let (rows, prepared) = state(&cluster, point).await;
        assert_eq!(
            prepared, 0,
            "after the restart at {point}, prepared transactions are left"
        );
        assert_eq!(rows, want, "after the restart at {point}: rows per server");
        drop(restarted);
        cluster
            .connect(0)
            .await
            .execute("SELECT 1", &[])
            .await
            .expect("server still up");
        // Clean the rows so the next point starts from nothing.
        for index in 0..3 {
            cluster
                .connect(index)
                .await
                .execute("DELETE FROM accounts WHERE note = $1", &[point])
                .await
                .expect("clean up");
        }
    }

    // Proxies that never come back: the rebalancer leader finishes their
    // transactions once their registrations expire.
    let mut config = test_config(&cluster, CLUSTER);
    config.twophase_recovery_interval_ms = 200;
    let metrics = Arc::new(rebalancer::metrics::Metrics::default());
    let daemon = tokio::spawn(rebalancer::daemon::run_with_metrics(
        config,
        "r-crash".into(),
        metrics,
    ));
    let points = ["2pc:after_prepares", "2pc:after_first_commit"];
    for (index, point) in points.iter().enumerate() {
        crash_at(&cluster, &keys, &format!("crash-gone-{index}"), point).await;
    }
    let finished = eventually(Duration::from_secs(60), || {
        let cluster = &cluster;
        async move {
            let (aborted, prepared_a) = state(cluster, points[0]).await;
            let (committed, prepared_b) = state(cluster, points[1]).await;
            prepared_a == 0
                && prepared_b == 0
                && aborted == vec![0, 0, 0]
                && committed == vec![1, 1, 1]
        }
    })
    .await;
    daemon.abort();
    let (aborted, prepared) = state(&cluster, points[0]).await;
    let (committed, _) = state(&cluster, points[1]).await;
    assert!(
        finished,
        "the rebalancer did not recover the dead proxies' transactions: rows {aborted:?} (want none) and {committed:?} (want all), {prepared} prepared left"
    );
}
