//! `shardctl erase` (issue 14): a dry run lists every table of the group
//! with the key's row counts and deletes nothing; the erasure deletes the
//! key's rows in every table of the group (embedded-id tables by their
//! owner column) on its owner only, leaves every other key alone, and
//! writes a history entry with the actor and a keyed hash of the key — not
//! the key. A moving partition is refused.

use shardline_tests::binaries::{shardctl, shardctl_output};
use shardline_tests::fixtures::{create_table, init_schema};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::embedded::{IdGenerator, IdLayout};
use shardmap::{Change, ClusterMap, Group, KeyType, KeyValue, PartitionState};

const CLUSTER: &str = "erase";
const PARTITIONS: u32 = 16;
const TABLES: [(&str, &str); 3] = [
    ("users", "user_id bigint PRIMARY KEY, name text NOT NULL"),
    (
        "user_follow",
        "follower_id bigint, followee_id bigint, PRIMARY KEY (follower_id, followee_id)",
    ),
    (
        "photos",
        "photo_id bigint PRIMARY KEY, user_id bigint NOT NULL, caption text",
    ),
];

fn schema(map: &mut ClusterMap) {
    map.declare(
        Group::hash("users", KeyType::Bigint)
            .table("users", "user_id")
            .table("user_follow", "follower_id")
            .embedded_table("photos", "photo_id"),
    );
    for (table, columns) in TABLES {
        map.columns.insert(table.into(), columns.into());
    }
}

/// Rows of `key` in each table, through the proxy: users, user_follow, photos.
async fn rows_of(client: &tokio_postgres::Client, key: i64) -> [i64; 3] {
    let mut counts = [0; 3];
    let queries = [
        "SELECT count(*) FROM users WHERE user_id = $1",
        "SELECT count(*) FROM user_follow WHERE follower_id = $1",
        "SELECT count(*) FROM photos WHERE user_id = $1",
    ];
    for (count, sql) in counts.iter_mut().zip(queries) {
        *count = client
            .query_one(sql, &[&key])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
    }
    counts
}

