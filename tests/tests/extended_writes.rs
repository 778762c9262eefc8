//! Writes across servers in the extended protocol and bulk loads, through
//! the real proxy and 3 real Postgres servers, read back on the servers
//! directly: a multi-row INSERT with parameters (binary, as tokio-postgres
//! sends them) returns its rows in VALUES order; UPDATE/DELETE without a key
//! reach every server; inside a transaction the parts are legs of it
//! (ROLLBACK leaves nothing); a failing part leaves nothing anywhere; COPY
//! FROM STDIN started by an Execute (tokio-postgres `copy_in`, binary and
//! text) is split by owner; and 100,000 rows loaded with multi-row INSERTs,
//! in the simple and the extended protocol, land each once on its owner.

use futures_util::{pin_mut, SinkExt};
use shardline_tests::fixtures::{
    check_placement, create_table, init_schema, key_per_server, prepared_left,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, Table};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

const CLUSTER: &str = "extwrites";

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("accounts", "user_id"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "accounts",
        "user_id bigint PRIMARY KEY, note text, balance int",
    )
    .await;
    map
}

async fn count_everywhere(cluster: &TestCluster, sql: &str) -> Vec<i64> {
    let mut counts = Vec::new();
    for index in 0..3 {
        let row = cluster
            .connect(index)
            .await
            .query_one(sql, &[])
            .await
            .expect("count on the server");
        counts.push(row.get::<_, i64>(0));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_writes_across_servers() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    // Keys on servers 2, 0, 1: VALUES order is not server order.
    let per_server = key_per_server(&cluster, &map, "accounts");
    let keys = [per_server[2], per_server[0], per_server[1]];
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    // Multi-row INSERT with parameters, RETURNING in VALUES order.
    let balances = [30i32, 10, 20];
    let rows = client
        .query(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, $2, $3), ($4, $2, $5), ($6, $2, $7) RETURNING user_id, balance",
            &[&keys[0], &"ext", &balances[0], &keys[1], &balances[1], &keys[2], &balances[2]],
        )
        .await
        .expect("multi-row INSERT across servers");
    let returned: Vec<(i64, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        returned,
        vec![(keys[0], 30), (keys[1], 10), (keys[2], 20)],
        "RETURNING rows in VALUES order"
    );
    check_placement(&cluster, &map, "accounts", "user_id", "ext", &keys).await;

    // The same statement prepared once, executed twice (named statement).
    let statement = client
        .prepare(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'prep', 1), ($2, 'prep', 2)",
        )
        .await
        .expect("prepare");
    let inserted = client
        .execute(&statement, &[&(keys[0] + 100_000), &(keys[1] + 100_000)])
        .await
        .expect("first run");
    let inserted_again = client
        .execute(&statement, &[&(keys[2] + 100_000), &(keys[0] + 200_000)])
        .await
        .expect("second run");
    assert_eq!((inserted, inserted_again), (2, 2), "INSERT counts");

    // UPDATE and DELETE without a key run on every server.
    let updated = client
        .execute(
            "UPDATE accounts SET balance = balance + $1 WHERE note = $2",
            &[&5i32, &"ext"],
        )
        .await
        .expect("UPDATE without a key");
    assert_eq!(updated, 3, "UPDATE count over all servers");
    assert_eq!(
        count_everywhere(
            &cluster,
            "SELECT count(*) FROM accounts WHERE note = 'ext' AND balance > 10"
        )
        .await
        .iter()
        .sum::<i64>(),
        3,
        "every server's rows were updated"
    );
    let deleted = client
        .execute(
            "DELETE FROM accounts WHERE user_id = ANY($1) AND note = 'prep'",
            &[&vec![
                keys[0] + 100_000,
                keys[2] + 100_000,
                keys[0] + 200_000,
            ]],
        )
        .await
        .expect("DELETE of keys on several servers");
    assert_eq!(deleted, 3, "DELETE count");

    // Inside a transaction: the parts are legs of it; ROLLBACK undoes all.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let inserted = client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'tx', 1), ($2, 'tx', 1), ($3, 'tx', 1)",
            &[&(keys[0] + 300_000), &(keys[1] + 300_000), &(keys[2] + 300_000)],
        )
        .await
        .expect("INSERT in a transaction");
    assert_eq!(inserted, 3);
    let seen: i64 = client
        .query_one("SELECT count(*) FROM accounts WHERE note = 'tx'", &[])
        .await
        .expect("read across servers in the transaction")
        .get(0);
    assert_eq!(seen, 3, "the transaction sees its own rows");
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    check_placement(&cluster, &map, "accounts", "user_id", "tx", &[]).await;

    // The same, committed.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'txc', 1), ($2, 'txc', 1), ($3, 'txc', 1)",
            &[&(keys[0] + 400_000), &(keys[1] + 400_000), &(keys[2] + 400_000)],
        )
        .await
        .expect("INSERT in a transaction");
    client.batch_execute("COMMIT").await.expect("COMMIT");
    let committed: Vec<i64> = keys.iter().map(|k| k + 400_000).collect();
    check_placement(&cluster, &map, "accounts", "user_id", "txc", &committed).await;

    // A part that fails (a duplicate key on one server) leaves nothing.
    let error = client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'dup', 1), ($2, 'dup', 1), ($3, 'dup', 1)",
            &[&(keys[0] + 500_000), &(keys[1] + 500_000), &keys[2]],
        )
        .await
        .expect_err("a duplicate key fails the INSERT");
    assert_eq!(
        error.code().map(|c| c.code()),
        Some("23505"),
        "the server's error reaches the client: {error}"
    );
    check_placement(&cluster, &map, "accounts", "user_id", "dup", &[]).await;
    assert_eq!(prepared_left(&cluster).await, 0, "nothing left prepared");

    // The session still works after the failure.
    let total: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count after the failure")
        .get(0);
    assert_eq!(total, 7, "3 'ext' rows, 1 'prep' row and 3 'txc' rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_started_by_execute_is_split_by_owner() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    // Binary COPY, as tokio-postgres's BinaryCopyInWriter sends it.
    let sink = client
        .copy_in("COPY accounts (user_id, note, balance) FROM STDIN (FORMAT binary)")
        .await
        .expect("COPY started by Bind/Execute");
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::INT4]);
    pin_mut!(writer);
    let keys: Vec<i64> = (1..=20_000).collect();
    for key in &keys {
        let balance = (*key % 100) as i32;
        let row: [&(dyn ToSql + Sync); 3] = [key, &"binary", &balance];
        writer.as_mut().write(&row).await.expect("write a row");
    }
    let copied = writer.finish().await.expect("COPY finishes");
    assert_eq!(copied, 20_000, "COPY count is the total over the servers");
    check_placement(&cluster, &map, "accounts", "user_id", "binary", &keys).await;
    let per_server = count_everywhere(&cluster, "SELECT count(*) FROM accounts").await;
    assert!(
        per_server.iter().all(|n| *n > 0),
        "rows on every server: {per_server:?}"
    );

    // Text COPY with a bad row in the middle: nothing anywhere, and the
    // session goes on.
    let sink = client
        .copy_in("COPY accounts (user_id, note, balance) FROM STDIN")
        .await
        .expect("text COPY");
    pin_mut!(sink);
    let mut data = String::new();
    for key in 100_001..=101_000 {
        data.push_str(&format!("{key}\ttext\t1\n"));
    }
    data.push_str("not-a-number\ttext\t1\n");
    for key in 101_001..=102_000 {
        data.push_str(&format!("{key}\ttext\t1\n"));
    }
    let sent = sink.send(bytes::Bytes::from(data)).await;
    let finished = match sent {
        Ok(()) => sink.finish().await,
        Err(e) => Err(e),
    };
    let error = finished.expect_err("a bad key fails the COPY");
    assert!(
        error.code().is_some(),
        "the client gets an ErrorResponse: {error}"
    );
    check_placement(&cluster, &map, "accounts", "user_id", "text", &[]).await;
    assert_eq!(prepared_left(&cluster).await, 0, "nothing left prepared");
    let total: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("the session works after the failed COPY")
        .get(0);
    assert_eq!(total, 20_000);

    // Inside a transaction, rolled back.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    let sink = client
        .copy_in("COPY accounts (user_id, note, balance) FROM STDIN (FORMAT csv)")
        .await
        .expect("COPY in a transaction");
    pin_mut!(sink);
    let data: String = (200_001..=200_300)
        .map(|k| format!("{k},csv,1\n"))
        .collect();
    sink.send(bytes::Bytes::from(data))
        .await
        .expect("send rows");
    assert_eq!(sink.finish().await.expect("COPY in a transaction"), 300);
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    check_placement(&cluster, &map, "accounts", "user_id", "csv", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_rows_by_multi_row_insert() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    // Simple protocol: 10 INSERTs of 10,000 rows each.
    let keys: Vec<i64> = (1..=100_000).collect();
    for chunk in keys.chunks(10_000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|k| format!("({k}, 'simple', {})", k % 1000))
            .collect();
        let inserted = client
            .execute(
                &format!(
                    "INSERT INTO accounts (user_id, note, balance) VALUES {}",
                    values.join(", ")
                ),
                &[],
            )
            .await;
        // tokio-postgres sends a statement without parameters through the
        // extended protocol; batch_execute sends a simple Query.
        assert_eq!(inserted.expect("10,000-row INSERT"), 10_000);
    }
    check_placement(&cluster, &map, "accounts", "user_id", "simple", &keys).await;
    client
        .batch_execute("DELETE FROM accounts")
        .await
        .expect("DELETE across servers");
    assert_eq!(
        count_everywhere(&cluster, "SELECT count(*) FROM accounts").await,
        vec![0, 0, 0]
    );

    // The simple protocol proper (batch_execute: a Query message).
    for chunk in keys.chunks(25_000) {
        let values: Vec<String> = chunk.iter().map(|k| format!("({k}, 'query', 1)")).collect();
        client
            .batch_execute(&format!(
                "INSERT INTO accounts (user_id, note, balance) VALUES {}",
                values.join(", ")
            ))
            .await
            .expect("25,000-row INSERT as a simple Query");
    }
    check_placement(&cluster, &map, "accounts", "user_id", "query", &keys).await;
    client
        .batch_execute("DELETE FROM accounts")
        .await
        .expect("DELETE across servers");

    // Extended protocol with parameters: 1,000 rows of 2 parameters each.
    let statement = {
        let values: Vec<String> = (0..1000)
            .map(|i| format!("(${}, 'bound', ${})", 2 * i + 1, 2 * i + 2))
            .collect();
        client
            .prepare(&format!(
                "INSERT INTO accounts (user_id, note, balance) VALUES {}",
                values.join(", ")
            ))
            .await
            .expect("prepare a 1,000-row INSERT")
    };
    for chunk in keys.chunks(1000) {
        let balances: Vec<i32> = chunk.iter().map(|k| (*k % 1000) as i32).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(2000);
        for (key, balance) in chunk.iter().zip(&balances) {
            params.push(key);
            params.push(balance);
        }
        let inserted = client
            .execute(&statement, &params)
            .await
            .expect("1,000-row INSERT with parameters");
        assert_eq!(inserted, 1000);
    }
    check_placement(&cluster, &map, "accounts", "user_id", "bound", &keys).await;
    assert_eq!(prepared_left(&cluster).await, 0, "nothing left prepared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_writes_and_ddl_in_the_extended_protocol() {
    let cluster = TestCluster::start(3);
    let (_store, map) = init_schema(&cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("accounts", "user_id"));
        map.declare_table(Table::reference("countries"));
        // The last server by name is in this proxy's region.
        if let Some(server) = map.servers.values_mut().last() {
            server.region = Some("eu".into());
        }
        // Recorded as `shardctl table create` records them.
        map.columns.insert(
            "accounts".into(),
            "user_id bigint PRIMARY KEY, note text, balance int".into(),
        );
    })
    .await;
    create_table(
        &cluster,
        &map,
        "accounts",
        "user_id bigint PRIMARY KEY, note text, balance int",
    )
    .await;
    create_table(
        &cluster,
        &map,
        "countries",
        "code text PRIMARY KEY, name text",
    )
    .await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config.region = Some("eu".into());
    })
    .await;
    let client = proxy.connect().await;

    // Reference reads go to a server of the proxy's region: a row put on
    // that server only (behind the proxy's back) is what the proxy reads.
    let local = map
        .servers
        .values()
        .find(|s| s.region.as_deref() == Some("eu"))
        .map(|s| cluster.server_index(&s.name))
        .expect("a server in region eu");
    cluster
        .connect(local)
        .await
        .batch_execute("INSERT INTO countries VALUES ('zz', 'local only')")
        .await
        .expect("a row on the local server");
    for _ in 0..3 {
        let n: i64 = client
            .query_one("SELECT count(*) FROM countries WHERE code = $1", &[&"zz"])
            .await
            .expect("reference read")
            .get(0);
        assert_eq!(n, 1, "the reference read went to the proxy's region");
    }
    cluster
        .connect(local)
        .await
        .batch_execute("DELETE FROM countries WHERE code = 'zz'")
        .await
        .expect("remove the local-only row");

    // A reference write with parameters reaches every server; the client
    // gets one server's count and RETURNING rows.
    let rows = client
        .query(
            "INSERT INTO countries (code, name) VALUES ($1, $2), ($3, $4) RETURNING code",
            &[&"fr", &"France", &"de", &"Germany"],
        )
        .await
        .expect("reference INSERT with parameters");
    let codes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(codes, vec!["fr".to_string(), "de".to_string()]);
    let updated = client
        .execute(
            "UPDATE countries SET name = upper(name) WHERE code = $1",
            &[&"fr"],
        )
        .await
        .expect("reference UPDATE");
    assert_eq!(updated, 1, "one server's count, not the sum");
    assert_eq!(
        count_everywhere(
            &cluster,
            "SELECT count(*) FROM countries WHERE name IN ('FRANCE', 'Germany')"
        )
        .await,
        vec![2, 2, 2],
        "the same rows on every server"
    );

    // DDL sent through the extended protocol (as pgjdbc and tokio-postgres
    // send it) runs on every server; the map's column list follows.
    client
        .execute("CREATE INDEX accounts_note ON accounts (note)", &[])
        .await
        .expect("CREATE INDEX through the extended protocol");
    assert_eq!(
        count_everywhere(
            &cluster,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_note'"
        )
        .await,
        vec![1, 1, 1],
        "the index on every server's parent"
    );
    client
        .execute("ALTER TABLE accounts ADD COLUMN region text", &[])
        .await
        .expect("ADD COLUMN through the extended protocol");
    let keys = key_per_server(&cluster, &map, "accounts");
    for key in &keys {
        client
            .execute("INSERT INTO accounts VALUES ($1, 'ddl', 1, 'eu')", &[key])
            .await
            .expect("INSERT without a column list after ADD COLUMN");
    }
    check_placement(&cluster, &map, "accounts", "user_id", "ddl", &keys).await;
    // DDL that breaks sharding is refused, in this protocol too.
    let error = client
        .execute("ALTER TABLE accounts DROP COLUMN user_id", &[])
        .await
        .expect_err("dropping the key column");
    assert_eq!(error.code().map(|c| c.code()), Some("0A000"), "{error}");
    assert_eq!(prepared_left(&cluster).await, 0, "nothing left prepared");
}
