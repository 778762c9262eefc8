//! Reference-table writes and DDL through the real proxy, against real etcd
//! and real Postgres 15 servers (each server read directly to check):
//! - reference INSERT/UPDATE/DELETE (RETURNING, ON CONFLICT) reach every
//!   server, in and outside transactions, all or nothing (a failing write
//!   changes no server and leaves nothing prepared; a transaction with
//!   reference and sharded writes rolls back everywhere); copies that
//!   diverged are detected; `shardctl server add` copies the reference rows
//!   to the new server, while writes keep coming, and none is lost;
//! - DDL of sharded and reference tables runs on every server: CREATE INDEX
//!   reaches every parent and leaf, ADD COLUMN changes the map's column list
//!   (INSERT without a column list then works), DDL failing on one server
//!   changes none, CONCURRENTLY runs server by server and reports a failure
//!   part-way, the sharding key and mapped tables are protected, and DDL of a
//!   sharded table waits for no move: it is refused while one runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardline_tests::{eventually, TestCluster, TestProxy};
use shardmap::{Change, ClusterMap, Group, KeyType, KeyValue, PartitionState, Table};
use tokio_postgres::{Client, SimpleQueryMessage};

const PARTITIONS: u32 = 16;
const ACCOUNTS: &str = "user_id bigint PRIMARY KEY, note text";
const COUNTRIES: &str = "code text PRIMARY KEY, name text";

/// A map over the first `in_map` servers with `accounts` (sharded by
/// user_id) and `countries` (reference), their columns recorded as
/// `shardctl table create` records them, and the tables on those servers.
async fn setup(cluster: &TestCluster, name: &str, in_map: usize) -> ClusterMap {
    let store = cluster.store(name).await;
    let servers = cluster.map_servers()[..in_map].to_vec();
    let map = ClusterMap::new(name, PARTITIONS, servers).expect("map");
    store.initialize(map, "test").await.expect("init");
    let saved = store
        .update("test", |map| {
            map.declare(Group::hash("users", KeyType::Bigint).table("accounts", "user_id"));
            map.declare_table(Table::reference("countries"));
            map.columns.insert("accounts".into(), ACCOUNTS.into());
            map.columns.insert("countries".into(), COUNTRIES.into());
            Ok(Change::new("test-schema", "accounts, countries"))
        })
        .await
        .expect("declare");
    for index in 0..in_map {
        let server = cluster.cluster.servers[index].name().to_string();
        let mut sql = Vec::new();
        for (table, columns) in [("accounts", ACCOUNTS), ("countries", COUNTRIES)] {
            sql.extend(
                shardmap::ddl::create_statements(&saved.map, table, columns, &server).expect("DDL"),
            );
        }
        cluster
            .connect(index)
            .await
            .batch_execute(&sql.join(";\n"))
            .await
            .expect("create the tables");
    }
    saved.map
}

