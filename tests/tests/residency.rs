//! Region residency (issue 14): a proxy with `region = "eu"` and
//! `residency = "strict"` refuses every statement that would touch a
//! partition pinned to another region — single keys, scatter reads, writes
//! across servers, COPY rows, simple and extended protocol — with 42501,
//! and serves pinned-here and unpinned partitions as usual. The other
//! halves of residency are checked too: `shardctl move` refuses to take a
//! pinned partition out of its region, and a proxy cannot start strict
//! without a region. (The planner's rule is a unit test in
//! `rebalancer::planner`.)

use futures_util::SinkExt;
use shardline_tests::binaries::{shardctl_output, workspace_binary};
use shardline_tests::fixtures::{create_table, init_schema, key_per_server};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue};

const CLUSTER: &str = "residency";
const COLUMNS: &str = "user_id bigint PRIMARY KEY, balance int";

/// pg1 is in region eu and owns partitions pinned to eu; pg2 is in us with
/// partitions pinned to us; pg3 has no region and its partitions no pin.
fn regions(map: &mut ClusterMap) {
    map.declare(Group::hash("users", KeyType::Bigint).table("accounts", "user_id"));
    map.columns.insert("accounts".into(), COLUMNS.into());
    for (name, server) in map.servers.iter_mut() {
        server.region = match name.as_str() {
            "pg1" => Some("eu".into()),
            "pg2" => Some("us".into()),
            _ => None,
        };
    }
    for assignment in map.assignments.iter_mut() {
        assignment.region = match assignment.owner.as_str() {
            "pg1" => Some("eu".into()),
            "pg2" => Some("us".into()),
            _ => None,
        };
    }
}

fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| format!("{} {}", e.code().code(), e.message()))
        .unwrap_or_else(|| format!("not a server error: {error}"))
}

