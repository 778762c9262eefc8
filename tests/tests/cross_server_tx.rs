//! Transactions that write on several servers, through the real proxy and 3
//! real Postgres servers: COMMIT makes every server's rows visible (two-phase
//! commit, nothing left prepared), ROLLBACK and any failure — a statement's
//! error, a constraint checked only at commit — leave none anywhere; a read
//! across servers inside the transaction sees all of its writes; COMMIT in
//! the extended protocol (as pgjdbc sends it) works too; and
//! `shardline.cross_server = refuse` keeps the old refusal. In the simple
//! protocol, a multi-row INSERT over several servers (RETURNING in VALUES
//! order) and UPDATE/DELETE without a key run on every server concerned,
//! all or nothing, in and outside transactions. A rolled-back transaction's
//! later servers keep no session state another client left on them.

use shardline_tests::fixtures::{
    create_table, init_schema, key_per_server, leave_untracked_search_path, prepared_left,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue};

const CLUSTER: &str = "crosstx";
const PARTITIONS: u32 = 16;

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, PARTITIONS, |map| {
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .table("accounts", "user_id")
                .table("ledger", "user_id"),
        );
    })
    .await;
    create_table(
        cluster,
        &map,
        "accounts",
        "user_id bigint PRIMARY KEY, note text, balance int",
    )
    .await;
    // Checked at COMMIT, so a duplicate fails at PREPARE TRANSACTION.
    create_table(
        cluster,
        &map,
        "ledger",
        "user_id bigint, entry int, note text, CONSTRAINT ledger_once UNIQUE (user_id, entry) DEFERRABLE INITIALLY DEFERRED",
    )
    .await;
    map
}

/// Rows of `note` on each server, read there directly.
async fn rows_on_servers(cluster: &TestCluster, table: &str, note: &str) -> Vec<i64> {
    let mut counts = Vec::new();
    for index in 0..3 {
        let row = cluster
            .connect(index)
            .await
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE note = $1"),
                &[&note],
            )
            .await
            .expect("count on the server");
        counts.push(row.get::<_, i64>(0));
    }
    counts
}