/// One key owned by each of the first `n` servers, in server order.
fn key_per_server(cluster: &TestCluster, map: &ClusterMap, n: usize) -> Vec<i64> {
    let mut keys: Vec<Option<i64>> = vec![None; n];
    for key in 1..10_000i64 {
        let partition = map
            .partition_of("accounts", &KeyValue::Int(key))
            .expect("partition");
        let owner = &map.owner_of(partition).expect("owner").name;
        let index = cluster.server_index(owner);
        if keys[index].is_none() {
            keys[index] = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter()
        .map(|k| k.expect("a key per server"))
        .collect()
}

/// `code=name` of every countries row on server `index`, sorted.
async fn countries_on(cluster: &TestCluster, index: usize) -> Vec<String> {
    cluster
        .connect(index)
        .await
        .query(
            "SELECT code || '=' || coalesce(name, '') FROM countries ORDER BY code",
            &[],
        )
        .await
        .expect("read countries")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts every one of the first `n` servers has exactly `want`.
async fn assert_countries(cluster: &TestCluster, n: usize, want: &[&str]) {
    for index in 0..n {
        assert_eq!(
            countries_on(cluster, index).await,
            want,
            "countries on server {index}"
        );
    }
}

async fn prepared_left(cluster: &TestCluster, n: usize) -> i64 {
    let mut total = 0;
    for index in 0..n {
        total += cluster
            .connect(index)
            .await
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts")
            .get::<_, i64>(0);
    }
    total
}

/// Rows and the command's count of a simple query.
async fn simple(client: &Client, sql: &str) -> (Vec<Vec<String>>, u64) {
    let mut rows = Vec::new();
    let mut count = 0;
    for message in client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => count = n,
            _ => {}
        }
    }
    (rows, count)
}

/// The SQLSTATE and message of a simple query that must fail.
async fn fails(client: &Client, sql: &str) -> (String, String) {
    let error = client
        .simple_query(sql)
        .await
        .err()
        .unwrap_or_else(|| panic!("{sql} should fail"));
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a server error: {error}"));
    (db.code().code().to_string(), db.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reference_writes_reach_every_server_and_a_new_server_gets_the_rows() {
    const NAME: &str = "refwrites";
    let cluster = TestCluster::start(4);
    let map = setup(&cluster, NAME, 3).await;
    let keys = key_per_server(&cluster, &map, 3);
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let client = proxy.connect().await;

    // Outside a transaction: one reply, as from one Postgres.
    let (rows, count) = simple(
        &client,
        "INSERT INTO countries (code, name) VALUES ('de', 'Germany'), ('fr', 'France') RETURNING code",
    )
    .await;
    assert_eq!((rows.len(), count), (2, 2));
    assert_eq!(rows[0][0], "de");
    let (rows, count) = simple(
        &client,
        "UPDATE countries SET name = 'Deutschland' WHERE code = 'de' RETURNING name",
    )
    .await;
    assert_eq!((rows, count), (vec![vec!["Deutschland".to_string()]], 1));
    let (_, count) = simple(
        &client,
        "INSERT INTO countries VALUES ('fr', 'République') ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name",
    )
    .await;
    assert_eq!(count, 1);
    assert_countries(&cluster, 3, &["de=Deutschland", "fr=République"]).await;
    let (_, count) = simple(&client, "DELETE FROM countries WHERE code = 'fr'").await;
    assert_eq!(count, 1);

    // Inside a transaction, as legs; reads see the transaction's write.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    simple(&client, "INSERT INTO countries VALUES ('it', 'Italy')").await;
    let (rows, _) = simple(&client, "SELECT count(*) FROM countries").await;
    assert_eq!(rows[0][0], "2");
    assert_countries(&cluster, 3, &["de=Deutschland"]).await;
    client.batch_execute("COMMIT").await.expect("COMMIT");
    assert_countries(&cluster, 3, &["de=Deutschland", "it=Italy"]).await;

    // A failing write changes no server and leaves nothing prepared.
    let (code, _) = fails(
        &client,
        "INSERT INTO countries VALUES ('es', 'Spain'), ('de', 'again')",
    )
    .await;
    assert_eq!(code, "23505");
    assert_countries(&cluster, 3, &["de=Deutschland", "it=Italy"]).await;
    assert_eq!(prepared_left(&cluster, 3).await, 0);

    // Reference and sharded writes on two servers in one transaction:
    // ROLLBACK leaves nothing anywhere, COMMIT everything everywhere.
    for (end, note) in [("ROLLBACK", "rolled back"), ("COMMIT", "committed")] {
        client.batch_execute("BEGIN").await.expect("BEGIN");
        simple(
            &client,
            &format!("INSERT INTO countries VALUES ('{}', 'x')", &note[..2]),
        )
        .await;
        for key in &keys[..2] {
            simple(
                &client,
                &format!("INSERT INTO accounts (user_id, note) VALUES ({key}, '{note}')"),
            )
            .await;
        }
        client.batch_execute(end).await.expect(end);
    }
    assert_countries(&cluster, 3, &["co=x", "de=Deutschland", "it=Italy"]).await;
    let mut sharded = 0;
    for index in 0..3 {
        sharded += cluster
            .connect(index)
            .await
            .query_one(
                "SELECT count(*) FROM accounts WHERE note = 'rolled back'",
                &[],
            )
            .await
            .expect("count")
            .get::<_, i64>(0);
    }
    assert_eq!(sharded, 0);
    assert_eq!(prepared_left(&cluster, 3).await, 0);

    // Copies that diverged (written on one server directly) are detected,
    // and the write is rolled back.
    cluster
        .connect(1)
        .await
        .batch_execute("INSERT INTO countries VALUES ('zz', 'only here')")
        .await
        .expect("write one copy directly");
    let (code, message) = fails(&client, "DELETE FROM countries WHERE code = 'zz'").await;
    assert_eq!(code, "XX001", "{message}");
    assert!(
        message.contains(cluster.cluster.servers[1].name()),
        "{message}"
    );
    assert_eq!(
        countries_on(&cluster, 1).await,
        ["co=x", "de=Deutschland", "it=Italy", "zz=only here"]
    );
    cluster
        .connect(1)
        .await
        .batch_execute("DELETE FROM countries WHERE code = 'zz'")
        .await
        .expect("repair");

    // Refused: a reference write reading a sharded table, and any
    // reference write with transactions across servers off.
    let (code, message) = fails(
        &client,
        "UPDATE countries SET name = a.note FROM accounts a WHERE a.user_id = 1",
    )
    .await;
    assert_eq!(code, "0A000", "{message}");
    client
        .batch_execute("SET shardline.cross_server = refuse")
        .await
        .expect("SET");
    let (code, message) = fails(&client, "INSERT INTO countries VALUES ('pl', 'Poland')").await;
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("cross_server"), "{message}");
    client
        .batch_execute("SET shardline.cross_server = '2pc'")
        .await
        .expect("SET");

    // Indexes made through the proxy (a unique one on the sharded table's
    // parent, one on the reference table) must reach a server added later.
    for index in [
        "CREATE UNIQUE INDEX accounts_unique_note ON accounts (user_id, note)",
        "CREATE INDEX countries_name ON countries (name)",
    ] {
        client
            .batch_execute(index)
            .await
            .expect("CREATE INDEX through the proxy");
    }

    // A fourth server joins while a writer keeps inserting reference rows:
    // it ends with every row the others have, and no write is lost.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let writer_client = proxy.connect().await;
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let code = format!("w{n}");
                if writer_client
                    .batch_execute(&format!(
                        "INSERT INTO countries VALUES ('{code}', 'written')"
                    ))
                    .await
                    .is_ok()
                {
                    written.push(code);
                }
                n += 1;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fourth = cluster.map_servers()[3].clone();
    let cluster_ref = &cluster;
    let added = tokio::task::spawn_blocking({
        let name = fourth.name.clone();
        let url = fourth.primary.to_string();
        let endpoints = cluster_ref.etcd_endpoints();
        move || {
            let output = std::process::Command::new(shardline_tests::binaries::workspace_binary(
                "shardctl", "shardctl",
            ))
            .args(["server", "add", &name, &url])
            .env("SHARDLINE_ETCD", endpoints.join(","))
            .env("SHARDLINE_CLUSTER", NAME)
            .env("SHARDLINE_ACTOR", "test")
            .env_remove("SHARDLINE_CONFIG")
            .output()
            .expect("run shardctl");
            assert!(
                output.status.success(),
                "server add failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    })
    .await
    .expect("shardctl task");
    assert!(added.contains("reference tables copied"), "{added}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let written = writer.await.expect("writer");
    assert!(written.len() > 5, "the writer wrote only {written:?}");
    let on_first = countries_on(&cluster, 0).await;
    for code in &written {
        assert!(
            on_first.contains(&format!("{code}=written")),
            "{code} was acknowledged but is missing"
        );
    }
    assert_countries(
        &cluster,
        4,
        &on_first.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let indexes: i64 = cluster
        .connect(3)
        .await
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('accounts_unique_note', 'countries_name')",
            &[],
        )
        .await
        .expect("indexes on the fourth server")
        .get(0);
    assert_eq!(
        indexes, 2,
        "the indexes made through the proxy are on the new server"
    );
    let saved = cluster.store(NAME).await.load().await.expect("map").map;
    assert_eq!(
        saved.servers[&fourth.name].state,
        shardmap::ServerState::Active
    );
    // The proxy's writes now reach the fourth server too.
    let seen = eventually(Duration::from_secs(5), || {
        let shared = proxy.shared.clone();
        let name = fourth.name.clone();
        async move {
            shared
                .map
                .borrow()
                .as_ref()
                .is_some_and(|v| v.map.servers.get(&name).is_some_and(|s| s.state.serves()))
        }
    })
    .await;
    assert!(seen, "the proxy never saw the new server");
    simple(
        &client,
        "INSERT INTO countries VALUES ('nl', 'Netherlands')",
    )
    .await;
    assert!(countries_on(&cluster, 3)
        .await
        .contains(&"nl=Netherlands".to_string()));
    assert_eq!(prepared_left(&cluster, 4).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_runs_on_every_server_and_the_map_follows() {
    const NAME: &str = "ddl";
    let cluster = TestCluster::start(3);
    let map = setup(&cluster, NAME, 3).await;
    let keys = key_per_server(&cluster, &map, 3);
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let client = proxy.connect().await;
    let names: Vec<String> = (0..3)
        .map(|i| cluster.cluster.servers[i].name().to_string())
        .collect();

    // CREATE INDEX on the sharded parent: every server, parent and leaves.
    simple(&client, "CREATE INDEX accounts_note ON accounts (note)").await;
    for index in 0..3 {
        let server = cluster.connect(index).await;
        let leaves: i64 = server
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'accounts'::regclass",
                &[],
            )
            .await
            .expect("leaves")
            .get(0);
        let leaf_indexes: i64 = server
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'accounts_note'::regclass",
                &[],
            )
            .await
            .expect("the index on every server")
            .get(0);
        assert!(leaves > 0);
        assert_eq!(leaf_indexes, leaves, "server {index}");
    }

    // ADD COLUMN: every server, the map's column list, and an INSERT
    // without a column list routed by it.
    simple(
        &client,
        "ALTER TABLE accounts ADD COLUMN email text DEFAULT 'none'",
    )
    .await;
    for index in 0..3 {
        let n: i64 = cluster
            .connect(index)
            .await
            .query_one(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email'",
                &[],
            )
            .await
            .expect("columns")
            .get(0);
        assert_eq!(n, 1, "server {index}");
    }
    let columns = cluster
        .store(NAME)
        .await
        .load()
        .await
        .expect("map")
        .map
        .columns["accounts"]
        .clone();
    assert!(columns.contains("email text DEFAULT 'none'"), "{columns}");
    assert!(columns.contains("PRIMARY KEY (user_id)"), "{columns}");
    for key in &keys {
        simple(
            &client,
            &format!("INSERT INTO accounts VALUES ({key}, 'positional', 'a@b')"),
        )
        .await;
    }
    let (rows, _) = simple(
        &client,
        &format!("SELECT email FROM accounts WHERE user_id = {}", keys[2]),
    )
    .await;
    assert_eq!(rows, vec![vec!["a@b".to_string()]]);

    // DDL that fails on one server changes none.
    cluster
        .connect(1)
        .await
        .batch_execute("CREATE INDEX dup_idx ON countries (name)")
        .await
        .expect("an index on one server only");
    let (code, message) = fails(&client, "CREATE INDEX dup_idx ON accounts (note)").await;
    assert_eq!(code, "42P07", "{message}");
    assert!(message.contains(&names[1]), "{message}");
    for index in [0, 2] {
        let exists: bool = cluster
            .connect(index)
            .await
            .query_one("SELECT to_regclass('dup_idx') IS NOT NULL", &[])
            .await
            .expect("look")
            .get(0);
        assert!(!exists, "server {index} kept the failed DDL");
    }
    assert_eq!(prepared_left(&cluster, 3).await, 0);

    // CONCURRENTLY: server by server; refused in a transaction; a failure
    // part-way says which servers applied it.
    simple(
        &client,
        "CREATE INDEX CONCURRENTLY countries_name ON countries (name)",
    )
    .await;
    for index in 0..3 {
        let exists: bool = cluster
            .connect(index)
            .await
            .query_one("SELECT to_regclass('countries_name') IS NOT NULL", &[])
            .await
            .expect("look")
            .get(0);
        assert!(exists, "server {index}");
    }
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let (code, _) = fails(&client, "CREATE INDEX CONCURRENTLY c2 ON countries (code)").await;
    assert_eq!(code, "25001");
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    cluster
        .connect(1)
        .await
        .batch_execute("CREATE INDEX conc_dup ON countries (code)")
        .await
        .expect("an index on one server only");
    let (_, message) = fails(
        &client,
        "CREATE INDEX CONCURRENTLY conc_dup ON countries (name)",
    )
    .await;
    assert!(
        message.contains(&format!("Applied on: {}", names[0]))
            && message.contains(&format!("not applied on: {}, {}", names[1], names[2])),
        "{message}"
    );

    // Refused: the sharding key, dropping a table of the map.
    for sql in [
        "ALTER TABLE accounts DROP COLUMN user_id",
        "ALTER TABLE accounts ALTER COLUMN user_id TYPE text",
        "ALTER TABLE accounts RENAME COLUMN user_id TO uid",
        "DROP TABLE countries",
    ] {
        let (code, message) = fails(&client, sql).await;
        assert_eq!(code, "0A000", "{sql}: {message}");
    }

    // While a partition moves, DDL of sharded tables is refused (logical
    // replication copies none); reference tables' DDL goes on.
    let store = cluster.store(NAME).await;
    let moving = store
        .update("test", |map| {
            map.assignments[0].state = PartitionState::Moving {
                job: "job-77".into(),
            };
            Ok(Change::new("test", "pretend a move"))
        })
        .await
        .expect("moving")
        .map
        .version;
    let seen = eventually(Duration::from_secs(5), || {
        let shared = proxy.shared.clone();
        async move {
            shared
                .map
                .borrow()
                .as_ref()
                .is_some_and(|v| v.map.version >= moving)
        }
    })
    .await;
    assert!(seen);
    let (code, message) = fails(&client, "CREATE INDEX accounts_email ON accounts (email)").await;
    assert_eq!(code, "55006", "{message}");
    assert!(message.contains("job-77"), "{message}");
    simple(&client, "COMMENT ON TABLE countries IS 'reference'").await;
    store
        .update("test", |map| {
            map.assignments[0].state = PartitionState::Serving;
            Ok(Change::new("test", "move over"))
        })
        .await
        .expect("serving");
    assert!(
        proxy
            .shared
            .metrics
            .ddl_across_servers
            .load(Ordering::Relaxed)
            >= 4
    );
}