async fn count_on(cluster: &TestCluster, server: &str, sql: &str) -> i64 {
    cluster
        .connect(cluster.server_index(server))
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_proxy_serves_only_its_regions_partitions() {
    let cluster = TestCluster::start(3);
    let (_store, map) = init_schema(&cluster, CLUSTER, 16, regions).await;
    create_table(
        &cluster,
        &map,
        "accounts",
        "user_id bigint PRIMARY KEY, balance int",
    )
    .await;
    // One key per server, in server order: eu (pinned), us (pinned), none.
    let keys = key_per_server(&cluster, &map, "accounts");
    let owner = |key: i64| {
        let partition = map
            .partition_of("accounts", &KeyValue::Int(key))
            .expect("partition");
        map.owner_of(partition).expect("owner").name.clone()
    };
    let (eu, us, unpinned) = (keys[0], keys[1], keys[2]);
    // Keys not used yet, for inserts the proxy refuses.
    let fresh = |server: &str| {
        (200_000i64..)
            .find(|key| owner(*key) == server)
            .expect("a key on the server")
    };
    assert_eq!(
        (
            owner(eu).as_str(),
            owner(us).as_str(),
            owner(unpinned).as_str()
        ),
        ("pg1", "pg2", "pg3")
    );

    let strict = TestProxy::start(&cluster, CLUSTER, |config| {
        config.region = Some("eu".into());
        config.residency = proxy::residency::Residency::Strict;
    })
    .await;
    let client = strict.connect().await;

    // Pinned here and unpinned: served, in both protocols.
    for key in [eu, unpinned] {
        client
            .batch_execute(&format!("INSERT INTO accounts VALUES ({key}, 10)"))
            .await
            .unwrap_or_else(|e| panic!("insert {key}: {}", sqlstate(&e)));
        let balance: i32 = client
            .query_one("SELECT balance FROM accounts WHERE user_id = $1", &[&key])
            .await
            .unwrap_or_else(|e| panic!("select {key}: {e}"))
            .get(0);
        assert_eq!(balance, 10);
    }
    // A read across eu and unpinned partitions only is served too.
    let both: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM accounts WHERE user_id IN ({eu}, {unpinned})"),
            &[],
        )
        .await
        .expect("a scatter read over partitions of the proxy's region")
        .get(0);
    assert_eq!(both, 2);

    // Everything that touches the us partition is refused with 42501.
    let refused = [
        format!("INSERT INTO accounts VALUES ({us}, 10)"),
        format!("SELECT balance FROM accounts WHERE user_id = {us}"),
        "SELECT count(*) FROM accounts".to_string(),
        format!(
            "INSERT INTO accounts VALUES ({}, 1), ({us}, 1)",
            fresh("pg1")
        ),
        format!("UPDATE accounts SET balance = 0 WHERE user_id IN ({eu}, {us})"),
    ];
    for sql in &refused {
        let error = client
            .simple_query(sql)
            .await
            .expect_err("a statement on a partition pinned to us");
        let text = sqlstate(&error);
        assert!(
            text.starts_with("42501") && text.contains("region \"us\"") && text.contains("\"eu\""),
            "{sql}: {text}"
        );
    }
    let error = client
        .query("SELECT balance FROM accounts WHERE user_id = $1", &[&us])
        .await
        .expect_err("extended protocol, key pinned to us");
    assert!(
        sqlstate(&error).starts_with("42501"),
        "{}",
        sqlstate(&error)
    );

    // COPY rows: the us row stops the COPY, and its transaction writes nothing.
    let sink = client
        .copy_in("COPY accounts (user_id, balance) FROM STDIN")
        .await
        .expect("COPY starts");
    futures_util::pin_mut!(sink);
    let rows = format!("{}\t1\n{us}\t1\n", fresh("pg1"));
    let copied = async {
        sink.send(bytes::Bytes::from(rows)).await?;
        sink.finish().await
    }
    .await;
    let error = copied.expect_err("a COPY row pinned to us");
    assert!(
        sqlstate(&error).starts_with("42501"),
        "{}",
        sqlstate(&error)
    );

    // The session is still usable, and nothing refused reached a server.
    let served: i64 = client
        .query_one("SELECT count(*) FROM accounts WHERE user_id = $1", &[&eu])
        .await
        .expect("the session goes on")
        .get(0);
    assert_eq!(served, 1);
    assert_eq!(
        count_on(&cluster, "pg2", "SELECT count(*) FROM accounts").await,
        0
    );
    assert_eq!(
        count_on(&cluster, "pg1", "SELECT count(*) FROM accounts").await,
        1
    );
    assert_eq!(
        count_on(&cluster, "pg3", "SELECT count(*) FROM accounts").await,
        1
    );

    // The same proxy without strict residency serves the us partition.
    let open = TestProxy::start(&cluster, CLUSTER, |config| {
        config.region = Some("eu".into());
    })
    .await;
    open.connect()
        .await
        .batch_execute(&format!("INSERT INTO accounts VALUES ({us}, 5)"))
        .await
        .expect("residency off: the region only guides reference reads");
    assert_eq!(
        count_on(&cluster, "pg2", "SELECT count(*) FROM accounts").await,
        1
    );

    // shardctl refuses to move the us-pinned partition to the eu server.
    let us_partition = map
        .partition_of("accounts", &KeyValue::Int(us))
        .expect("partition");
    let partition = us_partition.to_string();
    let output = shardctl_output(&cluster, CLUSTER, &["move", &partition, "--to", "pg1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("pinned to region us"),
        "shardctl move of a pinned partition out of its region: {stderr}"
    );
}

#[test]
fn a_proxy_cannot_be_strict_without_a_region() {
    let output = std::process::Command::new(workspace_binary("proxy", "shardline-proxy"))
        .args(["--etcd", "http://127.0.0.1:9", "--residency", "strict"])
        .env_remove("SHARDLINE_REGION")
        .env_remove("SHARDLINE_CONFIG")
        .output()
        .expect("run shardline-proxy");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("needs the proxy's region"),
        "{stderr}"
    );
}