/// Through `client`, one `accounts` row per key with `note` and `balance`,
/// each a simple-protocol INSERT of its own.
async fn insert_accounts(
    client: &tokio_postgres::Client,
    keys: impl IntoIterator<Item = i64>,
    note: &str,
    balance: i32,
) {
    for key in keys {
        client
            .batch_execute(&format!(
                "INSERT INTO accounts (user_id, note, balance) VALUES ({key}, '{note}', {balance})"
            ))
            .await
            .unwrap_or_else(|e| panic!("INSERT of {key} ({note}): {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_three_servers_commits_everywhere_or_nowhere() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    // (key, index of its server)
    let keys: Vec<(i64, usize)> = key_per_server(&cluster, &map, "accounts")
        .into_iter()
        .zip(0..)
        .collect();
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    // COMMIT: simple-protocol statements on every server, then a read
    // across servers that sees them all before they are committed.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    insert_accounts(&client, keys.iter().map(|&(key, _)| key), "committed", 10).await;
    let seen: i64 = client
        .query_one(
            "SELECT count(*) FROM accounts WHERE note = 'committed'",
            &[],
        )
        .await
        .expect("read across servers in the transaction")
        .get(0);
    assert_eq!(
        seen, 3,
        "the transaction's read across servers must see its writes on every server"
    );
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "committed").await,
        vec![0, 0, 0],
        "nothing is visible before COMMIT"
    );
    client
        .batch_execute("COMMIT")
        .await
        .expect("COMMIT over three servers");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "committed").await,
        vec![1, 1, 1]
    );
    assert_eq!(
        prepared_left(&cluster).await,
        0,
        "no prepared transaction may be left behind"
    );

    // Extended protocol throughout, COMMIT included (as pgjdbc sends it),
    // and back to an earlier server (its leg is reused).
    client
        .execute("BEGIN", &[])
        .await
        .expect("BEGIN (extended)");
    for (key, _) in keys.iter().chain(keys.first()) {
        client
            .execute(
                "INSERT INTO ledger (user_id, entry, note) VALUES ($1, (SELECT count(*) FROM ledger WHERE user_id = $1)::int, 'extended')",
                &[key],
            )
            .await
            .expect("INSERT (extended) in the transaction");
    }
    client
        .execute("COMMIT", &[])
        .await
        .expect("COMMIT (extended)");
    assert_eq!(rows_on_servers(&cluster, "ledger", "extended").await, {
        let mut want = vec![1, 1, 1];
        want[keys[0].1] = 2;
        want
    });

    // ROLLBACK: nothing anywhere.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    for (key, _) in &keys {
        client
            .execute(
                "UPDATE accounts SET note = 'rolled back' WHERE user_id = $1",
                &[key],
            )
            .await
            .expect("UPDATE in the transaction");
    }
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "rolled back").await,
        vec![0, 0, 0]
    );
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "committed").await,
        vec![1, 1, 1]
    );

    // A statement fails on the second server: the transaction is aborted,
    // COMMIT answers ROLLBACK, the first server's write is gone too.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .execute(
            "UPDATE accounts SET note = 'failed' WHERE user_id = $1",
            &[&keys[0].0],
        )
        .await
        .expect("UPDATE on the first server");
    let duplicate = client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'failed', 0)",
            &[&keys[1].0],
        )
        .await
        .expect_err("a duplicate key on the second server");
    assert_eq!(
        duplicate.code().map(|c| c.code()),
        Some("23505"),
        "{duplicate:?}"
    );
    let aborted = client
        .execute(
            "UPDATE accounts SET note = 'failed' WHERE user_id = $1",
            &[&keys[2].0],
        )
        .await
        .expect_err("an aborted transaction refuses more statements");
    assert_eq!(
        aborted.code().map(|c| c.code()),
        Some("25P02"),
        "{aborted:?}"
    );
    client
        .batch_execute("COMMIT")
        .await
        .expect("COMMIT of an aborted transaction");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "failed").await,
        vec![0, 0, 0]
    );

    // A constraint checked at commit fails PREPARE TRANSACTION on one
    // server: the client gets its error and no server keeps anything.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    for (key, _) in &keys {
        client
            .execute(
                "INSERT INTO ledger (user_id, entry, note) VALUES ($1, 100, 'deferred')",
                &[key],
            )
            .await
            .expect("INSERT in the transaction");
    }
    client
        .execute(
            "INSERT INTO ledger (user_id, entry, note) VALUES ($1, 100, 'deferred')",
            &[&keys[2].0],
        )
        .await
        .expect("a duplicate is accepted until commit (deferred constraint)");
    let at_commit = client
        .batch_execute("COMMIT")
        .await
        .expect_err("the deferred unique constraint fails at commit");
    assert_eq!(
        at_commit.code().map(|c| c.code()),
        Some("23505"),
        "{at_commit:?}"
    );
    assert_eq!(
        rows_on_servers(&cluster, "ledger", "deferred").await,
        vec![0, 0, 0]
    );
    assert_eq!(prepared_left(&cluster).await, 0);

    // The session is usable afterwards, and a savepoint cannot span servers.
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .execute(
            "UPDATE accounts SET balance = balance + 1 WHERE user_id = $1",
            &[&keys[0].0],
        )
        .await
        .expect("UPDATE");
    client
        .execute(
            "UPDATE accounts SET balance = balance + 1 WHERE user_id = $1",
            &[&keys[1].0],
        )
        .await
        .expect("UPDATE on a second server");
    let savepoint = client
        .batch_execute("SAVEPOINT a")
        .await
        .expect_err("a savepoint in a transaction over two servers");
    assert_eq!(
        savepoint.code().map(|c| c.code()),
        Some("0A000"),
        "{savepoint:?}"
    );
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    let balances: i64 = client
        .query_one(
            "SELECT sum(balance)::int8 FROM accounts WHERE note = 'committed'",
            &[],
        )
        .await
        .expect("sum across servers")
        .get(0);
    assert_eq!(balances, 30);
}

