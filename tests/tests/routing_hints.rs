//! Routing hints (issue 16) through the real proxy over three real servers:
//! `SET shardline.key`, `SET LOCAL shardline.key`, comment hints and
//! `shardline.group` route key-less SELECT, UPDATE and SELECT ... FOR UPDATE
//! to the hinted key's owner (checked on the servers directly), in the
//! simple and the extended protocol; a hint that disagrees with the SQL's
//! key, an unknown group or a malformed comment is an error; RESET ends a
//! hint; and one client's hint never changes another client's routing,
//! though they share backends.

use shardline_tests::fixtures::{create_table, init_schema, key_per_server};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType};

const CLUSTER: &str = "hints";

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("photos", "user_id"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "photos",
        "user_id bigint, photo_id bigint, likes int, PRIMARY KEY (user_id, photo_id)",
    )
    .await;
    map
}

/// `likes` of every photo, per server, read there directly.
async fn likes_on_servers(cluster: &TestCluster) -> Vec<i64> {
    let mut sums = Vec::new();
    for index in 0..3 {
        let row = cluster
            .connect(index)
            .await
            .query_one("SELECT coalesce(sum(likes), 0)::bigint FROM photos", &[])
            .await
            .expect("sum on the server");
        sums.push(row.get(0));
    }
    sums
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_route_keyless_statements_to_the_hinted_owner() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let keys = key_per_server(&cluster, &map, "photos");
    // Photo ids are unique across users: photo k*100+1 belongs to user k.
    for (index, key) in keys.iter().enumerate() {
        cluster
            .connect(index)
            .await
            .batch_execute(&format!(
                "INSERT INTO photos VALUES ({key}, {}, 0), ({key}, {}, 0)",
                key * 100 + 1,
                key * 100 + 2
            ))
            .await
            .expect("rows on their owner");
    }
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    let other = proxy.connect().await;

    // Session hint, simple protocol: a photo read and updated by its own id.
    let owner = 1;
    let key = keys[owner];
    client
        .batch_execute(&format!("SET shardline.key = '{key}'"))
        .await
        .expect("SET shardline.key");
    let shown = client
        .simple_query("SHOW shardline.key")
        .await
        .expect("SHOW shardline.key");
    let shown = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(shown, Some(key.to_string()));
    client
        .batch_execute(&format!(
            "UPDATE photos SET likes = likes + 1 WHERE photo_id = {}",
            key * 100 + 1
        ))
        .await
        .expect("key-less UPDATE with a hint");
    // Extended protocol: a key-less UPDATE of every photo of the partition.
    let updated = client
        .execute(
            "UPDATE photos SET likes = likes + 10 WHERE likes >= $1",
            &[&0i32],
        )
        .await
        .expect("key-less UPDATE with a hint, extended");
    assert_eq!(updated, 2, "only the hinted owner's photos");
    let mut want = vec![0i64; 3];
    want[owner] = 21;
    assert_eq!(
        likes_on_servers(&cluster).await,
        want,
        "only the owner was written"
    );
    // SELECT ... FOR UPDATE in a transaction, by photo id.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let locked = client
        .query(
            "SELECT photo_id FROM photos WHERE photo_id = $1 FOR UPDATE",
            &[&(key * 100 + 2)],
        )
        .await
        .expect("SELECT ... FOR UPDATE with a hint");
    assert_eq!(locked.len(), 1, "the row, found on the hinted owner");
    client.batch_execute("COMMIT").await.expect("COMMIT");

    // The other client shares backends but not the hint: its key-less
    // read goes to every server.
    let all: i64 = other
        .query_one("SELECT count(*) FROM photos", &[])
        .await
        .expect("scatter read of another client")
        .get(0);
    assert_eq!(all, 6, "another client's read is not hinted");

    // A key in the SQL that disagrees with the hint is an error.
    let wrong = keys[(owner + 1) % 3];
    let error = client
        .query("SELECT * FROM photos WHERE user_id = $1", &[&wrong])
        .await
        .expect_err("the SQL's key disagrees with the hint");
    assert_eq!(code(&error), "22023", "{error}");
    // One that agrees is fine.
    let rows = client
        .query("SELECT * FROM photos WHERE user_id = $1", &[&key])
        .await
        .expect("the SQL's key agrees with the hint");
    assert_eq!(rows.len(), 2);

    // RESET: the key-less read goes to every server again.
    client
        .batch_execute("RESET shardline.key")
        .await
        .expect("RESET shardline.key");
    let all: i64 = client
        .query_one("SELECT count(*) FROM photos", &[])
        .await
        .expect("scatter read after RESET")
        .get(0);
    assert_eq!(all, 6);

    // Comment hints, both protocols; the comment's key wins over the session's.
    let third = keys[2];
    client
        .batch_execute(&format!("SET shardline.key = '{key}'"))
        .await
        .expect("SET");
    client
        .batch_execute(&format!(
            "/* shardline.key: {third} */ UPDATE photos SET likes = likes + 100 WHERE photo_id = {}",
            third * 100 + 1
        ))
        .await
        .expect("comment hint, simple protocol");
    let rows = client
        .query(
            &format!("SELECT likes FROM photos WHERE photo_id = $1 /* shardline.key={third} */"),
            &[&(third * 100 + 1)],
        )
        .await
        .expect("comment hint, extended protocol");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 100);
    client
        .batch_execute("RESET shardline.key")
        .await
        .expect("RESET");
    let error = client
        .batch_execute("/* shardline.colour: 3 */ SELECT 1")
        .await
        .expect_err("a malformed hint comment");
    assert_eq!(code(&error), "22023", "{error}");

    // SET LOCAL: for the transaction only.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .batch_execute(&format!("SET LOCAL shardline.key = '{}'", keys[0]))
        .await
        .expect("SET LOCAL shardline.key");
    let rows = client
        .query("SELECT photo_id FROM photos WHERE likes >= 0", &[])
        .await
        .expect("read with the local hint");
    assert_eq!(rows.len(), 2, "the transaction's hint routes to one owner");
    client.batch_execute("COMMIT").await.expect("COMMIT");
    let all: i64 = client
        .query_one("SELECT count(*) FROM photos", &[])
        .await
        .expect("read after the transaction")
        .get(0);
    assert_eq!(all, 6, "the local hint ended with its transaction");

    // A statement that touches no sharded table, routed by group and key.
    let mut ports = Vec::new();
    for index in 0..3 {
        let port: String = cluster
            .connect(index)
            .await
            .query_one("SELECT current_setting('port')", &[])
            .await
            .expect("port")
            .get(0);
        ports.push(port);
    }
    for (index, key) in keys.iter().enumerate() {
        let port: String = client
            .query_one(
                &format!(
                    "SELECT current_setting('port') /* shardline.group=users, shardline.key={key} */"
                ),
                &[],
            )
            .await
            .expect("group hint")
            .get(0);
        assert_eq!(port, ports[index], "key {key}'s owner answered");
    }
    let error = client
        .query("SELECT 1 /* shardline.group=nope, shardline.key=1 */", &[])
        .await
        .expect_err("an unknown group");
    assert_eq!(code(&error), "42704", "{error}");
    // A key that is not of the group's type is refused when it is used.
    client
        .batch_execute("SET shardline.key = 'abc'")
        .await
        .expect("SET takes any text");
    let typed = client
        .query("SELECT * FROM photos WHERE likes = $1", &[&0i32])
        .await
        .expect_err("a text key for a bigint group");
    assert_eq!(code(&typed), "22P02", "{typed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_server_hints_for_operators() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let keys = key_per_server(&cluster, &map, "photos");
    for (index, key) in keys.iter().enumerate() {
        cluster
            .connect(index)
            .await
            .batch_execute(&format!("INSERT INTO photos VALUES ({key}, 1, 0)"))
            .await
            .expect("a row on its owner");
    }
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    let servers: Vec<String> = cluster.map_servers().into_iter().map(|s| s.name).collect();

    // A comment hint is a value, not part of the shape: the same simple
    // Query with other keys in its comment is cached and kept prepared once
    // (after 5 runs), and each run still goes to its own key's owner.
    for round in 0..8 {
        for key in &keys {
            let rows = client
                .simple_query(&format!(
                    "/* shardline.key: {key} */ SELECT user_id FROM photos WHERE photo_id > 0"
                ))
                .await
                .expect("comment-hinted simple Query");
            let users: Vec<String> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                    _ => None,
                })
                .collect();
            assert_eq!(
                users,
                vec![key.to_string()],
                "round {round}: key {key}'s owner answered"
            );
        }
    }
    let kept = proxy
        .shared
        .metrics
        .kept_prepared_runs
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(kept > 0, "the hinted Query ran as a kept statement");

    // shardline.partition: the partition's owner.
    let partition = map
        .partition_of("photos", &shardmap::KeyValue::Int(keys[2]))
        .expect("partition");
    client
        .batch_execute(&format!("SET shardline.partition = {partition}"))
        .await
        .expect("SET shardline.partition");
    let rows = client
        .query("SELECT user_id FROM photos WHERE photo_id = $1", &[&1i64])
        .await
        .expect("read by partition hint");
    let found: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(found, vec![keys[2]], "only the partition's server answered");
    let error = client
        .query("SELECT * FROM photos WHERE user_id = $1", &[&keys[0]])
        .await
        .expect_err("a key outside the hinted partition");
    assert_eq!(code(&error), "22023", "{error}");
    client
        .batch_execute("SET shardline.partition = 100000")
        .await
        .expect("SET takes any number");
    let error = client
        .query("SELECT * FROM photos WHERE likes = 0", &[])
        .await
        .expect_err("a partition the map does not have");
    assert_eq!(code(&error), "22023", "{error}");
    client
        .batch_execute("RESET shardline.partition")
        .await
        .expect("RESET");

    // shardline.server: maintenance on one server, its own rows and leaves.
    client
        .batch_execute(&format!("SET shardline.server = '{}'", servers[1]))
        .await
        .expect("SET shardline.server");
    let updated = client
        .execute("UPDATE photos SET likes = 5 WHERE likes = $1", &[&0i32])
        .await
        .expect("key-less write on the hinted server");
    assert_eq!(updated, 1, "the hinted server's own row");
    assert_eq!(likes_on_servers(&cluster).await, vec![0, 5, 0]);
    client
        .batch_execute("VACUUM photos")
        .await
        .expect("VACUUM of a sharded table on the hinted server");
    let error = client
        .execute(
            "UPDATE photos SET likes = 6 WHERE user_id = $1",
            &[&keys[0]],
        )
        .await
        .expect_err("a write of a key served elsewhere");
    assert_eq!(code(&error), "0A000", "{error}");
    client
        .batch_execute("SET shardline.server = 'nope'")
        .await
        .expect("SET takes any name");
    let error = client
        .query("SELECT 1", &[])
        .await
        .expect_err("an unknown server");
    assert_eq!(code(&error), "42704", "{error}");
    client.batch_execute("RESET ALL").await.expect("RESET ALL");
    let all: i64 = client
        .query_one("SELECT count(*) FROM photos", &[])
        .await
        .expect("read after RESET ALL")
        .get(0);
    assert_eq!(all, 3, "RESET ALL ended the hints");
}