fn shardctl_fails(cluster: &TestCluster, args: &[&str]) -> String {
    let output = shardctl_output(cluster, CLUSTER, args);
    assert!(!output.status.success(), "shardctl {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_deletes_one_keys_rows_in_every_table_and_records_it_without_the_key() {
    let cluster = TestCluster::start(3);
    let (store, map) = init_schema(&cluster, CLUSTER, PARTITIONS, schema).await;
    for (table, columns) in TABLES {
        create_table(&cluster, &map, table, columns).await;
    }
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    // One key per server, far from small numbers so the history cannot
    // contain one by chance.
    let keys: Vec<i64> = {
        let mut found: Vec<Option<i64>> = vec![None; cluster.map_servers().len()];
        for key in 7_000_000i64.. {
            let partition = map
                .partition_of("users", &KeyValue::Int(key))
                .expect("partition");
            let owner = &map.owner_of(partition).expect("owner").name;
            found[cluster.server_index(owner)].get_or_insert(key);
            if found.iter().all(Option::is_some) {
                break;
            }
        }
        found
            .into_iter()
            .map(|k| k.expect("a key per server"))
            .collect()
    };
    let ids = IdGenerator::new(IdLayout::new(PARTITIONS).expect("layout"));
    for key in &keys {
        let partition = map
            .partition_of("users", &KeyValue::Int(*key))
            .expect("partition");
        client
            .execute("INSERT INTO users VALUES ($1, 'someone')", &[key])
            .await
            .expect("insert user");
        for followee in [1i64, 2] {
            client
                .execute("INSERT INTO user_follow VALUES ($1, $2)", &[key, &followee])
                .await
                .expect("insert follow");
        }
        for caption in ["beach", "city"] {
            let photo = ids.next_id(partition).expect("photo id");
            client
                .execute(
                    "INSERT INTO photos VALUES ($1, $2, $3)",
                    &[&photo, key, &caption],
                )
                .await
                .expect("insert photo");
        }
        assert_eq!(rows_of(&client, *key).await, [1, 2, 2]);
    }
    let target = keys[1];
    let target_text = target.to_string();

    // Dry run: the tables and counts, nothing deleted.
    let dry = shardctl(
        &cluster,
        CLUSTER,
        &[
            "--json",
            "erase",
            "--group",
            "users",
            "--key",
            &target_text,
            "--dry-run",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&dry).expect("JSON report");
    let counts: Vec<(String, String, u64)> = report["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap_or_default().to_string(),
                t["column"].as_str().unwrap_or_default().to_string(),
                t["rows"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("photos".to_string(), "user_id".to_string(), 2),
            ("user_follow".to_string(), "follower_id".to_string(), 2),
            ("users".to_string(), "user_id".to_string(), 1),
        ]
    );
    assert_eq!(report["dry_run"], true);
    let key_hash = report["key_hash"].as_str().expect("key hash").to_string();
    assert!(!key_hash.contains(&target_text), "{key_hash}");
    assert_eq!(
        rows_of(&client, target).await,
        [1, 2, 2],
        "a dry run deletes nothing"
    );
    let version_before = store.load().await.expect("map").map.version;

    // The erasure: the key's rows go, every other key's stay.
    let out = shardctl(
        &cluster,
        CLUSTER,
        &["erase", "--group", "users", "--key", &target_text],
    );
    assert!(
        out.contains("erased on") && out.contains(&key_hash),
        "{out}"
    );
    assert_eq!(rows_of(&client, target).await, [0, 0, 0]);
    for key in keys.iter().filter(|k| **k != target) {
        assert_eq!(
            rows_of(&client, *key).await,
            [1, 2, 2],
            "key {key} untouched"
        );
    }

    // The history records who and which group, with the hash, not the key.
    let history = shardctl(&cluster, CLUSTER, &["--json", "history", "--limit", "1"]);
    let entries: serde_json::Value = serde_json::from_str(&history).expect("history JSON");
    let entry = &entries[0];
    assert_eq!(entry["action"], "erase");
    assert_eq!(entry["actor"], "test");
    assert_eq!(entry["version"].as_u64(), Some(version_before + 1));
    let detail = entry["detail"].as_str().expect("detail");
    assert!(
        detail.contains("group users") && detail.contains(&key_hash) && detail.contains("5 rows"),
        "{detail}"
    );
    assert!(
        !history.contains(&target_text),
        "the key in clear: {history}"
    );

    // A moving partition is refused, and nothing is deleted.
    let moving = keys[2];
    let partition = map
        .partition_of("users", &KeyValue::Int(moving))
        .expect("partition");
    let set_state = |state: PartitionState| {
        let store = &store;
        async move {
            store
                .update("test", |map| {
                    map.assignments[partition as usize].state = state.clone();
                    Ok(Change::new("test", "partition state"))
                })
                .await
                .expect("set the partition state");
        }
    };
    set_state(PartitionState::Moving {
        job: "test-job".into(),
    })
    .await;
    let refused = shardctl_fails(
        &cluster,
        &["erase", "--group", "users", "--key", &moving.to_string()],
    );
    assert!(
        refused.contains("moving(test-job)") && refused.contains("again"),
        "{refused}"
    );
    set_state(PartitionState::Serving).await;
    assert_eq!(rows_of(&client, moving).await, [1, 2, 2]);

    // Unknown groups and keys of the wrong type are refused clearly.
    let unknown = shardctl_fails(&cluster, &["erase", "--group", "orders", "--key", "1"]);
    assert!(unknown.contains("no group named \"orders\""), "{unknown}");
    let wrong = shardctl_fails(&cluster, &["erase", "--group", "users", "--key", "abc"]);
    assert!(wrong.contains("is not a key of group"), "{wrong}");
}