/// A transaction reaches its second and third servers through legs
/// (`session/legs.rs`): a pooled connection on which another client changed
/// session state untracked (a SET inside a multi-statement Query) is reset
/// before the leg's BEGIN, so that a rollback cannot bring that state back
/// under settings the proxy believes it replayed for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_leaves_no_other_clients_settings_behind() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    // One connection per server: every client gets the ones the SETs were on.
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let keys = key_per_server(&cluster, &map, "accounts");
    let other = proxy.connect().await;
    let shadow = ("accounts", "user_id bigint, note text, balance int");
    leave_untracked_search_path(&cluster, &other, shadow, "user_id", &keys).await;
    let client = proxy.connect().await;
    client.batch_execute("BEGIN").await.expect("BEGIN");
    insert_accounts(&client, keys.iter().copied(), "rolled back", 1).await;
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    let next = proxy.connect().await;
    insert_accounts(&next, keys.iter().copied(), "after", 1).await;
    assert_eq!(
        rows_on_servers(&cluster, "public.accounts", "after").await,
        vec![1, 1, 1]
    );
    assert_eq!(
        rows_on_servers(&cluster, "elsewhere.accounts", "after").await,
        vec![0, 0, 0],
        "no write may follow another client's search_path"
    );
    for table in ["public.accounts", "elsewhere.accounts"] {
        assert_eq!(
            rows_on_servers(&cluster, table, "rolled back").await,
            vec![0, 0, 0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_server_refuse_keeps_a_transaction_on_one_server() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    // (key, index of its server)
    let keys: Vec<(i64, usize)> = key_per_server(&cluster, &map, "accounts")
        .into_iter()
        .zip(0..)
        .collect();
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config.transactions.cross_server = proxy::config::CrossServer::Refuse;
    })
    .await;
    let client = proxy.connect().await;
    let shown = client
        .simple_query("SHOW shardline.cross_server")
        .await
        .expect("SHOW");
    let value = shown.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("refuse"));
    client.batch_execute("BEGIN").await.expect("BEGIN");
    client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'refused', 1)",
            &[&keys[0].0],
        )
        .await
        .expect("INSERT on the first server");
    let refused = client
        .execute(
            "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'refused', 1)",
            &[&keys[1].0],
        )
        .await
        .expect_err("a second server is refused");
    assert_eq!(
        refused.code().map(|c| c.code()),
        Some("0A000"),
        "{refused:?}"
    );
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "refused").await,
        vec![0, 0, 0]
    );
    let multi_row = client
        .batch_execute(&format!(
            "INSERT INTO accounts (user_id, note, balance) VALUES ({}, 'refused', 1), ({}, 'refused', 1)",
            keys[0].0, keys[1].0
        ))
        .await
        .expect_err("a multi-row INSERT over two servers is refused");
    assert_eq!(
        multi_row.code().map(|c| c.code()),
        Some("0A000"),
        "{multi_row:?}"
    );

    // A session may opt in.
    client
        .batch_execute("SET shardline.cross_server = '2pc'")
        .await
        .expect("SET shardline.cross_server");
    client.batch_execute("BEGIN").await.expect("BEGIN");
    for (key, _) in &keys {
        client
            .execute(
                "INSERT INTO accounts (user_id, note, balance) VALUES ($1, 'opted in', 1)",
                &[key],
            )
            .await
            .expect("INSERT");
    }
    client.batch_execute("COMMIT").await.expect("COMMIT");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "opted in").await,
        vec![1, 1, 1]
    );
}

