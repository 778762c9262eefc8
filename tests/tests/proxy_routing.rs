//! Routing through the real proxy to 3 real Postgres servers: every sharding
//! method puts rows on exactly the owner, transactions stay on one server,
//! unroutable statements get clear errors, owner changes reroute live, and a
//! blocked partition holds statements instead of failing them.

use std::time::{Duration, Instant};

use shardline_tests::fixtures::{
    create_table, init_schema, key_per_server, leave_untracked_search_path, text_rows,
};
use shardline_tests::{eventually, TestCluster, TestProxy};
use shardmap::embedded::{IdGenerator, IdLayout};
use shardmap::{
    Change, ClusterMap, Group, KeyType, KeyValue, ListRule, MapStore, PartitionState, RangeRule,
    Table, TableKind,
};

const CLUSTER: &str = "routing";
const PARTITIONS: u32 = 16;

/// Declares the test schema in the map and creates it on the servers.
async fn setup(cluster: &TestCluster) -> (MapStore, ClusterMap) {
    let (store, map) = init_schema(cluster, CLUSTER, PARTITIONS, |map| {
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .table("users", "user_id")
                .embedded_table("photos", "photo_id"),
        );
        let regions = vec![ListRule::new(&["DE", "FR"], 0), ListRule::new(&["US"], 7)];
        map.declare(
            Group::list("regions", KeyType::Text, regions, Some(12)).table("votes", "country"),
        );
        let accounts = vec![
            RangeRule::new(None, Some("1000"), 1),
            RangeRule::new(Some("1000"), Some("2000"), 8),
            RangeRule::new(Some("2000"), None, 14),
        ];
        map.declare(
            Group::range("accounts", KeyType::Bigint, accounts).table("accounts", "account_id"),
        );
        map.declare_table(Table::reference("countries"));
        map.declare_table(Table::unsharded("settings", "pg2"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "users",
        "user_id bigint PRIMARY KEY, name text",
    )
    .await;
    create_table(
        cluster,
        &map,
        "photos",
        "photo_id bigint PRIMARY KEY, user_id bigint, caption text",
    )
    .await;
    create_table(
        cluster,
        &map,
        "votes",
        "country text, voter bigint, PRIMARY KEY (country, voter)",
    )
    .await;
    create_table(
        cluster,
        &map,
        "accounts",
        "account_id bigint PRIMARY KEY, balance bigint",
    )
    .await;
    create_table(
        cluster,
        &map,
        "countries",
        "code text PRIMARY KEY, name text",
    )
    .await;
    create_table(
        cluster,
        &map,
        "settings",
        "name text PRIMARY KEY, value text",
    )
    .await;
    (store, map)
}

/// Which servers hold a row matching `predicate` in `table`, asked directly.
async fn servers_holding(cluster: &TestCluster, table: &str, predicate: &str) -> Vec<String> {
    let mut holders = Vec::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let client = cluster.connect(index).await;
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .expect("to_regclass");
        if !exists.get::<_, bool>(0) {
            continue; // an unsharded table lives on its home only
        }
        let row = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {predicate}"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("count on {}: {e}", server.name()));
        let count: i64 = row.get(0);
        for _ in 0..count {
            holders.push(server.name().to_string());
        }
    }
    holders
}

/// The first value of a simple Query's first row.
async fn first_value(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    text_rows(client, sql)
        .await
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
}

fn key_on_another_server(map: &ClusterMap, key: i64) -> i64 {
    (2..100)
        .find(|k| owner(map, "users", KeyValue::Int(*k)) != owner(map, "users", KeyValue::Int(key)))
        .expect("a key on another server")
}

fn owner(map: &ClusterMap, table: &str, key: KeyValue) -> String {
    let partition = map.partition_of(table, &key).expect("partition");
    map.owner_of(partition).expect("owner").name.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_land_on_their_owner_for_every_method() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    // hash: literals (simple protocol) and parameters (extended, binary).
    for user in 1..=30_i64 {
        if user % 2 == 0 {
            client
                .batch_execute(&format!(
                    "INSERT INTO users (user_id, name) VALUES ({user}, 'user {user}')"
                ))
                .await
                .expect("simple insert");
        } else {
            client
                .execute(
                    "INSERT INTO users (user_id, name) VALUES ($1, $2)",
                    &[&user, &format!("user {user}")],
                )
                .await
                .expect("extended insert");
        }
    }
    for user in 1..=30_i64 {
        let holders = servers_holding(&cluster, "users", &format!("user_id = {user}")).await;
        assert_eq!(
            holders,
            vec![owner(&map, "users", KeyValue::Int(user))],
            "user {user}"
        );
        let row = client
            .query_one("SELECT name FROM users WHERE user_id = $1", &[&user])
            .await
            .expect("select by key");
        assert_eq!(row.get::<_, String>(0), format!("user {user}"));
    }

    // embedded: photo ids made for the user's partition land with the user.
    let ids = IdGenerator::new(IdLayout::new(PARTITIONS).expect("layout"));
    for user in 1..=10_i64 {
        let partition = map
            .partition_of("users", &KeyValue::Int(user))
            .expect("partition");
        let photo = ids.next_id(partition).expect("id");
        client
            .execute(
                "INSERT INTO photos (photo_id, user_id, caption) VALUES ($1, $2, 'hi')",
                &[&photo, &user],
            )
            .await
            .expect("insert photo");
        let holders = servers_holding(&cluster, "photos", &format!("photo_id = {photo}")).await;
        assert_eq!(
            holders,
            vec![owner(&map, "users", KeyValue::Int(user))],
            "photo of user {user}"
        );
    }

    // list (text keys, including the default partition).
    for (country, voter) in [("DE", 1_i64), ("FR", 2), ("US", 3), ("BR", 4)] {
        client
            .execute(
                "INSERT INTO votes (country, voter) VALUES ($1, $2)",
                &[&country, &voter],
            )
            .await
            .expect("insert vote");
        let holders = servers_holding(&cluster, "votes", &format!("country = '{country}'")).await;
        assert_eq!(
            holders,
            vec![owner(&map, "votes", KeyValue::Text(country.into()))],
            "vote in {country}"
        );
    }

    // range.
    for account in [5_i64, 999, 1000, 1500, 2000, 1_000_000] {
        client
            .batch_execute(&format!(
                "INSERT INTO accounts (account_id, balance) VALUES ({account}, 10)"
            ))
            .await
            .expect("insert account");
        let holders =
            servers_holding(&cluster, "accounts", &format!("account_id = {account}")).await;
        assert_eq!(
            holders,
            vec![owner(&map, "accounts", KeyValue::Int(account))],
            "account {account}"
        );
    }

    // unsharded goes home; reference reads work anywhere.
    client
        .batch_execute("INSERT INTO settings (name, value) VALUES ('theme', 'dark')")
        .await
        .expect("unsharded insert");
    assert_eq!(
        servers_holding(&cluster, "settings", "name = 'theme'").await,
        vec!["pg2".to_string()]
    );
    for index in 0..3 {
        cluster
            .connect(index)
            .await
            .batch_execute("INSERT INTO countries VALUES ('DE', 'Germany')")
            .await
            .expect("seed reference table");
    }
    let row = client
        .query_one("SELECT name FROM countries WHERE code = 'DE'", &[])
        .await
        .expect("reference read");
    assert_eq!(row.get::<_, String>(0), "Germany");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_cross_server_transactions_never_commit_partially() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    // With cross_server = refuse (transactions over several servers,
    // the default, are tested in cross_server_tx.rs).
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config.transactions.cross_server = proxy::config::CrossServer::Refuse;
    })
    .await;
    let mut client = proxy.connect().await;

    // Two keys on different servers.
    let a = 1_i64;
    let b = key_on_another_server(&map, a);
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO users (user_id, name) VALUES ($1, 'a')", &[&a])
        .await
        .expect("first insert");
    let err = tx
        .execute("INSERT INTO users (user_id, name) VALUES ($1, 'b')", &[&b])
        .await
        .expect_err("second server refused");
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"), "{err}");
    // As in Postgres, COMMIT of a failed transaction rolls it back.
    tx.commit()
        .await
        .expect("COMMIT ends the failed transaction");
    assert!(
        servers_holding(&cluster, "users", &format!("user_id IN ({a}, {b})"))
            .await
            .is_empty(),
        "nothing committed"
    );

    // Same server: commits as one.
    let c = (2..200)
        .find(|k| {
            *k != b
                && owner(&map, "users", KeyValue::Int(*k)) == owner(&map, "users", KeyValue::Int(a))
        })
        .expect("key on same server");
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO users (user_id, name) VALUES ($1, 'a')", &[&a])
        .await
        .expect("insert a");
    tx.execute("INSERT INTO users (user_id, name) VALUES ($1, 'c')", &[&c])
        .await
        .expect("insert c");
    tx.commit().await.expect("commit");
    assert_eq!(
        servers_holding(&cluster, "users", &format!("user_id IN ({a}, {c})"))
            .await
            .len(),
        2
    );

    // Rollback leaves nothing; the session keeps working afterwards.
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "UPDATE users SET name = 'changed' WHERE user_id = $1",
        &[&a],
    )
    .await
    .expect("update");
    tx.rollback().await.expect("rollback");
    let row = client
        .query_one("SELECT name FROM users WHERE user_id = $1", &[&a])
        .await
        .expect("select");
    assert_eq!(row.get::<_, String>(0), "a");

    // Simple-protocol transaction with a statement elsewhere.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE users SET name = 'x' WHERE user_id = {a}"))
        .await
        .expect("update a");
    let err = client
        .batch_execute(&format!(
            "INSERT INTO users (user_id, name) VALUES ({b}, 'b')"
        ))
        .await
        .expect_err("other server");
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    let err = client.batch_execute("SELECT 1").await.expect_err("aborted");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    client
        .batch_execute("COMMIT")
        .await
        .expect("commit ends the failed transaction");
    let row = client
        .query_one("SELECT name FROM users WHERE user_id = $1", &[&a])
        .await
        .expect("select");
    assert_eq!(
        row.get::<_, String>(0),
        "a",
        "the update of the aborted transaction was rolled back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_statements_get_clear_errors_and_the_session_survives() {
    let cluster = TestCluster::start(3);
    let (_store, _map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    // Reads across partitions are refused too once the session opts out.
    client
        .batch_execute("SET shardline.scatter = off")
        .await
        .expect("opt out of scatter reads");
    let cases = [
        (
            "SELECT * FROM users",
            "0A000",
            "does not fix its key column \"user_id\"",
        ),
        (
            "SELECT * FROM nowhere WHERE id = 1",
            "42P01",
            "not in the shardline map",
        ),
        (
            "SELECT * FROM users WHERE user_id = 'abc'",
            "22P02",
            "invalid sharding key",
        ),
        (
            "INSERT INTO users VALUES (1, 'x')",
            "0A000",
            "does not record its columns",
        ),
        // Reference writes run on every server now; one that also reads
        // a sharded table cannot.
        (
            "UPDATE countries SET name = u.name FROM users u WHERE u.user_id = 1",
            "0A000",
            "reference table",
        ),
        ("LISTEN events", "0A000", "LISTEN"),
    ];
    for (sql, code, text) in cases {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: not a server error: {err}"));
        assert_eq!(db.code().code(), code, "{sql}: {}", db.message());
        assert!(db.message().contains(text), "{sql}: {}", db.message());
        assert!(
            db.hint().is_some() || code == "22P02",
            "{sql}: errors say what to do"
        );
    }
    let err = client
        .query("SELECT * FROM users WHERE user_id = $1", &[&None::<i64>])
        .await
        .expect_err("NULL key");
    assert_eq!(err.code().map(|c| c.code()), Some("22004"));
    // The session and its prepared statements still work.
    let row = client
        .query_one("SELECT 1 + 1", &[])
        .await
        .expect("still alive");
    assert_eq!(row.get::<_, i32>(0), 2);
    let syntax = client
        .batch_execute("SELEC nonsense")
        .await
        .expect_err("syntax error from Postgres");
    assert_eq!(syntax.code().map(|c| c.code()), Some("42601"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_change_reroutes_within_a_second_without_client_errors() {
    let cluster = TestCluster::start(3);
    let (store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    let key = 42_i64;
    let partition = map
        .partition_of("users", &KeyValue::Int(key))
        .expect("partition");
    let old_owner = map.owner_of(partition).expect("owner").name.clone();
    let new_owner = if old_owner == "pg1" { "pg2" } else { "pg1" };
    let new_index = if new_owner == "pg1" { 0 } else { 1 };
    client
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'on old owner')",
            &[&key],
        )
        .await
        .expect("insert");
    // Copy the partition to the new owner by hand (the rebalancer's job later),
    // marking the copy so we can see where reads go.
    let leaf = shardmap::ddl::leaves(&map, "users", partition)
        .expect("leaf")
        .remove(0);
    cluster
        .connect(new_index)
        .await
        .batch_execute(&format!(
            "{}; INSERT INTO users (user_id, name) VALUES ({key}, 'on new owner')",
            leaf.create_sql("users")
        ))
        .await
        .expect("copy partition");

    // A reader keeps querying through the same connection while the map flips.
    let reader = tokio::spawn(async move {
        let mut seen_new_at = None;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            let row = client
                .query_one("SELECT name FROM users WHERE user_id = $1", &[&key])
                .await
                .expect("no client error during the owner change");
            if row.get::<_, String>(0) == "on new owner" {
                seen_new_at = Some(Instant::now());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen_new_at
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flipped_at = Instant::now();
    store
        .update("test", |map| {
            map.assignments[partition as usize].owner = new_owner.to_string();
            Ok(Change::new(
                "move",
                format!("partition {partition} to {new_owner}"),
            ))
        })
        .await
        .expect("flip owner");
    let seen = reader
        .await
        .expect("reader ran")
        .expect("reads reached the new owner");
    let delay = seen.saturating_duration_since(flipped_at);
    eprintln!(
        "owner change: reads reached the new owner {delay:?} after the map write was acknowledged"
    );
    assert!(delay < Duration::from_secs(1), "rerouted after {delay:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_partition_holds_statements_until_it_is_released() {
    let cluster = TestCluster::start(3);
    let (store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let blocked_key = 7_i64;
    let partition = map
        .partition_of("users", &KeyValue::Int(blocked_key))
        .expect("partition");
    let free_key = (1..100)
        .find(|k| map.partition_of("users", &KeyValue::Int(*k)).ok() != Some(partition))
        .expect("key in another partition");
    let set_state = |state: PartitionState| {
        let store = store.clone();
        async move {
            store
                .update("test", move |map| {
                    map.assignments[partition as usize].state = state.clone();
                    Ok(Change::new("state", "test"))
                })
                .await
                .expect("set state")
        }
    };
    let blocked = set_state(PartitionState::Blocked { job: "test".into() }).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy
                .shared
                .map
                .borrow()
                .as_ref()
                .is_some_and(|v| v.map.version >= blocked.map.version)
        })
        .await
    );

    let held = proxy.connect().await;
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        held.execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'held')",
            &[&blocked_key],
        )
        .await
        .map(|_| Instant::now())
    });
    // Other partitions are served meanwhile.
    let other = proxy.connect().await;
    other
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'free')",
            &[&free_key],
        )
        .await
        .expect("unblocked partition served");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the statement is held while the partition is blocked"
    );
    set_state(PartitionState::Serving).await;
    let done = waiter
        .await
        .expect("waiter ran")
        .expect("held statement succeeded after release");
    assert!(done.duration_since(started) >= Duration::from_millis(300));
    assert_eq!(
        servers_holding(&cluster, "users", &format!("user_id = {blocked_key}"))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_a_replica_only_when_asked_and_writes_never_do() {
    let mut cluster = TestCluster::start(1);
    let replica = tokio::task::block_in_place(|| cluster.cluster.add_replica(0)).expect("replica");
    let (store, _) = cluster.init_map("replicas", PARTITIONS).await;
    let saved = store
        .update("test", |map| {
            let server = map.servers.get_mut("pg1").ok_or("pg1 missing")?;
            server
                .replicas
                .push(shardmap::Endpoint::parse(&replica.url()).map_err(|e| e.to_string())?);
            map.declare(Group::hash("users", KeyType::Bigint).table("users", "user_id"));
            Ok(Change::new("replica", "pg1 has a replica"))
        })
        .await
        .expect("add replica to map");
    create_table(
        &cluster,
        &saved.map,
        "users",
        "user_id bigint PRIMARY KEY, name text",
    )
    .await;
    // Wait until the replica has replayed the table.
    let (replica_client, connection) =
        tokio_postgres::connect(&replica.conninfo(), tokio_postgres::NoTls)
            .await
            .expect("connect to the replica");
    tokio::spawn(connection);
    assert!(
        eventually(Duration::from_secs(10), || async {
            replica_client
                .query_one("SELECT to_regclass('users') IS NOT NULL", &[])
                .await
                .is_ok_and(|row| row.get::<_, bool>(0))
        })
        .await,
        "the replica replays the schema"
    );
    let proxy = TestProxy::start(&cluster, "replicas", |_| {}).await;
    let client = proxy.connect().await;
    assert!(
        !in_recovery(&client).await,
        "by default reads go to the primary"
    );
    client
        .batch_execute("SET shardline.read_replica = on")
        .await
        .expect("opt in");
    assert!(
        in_recovery(&client).await,
        "opted-in reads go to the replica"
    );
    client
        .execute(
            "INSERT INTO users (user_id, name) VALUES ($1, 'w')",
            &[&1_i64],
        )
        .await
        .expect("writes still go to the primary");
    let value = first_value(&client, "SHOW shardline.read_replica").await;
    assert_eq!(value.as_deref(), Some("on"));
    // A read-write transaction stays on the primary, even for reads.
    client.batch_execute("BEGIN").await.expect("begin");
    assert!(
        !in_recovery(&client).await,
        "reads in a read-write transaction use the primary"
    );
    client.batch_execute("COMMIT").await.expect("commit");
    client
        .batch_execute("SET shardline.read_replica = off")
        .await
        .expect("opt out");
    assert!(!in_recovery(&client).await);
    // BEGIN READ ONLY opts in for one transaction.
    client
        .batch_execute("BEGIN READ ONLY")
        .await
        .expect("begin read only");
    assert!(
        in_recovery(&client).await,
        "a READ ONLY transaction may use the replica"
    );
    client.batch_execute("COMMIT").await.expect("commit");
    let err = client
        .batch_execute("SET shardline.read_replica = maybe")
        .await
        .expect_err("bad value");
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
    // The extended protocol too (drivers send SET as a prepared statement).
    client
        .execute("SET shardline.read_replica = on", &[])
        .await
        .expect("extended SET");
    assert!(
        in_recovery(&client).await,
        "the extended-protocol SET took effect"
    );
    let err = client
        .execute("SET shardline.read_replica = maybe", &[])
        .await
        .expect_err("bad value");
    assert_eq!(err.code().map(|c| c.code()), Some("22023"));
}

async fn in_recovery(client: &tokio_postgres::Client) -> bool {
    let row = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("query");
    row.get::<_, bool>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_never_leak_between_clients_sharing_a_backend() {
    let cluster = TestCluster::start(3);
    let (_store, _map) = setup(&cluster).await;
    // One connection per server: both clients must share it.
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let show = |client: tokio_postgres::Client| async move {
        let value = first_value(&client, "SHOW statement_timeout").await;
        (client, value.expect("a value"))
    };
    let a = proxy.connect().await;
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .expect("set");
    let (a, value) = show(a).await;
    assert_eq!(value, "1234ms");
    let b = proxy.connect().await;
    let (b, value) = show(b).await;
    assert_eq!(value, "0", "client B must not see client A's setting");
    // Changed through a multi-statement Query and through the extended protocol too.
    a.batch_execute("SET statement_timeout = '2s'; SELECT 1")
        .await
        .expect("multi");
    let (b, value) = show(b).await;
    assert_eq!(value, "0");
    a.execute("SET statement_timeout = '3s'", &[])
        .await
        .expect("extended SET");
    let (_b, value) = show(b).await;
    assert_eq!(value, "0");
    let (_a, value) = show(a).await;
    assert_eq!(
        value, "1234ms",
        "untracked changes are reset; tracked ones replayed"
    );
}

/// DDL runs on every server over pooled connections too: one whose session
/// state a client changed untracked (a SET inside a multi-statement Query)
/// is reset first, as for any statement, so the DDL alters the table its
/// own client's search_path names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_a_connection_with_untracked_settings_runs_under_the_clients_own() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    // One connection per server: the DDL gets the ones the SETs were on.
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let a = proxy.connect().await;
    let keys = key_per_server(&cluster, &map, "users");
    leave_untracked_search_path(&cluster, &a, ("users", "user_id bigint"), "user_id", &keys).await;
    let b = proxy.connect().await;
    b.batch_execute("ALTER TABLE users ADD COLUMN nickname text")
        .await
        .expect("DDL through the proxy");
    for index in 0..3 {
        let altered = text_rows(
            &cluster.connect(index).await,
            "SELECT table_schema FROM information_schema.columns \
             WHERE table_name = 'users' AND column_name = 'nickname'",
        )
        .await;
        assert_eq!(
            altered,
            vec![vec!["public".to_string()]],
            "server {index}: client B's search_path names public.users"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_runs_in_a_failed_transaction() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    // With cross_server = refuse (transactions over several servers,
    // the default, are tested in cross_server_tx.rs).
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config.transactions.cross_server = proxy::config::CrossServer::Refuse;
    })
    .await;
    let client = proxy.connect().await;
    let a = 1_i64;
    let b = key_on_another_server(&map, a);
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!(
            "INSERT INTO users (user_id, name) VALUES ({a}, 'a')"
        ))
        .await
        .expect("first");
    let err = client
        .batch_execute(&format!(
            "INSERT INTO users (user_id, name) VALUES ({b}, 'b')"
        ))
        .await
        .expect_err("other server");
    assert_eq!(err.code().map(|c| c.code()), Some("0A000"));
    let err = client
        .batch_execute(&format!(
            "INSERT INTO users (user_id, name) VALUES ({a} + 1000, 'c'); COMMIT"
        ))
        .await
        .expect_err("statements of a failed transaction are refused");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let inserted = servers_holding(
        &cluster,
        "users",
        &format!("user_id IN ({a}, {b}, {})", a + 1000),
    )
    .await;
    assert!(
        inserted.is_empty(),
        "nothing of the failed transaction was committed: {inserted:?}"
    );
    client
        .batch_execute(&format!(
            "INSERT INTO users (user_id, name) VALUES ({a}, 'after')"
        ))
        .await
        .expect("the session works after ROLLBACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_unnamed_statements_stay_prepared_and_survive_a_column_change() {
    use std::sync::atomic::Ordering;
    use tokio_postgres::types::Type;
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    // One connection per server: every request below shares it.
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let metrics = &proxy.shared.metrics;
    let client = proxy.connect().await;
    client
        .batch_execute("INSERT INTO settings (name, value) VALUES ('color', 'blue')")
        .await
        .expect("insert");
    // query_typed sends Parse/Bind/Describe/Execute/Sync on the unnamed statement.
    let select = "SELECT * FROM settings WHERE name = $1";
    let read = |expected_columns: usize| {
        let client = &client;
        async move {
            let rows = client
                .query_typed(select, &[(&"color", Type::TEXT)])
                .await
                .unwrap_or_else(|e| panic!("unnamed select through the proxy: {e}"));
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].columns().len(), expected_columns);
            assert_eq!(rows[0].get::<_, String>(1), "blue");
        }
    };
    let threshold = proxy.shared.config.pool.prepare_unnamed_after as u64;
    for _ in 0..threshold + 3 {
        read(2).await;
    }
    let kept = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    assert_eq!(
        kept, 4,
        "from the {threshold}th parse on, the statement runs kept prepared"
    );

    // A column added behind the proxy's back: the server refuses the kept
    // statement's stale plan; the proxy must send the request again, unseen.
    let TableKind::Unsharded { home } = &map.tables["settings"].kind else {
        panic!("settings is unsharded");
    };
    cluster
        .connect(cluster.server_index(home))
        .await
        .batch_execute("ALTER TABLE settings ADD COLUMN note text DEFAULT 'n'")
        .await
        .expect("alter on the home server");
    read(3).await;
    assert_eq!(metrics.stale_plan_retries.load(Ordering::Relaxed), 1);
    for _ in 0..threshold {
        read(3).await;
    }
    assert_eq!(
        metrics.stale_plan_retries.load(Ordering::Relaxed),
        1,
        "the stale statement was dropped, not retried on every request"
    );
    assert!(metrics.kept_prepared_runs.load(Ordering::Relaxed) > kept + 1);

    // In the middle of a transaction nothing could be sent again: a statement
    // that returns rows runs kept there only as prepared under the catalog
    // of now — here it was prepared again after the stale plan, which the
    // proxy counted as a catalog change — and the transaction works (see
    // kept_in_transactions for the rest).
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute("SELECT count(*) FROM settings")
        .await
        .expect("the transaction's first statement");
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    read(3).await;
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed),
        before + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_simple_queries_run_prepared_with_the_same_results_and_errors() {
    use std::sync::atomic::Ordering;
    use tokio_postgres::SimpleQueryMessage;
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let metrics = &proxy.shared.metrics;
    let client = proxy.connect().await;
    client
        .batch_execute("INSERT INTO users (user_id, name) VALUES (42, 'ada')")
        .await
        .expect("insert");
    // Rows as text, as a simple Query returns them, with the column count.
    let rows = |sql: &'static str| text_rows(&client, sql);
    let select = "SELECT * FROM users WHERE user_id = 42";
    let after = proxy.shared.config.pool.prepare_simple_after as u64;
    for _ in 0..after + 3 {
        assert_eq!(rows(select).await, vec![vec!["42", "ada"]]);
    }
    assert_eq!(metrics.kept_prepared_runs.load(Ordering::Relaxed), 4);
    // No rows, and a statement without a result: same replies as a Query.
    for _ in 0..after + 1 {
        assert!(rows("SELECT name FROM users WHERE user_id = 4242")
            .await
            .is_empty());
        let messages = client
            .simple_query("UPDATE users SET name = name WHERE user_id = 42")
            .await
            .expect("update");
        assert!(
            matches!(
                messages.as_slice(),
                [SimpleQueryMessage::CommandComplete(1)]
            ),
            "an UPDATE replies with its tag only: {messages:?}"
        );
    }
    assert_eq!(metrics.kept_prepared_runs.load(Ordering::Relaxed), 8);
    // An error while running (division by zero) reaches the client as is,
    // and the session goes on.
    for _ in 0..after + 1 {
        let error = client
            .simple_query("SELECT user_id / (user_id - user_id) FROM users WHERE user_id = 42")
            .await
            .expect_err("division by zero");
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
        );
    }
    assert_eq!(metrics.kept_prepared_runs.load(Ordering::Relaxed), 10);
    assert_eq!(rows(select).await, vec![vec!["42", "ada"]]);
    // Literals in places a parameter would change the meaning stay literals.
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for _ in 0..after + 1 {
        assert_eq!(
            rows("SELECT user_id, name FROM users WHERE user_id = 42 ORDER BY 2 LIMIT 1").await,
            vec![vec!["42", "ada"]]
        );
        // A quoted constant is valued when parsed ('today', time zones).
        assert_eq!(
            rows("SELECT name FROM users WHERE user_id = 42 AND name <> 'x'").await,
            vec![vec!["ada"]]
        );
    }
    assert_eq!(metrics.kept_prepared_runs.load(Ordering::Relaxed), before);

    // A column added on the owner: the kept statement's plan is stale; the
    // proxy drops it and the client sees the new column, no error.
    let owner = owner(&map, "users", KeyValue::Int(42));
    cluster
        .connect(cluster.server_index(&owner))
        .await
        .batch_execute("ALTER TABLE users ADD COLUMN note text DEFAULT 'n'")
        .await
        .expect("alter on the owner");
    assert_eq!(rows(select).await, vec![vec!["42", "ada", "n"]]);
    assert_eq!(metrics.stale_plan_retries.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_connection_keeps_no_more_statements() {
    use std::sync::atomic::Ordering;
    let cluster = TestCluster::start(3);
    let (_store, _map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| {
        c.pool.size = 1;
        c.pool.max_prepared_unnamed = 1;
    })
    .await;
    let metrics = &proxy.shared.metrics;
    let client = proxy.connect().await;
    client
        .batch_execute("INSERT INTO users (user_id, name) VALUES (7, 'grace')")
        .await
        .expect("insert");
    let after = proxy.shared.config.pool.prepare_simple_after as u64;
    let count = |sql: &'static str| {
        let client = &client;
        async move { text_rows(client, sql).await.len() }
    };
    for _ in 0..after + 1 {
        assert_eq!(count("SELECT name FROM users WHERE user_id = 7").await, 1);
    }
    assert_eq!(metrics.kept_prepared_runs.load(Ordering::Relaxed), 2);
    for _ in 0..after + 1 {
        assert_eq!(
            count("SELECT user_id FROM users WHERE user_id = 7").await,
            1
        );
    }
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed),
        2,
        "the connection already keeps one statement: the second runs as sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_query_connections_count_together() {
    use std::sync::atomic::Ordering;
    let cluster = TestCluster::start(3);
    let (_store, _map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let after = proxy.shared.config.pool.prepare_simple_after as u64;
    for _ in 0..after + 1 {
        // A client that connects, runs one query and leaves.
        let client = proxy.connect().await;
        assert!(
            text_rows(&client, "SELECT name FROM users WHERE user_id = 9")
                .await
                .is_empty()
        );
    }
    assert_eq!(
        proxy
            .shared
            .metrics
            .kept_prepared_runs
            .load(Ordering::Relaxed),
        2,
        "the {after}th and later uses run kept, whichever client sends them"
    );
}