/// Rows of a simple Query's result: first column of each row, and the
/// CommandComplete count.
async fn simple(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<(Vec<String>, u64), tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    let mut rows = Vec::new();
    let mut count = 0;
    for message in messages {
        match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                rows.push(row.get(0).unwrap_or("NULL").to_string())
            }
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => count = n,
            _ => {}
        }
    }
    Ok((rows, count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_across_servers_in_the_simple_protocol() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    let owner_index = |key: i64| {
        let partition = map
            .partition_of("accounts", &KeyValue::Int(key))
            .expect("partition");
        cluster.server_index(&map.owner_of(partition).expect("owner").name)
    };
    // 30 keys, in an order that interleaves servers.
    let keys: Vec<i64> = (1..=30).map(|k| k * 7919 % 1000).collect();
    let mut per_server = vec![0i64; 3];
    for key in &keys {
        per_server[owner_index(*key)] += 1;
    }
    assert!(
        per_server.iter().all(|n| *n > 0),
        "keys on every server: {per_server:?}"
    );
    let values = |note: &str, keys: &[i64]| {
        keys.iter()
            .map(|k| format!("({k}, '{note}', {k})"))
            .collect::<Vec<_>>()
            .join(", ")
    };

    // Autocommit multi-row INSERT with RETURNING: each row on its owner,
    // returned rows in VALUES order, one count.
    let (returned, count) = simple(
        &client,
        &format!(
            "INSERT INTO accounts (user_id, note, balance) VALUES {} RETURNING user_id",
            values("multi", &keys)
        ),
    )
    .await
    .expect("multi-row INSERT over three servers");
    assert_eq!(count, 30);
    assert_eq!(
        returned,
        keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        "RETURNING rows in VALUES order"
    );
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "multi").await,
        per_server
    );
    assert_eq!(prepared_left(&cluster).await, 0);

    // UPDATE and DELETE without a key run on every server.
    let (_, updated) = simple(
        &client,
        "UPDATE accounts SET balance = balance + 1000 WHERE note = 'multi'",
    )
    .await
    .expect("UPDATE without a key");
    assert_eq!(updated, 30);
    let (sum, _) = simple(
        &client,
        "SELECT sum(balance) FROM accounts WHERE note = 'multi'",
    )
    .await
    .expect("sum");
    assert_eq!(sum, vec![(keys.iter().sum::<i64>() + 30_000).to_string()]);
    let key_update = simple(
        &client,
        "UPDATE accounts SET user_id = user_id + 1 WHERE note = 'multi'",
    )
    .await
    .expect_err("updating the sharding key");
    assert_eq!(
        key_update.code().map(|c| c.code()),
        Some("0A000"),
        "{key_update:?}"
    );

    // A duplicate key on one server: nothing of the statement anywhere.
    let mut clash = vec![5000, 5001, 5002, 5003, 5004, 5005];
    clash.push(keys[0]);
    let duplicate = simple(
        &client,
        &format!(
            "INSERT INTO accounts (user_id, note, balance) VALUES {}",
            values("clash", &clash)
        ),
    )
    .await
    .expect_err("a duplicate key in a multi-row INSERT");
    assert_eq!(
        duplicate.code().map(|c| c.code()),
        Some("23505"),
        "{duplicate:?}"
    );
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "clash").await,
        vec![0, 0, 0]
    );

    // Inside a transaction: rolled back, then committed.
    let more: Vec<i64> = (31..=40).map(|k| k * 7919 % 1000 + 1000).collect();
    client.batch_execute("BEGIN").await.expect("BEGIN");
    simple(
        &client,
        &format!(
            "INSERT INTO accounts (user_id, note, balance) VALUES {}",
            values("in tx", &more)
        ),
    )
    .await
    .expect("multi-row INSERT in a transaction");
    let (seen, _) = simple(
        &client,
        "SELECT count(*) FROM accounts WHERE note = 'in tx'",
    )
    .await
    .expect("read");
    assert_eq!(seen, vec!["10".to_string()]);
    client.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    assert_eq!(
        rows_on_servers(&cluster, "accounts", "in tx").await,
        vec![0, 0, 0]
    );
    client.batch_execute("BEGIN").await.expect("BEGIN");
    simple(
        &client,
        &format!(
            "INSERT INTO accounts (user_id, note, balance) VALUES {}",
            values("in tx", &more)
        ),
    )
    .await
    .expect("multi-row INSERT in a transaction");
    let (deleted, count) = simple(
        &client,
        "DELETE FROM accounts WHERE note = 'multi' RETURNING user_id",
    )
    .await
    .expect("DELETE without a key in the transaction");
    assert_eq!((deleted.len(), count), (30, 30));
    client.batch_execute("COMMIT").await.expect("COMMIT");
    let (left, _) = simple(
        &client,
        "SELECT count(*) FROM accounts WHERE note IN ('multi', 'in tx')",
    )
    .await
    .expect("count");
    assert_eq!(left, vec!["10".to_string()]);
    assert_eq!(prepared_left(&cluster).await, 0);
}
