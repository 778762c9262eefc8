//! Statements kept prepared on the servers inside transactions, through the
//! real proxy to 3 real Postgres servers: the TPC-B-like transaction's
//! statements in the simple protocol (literals sent as parameters, signed
//! ones and VALUES rows included) and in the extended protocol run kept from
//! the threshold on, with the same results as on the servers directly; a
//! statement that returns rows is kept mid-transaction too, dropped from
//! the pooled connections when a column type changes through the proxy,
//! and fails once per connection (as a client's own prepared statement
//! would) when it changes behind the proxy's back; a failure inside a kept
//! statement aborts the transaction exactly as Postgres would; a held-back
//! BEGIN with a SAVEPOINT or SET LOCAL after it opens the transaction in
//! front of an extended-protocol statement; on a database where a rule
//! turns a write into a SELECT, such writes are not kept and return the
//! rule's rows, as a Query of them does on the server, also when the rule
//! is created through the proxy while its connections are pooled; reading
//! the rules waits for no lock.

use std::sync::atomic::Ordering;

use shardline_tests::fixtures::{create_table, init_schema, key_per_server, text_rows};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{Group, KeyType, Table};
use tokio_postgres::SimpleQueryMessage;

const CLUSTER: &str = "kept";

async fn setup(cluster: &TestCluster) -> shardmap::ClusterMap {
    let second = cluster.map_servers()[1].name.clone();
    let (_store, map) = init_schema(cluster, CLUSTER, 16, |map| {
        map.declare_table(Table::unsharded("notes", &second));
        // History rows live with their account, so that each transaction
        // stays on one server.
        map.declare(
            Group::hash("accounts", KeyType::Int)
                .table("accounts", "aid")
                .table("history", "aid"),
        );
    })
    .await;
    create_table(
        cluster,
        &map,
        "accounts",
        "aid int PRIMARY KEY, abalance int NOT NULL",
    )
    .await;
    create_table(
        cluster,
        &map,
        "history",
        "aid int, delta int, big bigint, mtime timestamptz",
    )
    .await;
    create_table(cluster, &map, "notes", "aid int, delta int").await;
    map
}

/// Three servers, a proxy keeping `pool_size` connections per server (one:
/// requests share it), and one account per server with `balance`.
struct Accounts {
    cluster: TestCluster,
    proxy: TestProxy,
    keys: Vec<i64>,
    client: tokio_postgres::Client,
}

impl Accounts {
    async fn open(balance: i32) -> Accounts {
        Accounts::with_pool(balance, 1).await
    }

    async fn with_pool(balance: i32, pool_size: usize) -> Accounts {
        let cluster = TestCluster::start(3);
        let map = setup(&cluster).await;
        let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = pool_size).await;
        let keys = key_per_server(&cluster, &map, "accounts");
        let client = proxy.connect().await;
        for key in &keys {
            client
                .batch_execute(&format!(
                    "INSERT INTO accounts (aid, abalance) VALUES ({key}, {balance})"
                ))
                .await
                .expect("insert an account");
        }
        Accounts {
            cluster,
            proxy,
            keys,
            client,
        }
    }
}

/// Each key's balance, read on the servers directly.
async fn balances(cluster: &TestCluster, keys: &[i64]) -> Vec<i64> {
    let mut found = vec![None; keys.len()];
    for index in 0..cluster.cluster.servers.len() {
        let client = cluster.connect(index).await;
        for (slot, key) in found.iter_mut().zip(keys) {
            let rows = client
                .query(
                    "SELECT abalance::bigint FROM accounts WHERE aid = $1",
                    &[&(*key as i32)],
                )
                .await
                .expect("read a balance on a server");
            if let Some(row) = rows.first() {
                *slot = Some(row.get::<_, i64>(0));
            }
        }
    }
    found
        .into_iter()
        .map(|b| b.expect("every key has its row on some server"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpcb_statements_run_kept_inside_transactions_in_both_protocols() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(0).await;
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_simple_after);
    let rounds = after + 3;
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    // The simple protocol, as pgbench -M simple sends its transaction.
    for round in 0..rounds {
        for key in &keys {
            let delta = -(round as i64) - 1;
            client.batch_execute("BEGIN").await.expect("begin");
            let updated = client
                .simple_query(&format!(
                    "UPDATE accounts SET abalance = abalance + {delta} WHERE aid = {key}"
                ))
                .await
                .expect("update");
            // Kept or not, the Query's replies are Postgres's: the tag alone.
            assert!(
                matches!(updated.as_slice(), [SimpleQueryMessage::CommandComplete(1)]),
                "round {round}: {updated:?}"
            );
            let balance = text_rows(
                &client,
                &format!("SELECT abalance FROM accounts WHERE aid = {key}"),
            )
            .await;
            assert_eq!(balance.len(), 1, "one row for {key}");
            client
                .batch_execute(&format!(
                    "INSERT INTO history (aid, delta, big, mtime) VALUES ({key}, {delta}, -2147483648, CURRENT_TIMESTAMP)"
                ))
                .await
                .expect("insert history");
            client.batch_execute("END").await.expect("commit");
        }
    }
    let simple_kept = metrics.kept_prepared_runs.load(Ordering::Relaxed) - before;
    // UPDATE (one shape: the key is a parameter) and SELECT are kept from
    // the threshold on; the INSERT's -2147483648 (an int4 constant, unlike
    // -$1) is sent as written.
    let runs = rounds * keys.len() as u64;
    assert_eq!(
        simple_kept,
        2 * (runs - (after - 1)),
        "the UPDATE and the SELECT kept from their {after}th run on (and nothing else)"
    );
    let expected: i64 = (1..=rounds as i64).sum();
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![-expected; keys.len()],
        "every delta applied once, on the owner"
    );

    // The extended protocol, as pgbench -M extended: unnamed statements
    // (Parse/Bind/Describe/Execute/Sync each).
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    let update = "UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2";
    let select = "SELECT abalance FROM accounts WHERE aid = $1";
    let insert = "INSERT INTO history (aid, delta, mtime) VALUES ($1, $2, now())";
    for _ in 0..rounds {
        for key in &keys {
            let key = *key as i32;
            client.batch_execute("BEGIN").await.expect("begin");
            client
                .query_typed(update, &[(&1i32, Type::INT4), (&key, Type::INT4)])
                .await
                .expect("update");
            let rows = client
                .query_typed(select, &[(&key, Type::INT4)])
                .await
                .expect("select");
            assert_eq!(rows.len(), 1);
            client
                .query_typed(insert, &[(&key, Type::INT4), (&1i32, Type::INT4)])
                .await
                .expect("insert");
            client.batch_execute("END").await.expect("commit");
        }
    }
    let extended_kept = metrics.kept_prepared_runs.load(Ordering::Relaxed) - before;
    // The SELECT's text is the simple one's with its literal as $1: the
    // same statement, past the threshold already.
    assert_eq!(
        extended_kept,
        2 * (runs - (after - 1)) + runs,
        "the UPDATE and the INSERT kept from their {after}th parse on, the SELECT always"
    );
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![-expected + rounds as i64; keys.len()]
    );
    let history = text_rows(&client, "SELECT count(*), min(big) FROM history").await;
    assert_eq!(
        history,
        vec![vec![(2 * runs).to_string(), "-2147483648".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_writes_stay_prepared_in_transactions_and_fail_as_postgres_fails() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(100).await;
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_unnamed_after);
    let update = "UPDATE accounts SET abalance = abalance / $1 WHERE aid = $2";
    let select = "SELECT abalance FROM accounts WHERE aid = $1";
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    let rounds = after + 2;
    for _ in 0..rounds {
        for key in &keys {
            client.batch_execute("BEGIN").await.expect("begin");
            // query_typed: Parse/Bind/Describe/Execute/Sync of the unnamed statement.
            client
                .query_typed(update, &[(&1i32, Type::INT4), (&(*key as i32), Type::INT4)])
                .await
                .expect("update");
            let rows = client
                .query_typed(select, &[(&(*key as i32), Type::INT4)])
                .await
                .expect("select");
            assert_eq!(rows[0].get::<_, i32>(0), 100);
            client.batch_execute("COMMIT").await.expect("commit");
        }
    }
    let kept = metrics.kept_prepared_runs.load(Ordering::Relaxed) - before;
    let runs = rounds * keys.len() as u64;
    assert_eq!(
        kept,
        2 * (runs - (after - 1)),
        "the UPDATE and the SELECT kept from their {after}th parse on"
    );

    // Division by zero inside a kept UPDATE: the transaction is aborted, the
    // next statement is refused with 25P02, ROLLBACK ends it, nothing stays.
    let key = keys[1] as i32;
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!(
            "UPDATE accounts SET abalance = 7 WHERE aid = {key}"
        ))
        .await
        .expect("first update");
    let kept_before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    let error = client
        .query_typed(update, &[(&0i32, Type::INT4), (&key, Type::INT4)])
        .await
        .expect_err("division by zero");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed),
        kept_before + 1,
        "the failing UPDATE ran kept"
    );
    let refused = client
        .query_typed(update, &[(&1i32, Type::INT4), (&key, Type::INT4)])
        .await
        .expect_err("the transaction is aborted");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
    );
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![100; keys.len()],
        "nothing of the aborted transaction stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameterized_literals_give_what_the_literals_give() {
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(5).await;
    let metrics = &proxy.shared.metrics;
    // Types and values computed from signed and unsigned literals in
    // operator places; each compared with the same text run on the owner.
    let queries = |key: i64| {
        vec![
            format!("SELECT pg_typeof(abalance + -2147483648)::text, abalance + -2147483648 FROM accounts WHERE aid = {key}"),
            format!("SELECT pg_typeof(abalance * 2147483648)::text, abalance - -3 FROM accounts WHERE aid = {key}"),
            format!("SELECT abalance % 3, abalance / 2, -abalance FROM accounts WHERE aid = {key}"),
        ]
    };
    let after = u64::from(proxy.shared.config.pool.prepare_simple_after);
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for _ in 0..after + 1 {
        for (index, key) in keys.iter().enumerate() {
            let direct = cluster.connect(index).await;
            for sql in queries(*key) {
                assert_eq!(
                    text_rows(&client, &sql).await,
                    text_rows(&direct, &sql).await,
                    "{sql}"
                );
            }
        }
    }
    assert!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed) > before,
        "some of them ran kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_first_select_stays_prepared_and_survives_a_column_change() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(3).await;
    let metrics = &proxy.shared.metrics;
    let select = "SELECT * FROM accounts WHERE aid = $1";
    // BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT (kept); UPDATE; COMMIT.
    let transaction = |columns: usize| {
        let client = &client;
        let keys = &keys;
        async move {
            for key in keys {
                let key = *key as i32;
                client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                    .await
                    .expect("begin");
                let rows = client
                    .query_typed(select, &[(&key, Type::INT4)])
                    .await
                    .expect("the first select");
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].columns().len(), columns);
                let isolation = client
                    .simple_query("SHOW transaction_isolation")
                    .await
                    .expect("show");
                assert!(
                    isolation.iter().any(|m| matches!(m,
                        SimpleQueryMessage::Row(r) if r.get(0) == Some("repeatable read"))),
                    "the transaction kept its isolation level"
                );
                client
                    .query_typed(
                        "UPDATE accounts SET abalance = abalance + 1 WHERE aid = $1",
                        &[(&key, Type::INT4)],
                    )
                    .await
                    .expect("update");
                client.batch_execute("COMMIT").await.expect("commit");
            }
        }
    };
    let after = u64::from(proxy.shared.config.pool.prepare_unnamed_after);
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for _ in 0..after {
        transaction(2).await;
    }
    let runs = after * keys.len() as u64;
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed) - before,
        2 * (runs - (after - 1)),
        "the first SELECT and the UPDATE kept from their {after}th parse on"
    );
    // A column added on every server behind the proxy's back: the kept
    // SELECT's plan is stale; the transaction it began is begun again.
    for index in 0..cluster.cluster.servers.len() {
        cluster
            .connect(index)
            .await
            .batch_execute("ALTER TABLE accounts ADD COLUMN note text DEFAULT 'n'")
            .await
            .expect("alter on a server");
    }
    transaction(3).await;
    assert_eq!(
        metrics.stale_plan_retries.load(Ordering::Relaxed),
        keys.len() as u64,
        "one unseen retry per server's stale statement"
    );
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![3 + after as i64 + 1; keys.len()],
        "every transaction committed once"
    );
}

/// BEGIN; UPDATE; SELECT; COMMIT on every key, in the extended protocol:
/// the SELECT runs mid-transaction. Returns the SELECT's column type per
/// key, or the first error.
async fn update_then_select(
    client: &tokio_postgres::Client,
    keys: &[i64],
) -> Result<Vec<tokio_postgres::types::Type>, tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    let mut types = Vec::new();
    for key in keys {
        let key = *key as i32;
        client.batch_execute("BEGIN").await?;
        client
            .query_typed(
                "UPDATE accounts SET abalance = abalance + 1 WHERE aid = $1",
                &[(&key, Type::INT4)],
            )
            .await?;
        let rows = client
            .query_typed(
                "SELECT abalance FROM accounts WHERE aid = $1",
                &[(&key, Type::INT4)],
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                client.batch_execute("ROLLBACK").await?;
                return Err(e);
            }
        };
        assert_eq!(rows.len(), 1, "one row for {key}");
        types.push(rows[0].columns()[0].type_().clone());
        client.batch_execute("COMMIT").await?;
    }
    Ok(types)
}

/// A SELECT inside transactions runs kept prepared; after a column type
/// changed through the proxy every pooled connection prepares it again
/// before it runs in a transaction, so it returns the new type without an
/// error, as it does on the servers directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_changed_through_the_proxy_never_fails_a_kept_select() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(10).await;
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_unnamed_after);
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for _ in 0..after + 1 {
        let types = update_then_select(&client, &keys)
            .await
            .expect("transactions");
        assert_eq!(types, vec![Type::INT4; keys.len()]);
    }
    let runs = (after + 1) * keys.len() as u64;
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed) - before,
        2 * (runs - (after - 1)),
        "the UPDATE and the mid-transaction SELECT kept from their {after}th parse on"
    );
    client
        .batch_execute("ALTER TABLE accounts ALTER COLUMN abalance TYPE bigint")
        .await
        .expect("alter through the proxy");
    let kept = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    let types = update_then_select(&client, &keys)
        .await
        .expect("no transaction fails after the change");
    assert_eq!(
        types,
        vec![Type::INT8; keys.len()],
        "the new type, on every server"
    );
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed) - kept,
        2 * keys.len() as u64,
        "prepared again on every connection, and kept"
    );
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![10 + after as i64 + 2; keys.len()],
        "every transaction committed once"
    );
}

/// A column type changed on the servers directly, behind the proxy's back:
/// the first kept SELECT to meet it fails with Postgres's own error
/// (0A000, as a client's prepared statement would), and its transaction is
/// rolled back; the proxy counts the change, so the same transaction then
/// succeeds with the new type, and so do those on the other servers'
/// connections, which prepare the SELECT again first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_type_changed_behind_the_proxys_back_fails_a_kept_select_once() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(10).await;
    let after = proxy.shared.config.pool.prepare_unnamed_after;
    for _ in 0..after + 1 {
        update_then_select(&client, &keys)
            .await
            .expect("transactions");
    }
    for index in 0..cluster.cluster.servers.len() {
        cluster
            .connect(index)
            .await
            .batch_execute("ALTER TABLE accounts ALTER COLUMN abalance TYPE bigint")
            .await
            .expect("alter on a server");
    }
    let first = std::slice::from_ref(&keys[0]);
    let error = update_then_select(&client, first)
        .await
        .expect_err("the stale statement fails");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED),
        "{error:?}"
    );
    let types = update_then_select(&client, &keys)
        .await
        .expect("every transaction after it, on every server");
    assert_eq!(types, vec![Type::INT8; keys.len()]);
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![10 + i64::from(after) + 2; keys.len()],
        "the failed transaction left nothing"
    );
}

/// A column type changed through the proxy inside a transaction that holds
/// its lock while another transaction's kept SELECT of the table waits for
/// it: the proxy counted the change when it sent the ALTER, so the waiting
/// SELECT is prepared again (its Parse waits for the lock) and returns the
/// new type once the ALTER commits, as on the server directly, instead of
/// failing as a stale plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_select_waiting_for_an_alter_through_the_proxy_gets_the_new_columns() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster: _cluster,
        proxy,
        keys,
        client: alterer,
    } = Accounts::with_pool(1, 2).await;
    let reader = proxy.connect().await;
    let after = proxy.shared.config.pool.prepare_unnamed_after;
    // `notes` lives on the second server, with this account.
    let key = keys[1] as i32;
    alterer
        .batch_execute(&format!("INSERT INTO notes (aid, delta) VALUES ({key}, 5)"))
        .await
        .expect("a note");
    let account = "SELECT abalance FROM accounts WHERE aid = $1";
    let note = "SELECT delta FROM notes WHERE aid = $1";
    // Both clients in a transaction at once, so that both connections
    // keep the notes SELECT.
    for _ in 0..after + 1 {
        for client in [&alterer, &reader] {
            client.batch_execute("BEGIN").await.expect("begin");
            client
                .query_typed(account, &[(&key, Type::INT4)])
                .await
                .expect("first statement");
            let rows = client
                .query_typed(note, &[(&key, Type::INT4)])
                .await
                .expect("note");
            assert_eq!(rows[0].columns()[0].type_(), &Type::INT4);
        }
        for client in [&alterer, &reader] {
            client.batch_execute("COMMIT").await.expect("commit");
        }
    }
    alterer.batch_execute("BEGIN").await.expect("begin");
    alterer
        .batch_execute("ALTER TABLE notes ALTER COLUMN delta TYPE bigint")
        .await
        .expect("alter, holding the table's lock");
    reader.batch_execute("BEGIN").await.expect("begin");
    reader
        .query_typed(account, &[(&key, Type::INT4)])
        .await
        .expect("first statement, another table");
    let waiting = {
        let reader = &reader;
        async move { reader.query_typed(note, &[(&key, Type::INT4)]).await }
    };
    let commit = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        alterer.batch_execute("COMMIT").await
    };
    let (rows, committed) = tokio::join!(waiting, commit);
    committed.expect("the ALTER commits");
    let rows = rows.expect("the waiting SELECT runs once the ALTER commits");
    assert_eq!(rows[0].columns()[0].type_(), &Type::INT8);
    assert_eq!(rows[0].get::<_, i64>(0), 5);
    reader.batch_execute("COMMIT").await.expect("commit");
}

/// psql's output (stdout then stderr) for `script` on 127.0.0.1:`port`, run
/// to its end whatever fails.
fn psql_output(port: u16, script: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(script.as_bytes()).expect("psql stdin");
    }
    let output = child.wait_with_output().expect("psql ends");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// COMMIT, END, ROLLBACK and ABORT in the simple protocol run kept prepared
/// once a transaction holds a server, and answer exactly as Postgres
/// does: the same tags (ROLLBACK for a COMMIT of a failed transaction), the
/// same warnings, the same data, compared with psql's output on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ends_run_kept_and_answer_as_postgres_does() {
    let Accounts {
        cluster,
        proxy,
        keys,
        client,
    } = Accounts::open(50).await;
    let key = keys[1];
    let mut script = String::new();
    for round in 0..3 {
        script.push_str(&format!(
            "BEGIN;\nUPDATE accounts SET abalance = abalance + 1 WHERE aid = {key};\nCOMMIT;\n\
             BEGIN;\nUPDATE accounts SET abalance = abalance + 10 WHERE aid = {key};\nROLLBACK;\n\
             BEGIN;\nUPDATE accounts SET abalance = abalance + 100 WHERE aid = {key};\nSELECT 1 / 0;\nCOMMIT;\n\
             BEGIN;\nUPDATE accounts SET abalance = abalance + 2 WHERE aid = {key};\nEND;\n\
             BEGIN;\nUPDATE accounts SET abalance = abalance + 20 WHERE aid = {key};\nABORT;\n\
             BEGIN;\nUPDATE accounts SET abalance = abalance + 200 WHERE aid = {key};\nSELECT 1 / 0;\nROLLBACK;\n\
             COMMIT;\nSELECT {round} AS round, abalance FROM accounts WHERE aid = {key};\n"
        ));
    }
    let through_proxy = psql_output(proxy.addr.port(), &script);
    assert_eq!(
        balances(&cluster, &keys).await[1],
        59,
        "three rounds of +1 and +2, nothing of the rest: {through_proxy}"
    );
    // The server's one pooled connection holds them as prepared statements.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!(
            "UPDATE accounts SET abalance = abalance WHERE aid = {key}"
        ))
        .await
        .expect("open the transaction on the key's server");
    let prepared = text_rows(&client, "SELECT statement FROM pg_prepared_statements").await;
    client.batch_execute("COMMIT").await.expect("commit");
    for end in ["COMMIT", "END", "ROLLBACK", "ABORT"] {
        assert!(
            prepared
                .iter()
                .any(|row| row[0].trim_end_matches(';') == end),
            "{end} kept on the connection: {prepared:?}"
        );
    }
    client
        .batch_execute(&format!(
            "UPDATE accounts SET abalance = 50 WHERE aid = {key}"
        ))
        .await
        .expect("reset the balance");
    let server = &cluster.cluster.servers[1];
    let on_server = psql_output(server.state().port, &script);
    assert_eq!(through_proxy, on_server);
    assert!(
        through_proxy.matches("ROLLBACK").count() >= 9,
        "a COMMIT of a failed transaction answers ROLLBACK: {through_proxy}"
    );
}

/// A BEGIN the proxy held back goes in front of the transaction's first
/// extended-protocol statement as a statement kept prepared on the
/// connection (parsed once per connection, then only bound and executed),
/// without a Sync of its own; the transaction it opens is a real one, with
/// the client's options: a ROLLBACK undoes the statement, a COMMIT keeps it,
/// and BEGIN READ ONLY refuses the write as Postgres does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_begin_travels_kept_with_the_first_extended_statement() {
    use tokio_postgres::types::Type;
    let Accounts {
        cluster,
        proxy: _proxy,
        keys,
        client,
    } = Accounts::open(10).await;
    let update = "UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2";
    let kept_begins = "SELECT count(*)::int FROM pg_prepared_statements WHERE statement = 'BEGIN'";
    for round in 0..3 {
        for key in &keys {
            let key = *key as i32;
            client.batch_execute("BEGIN").await.expect("begin");
            client
                .query_typed(update, &[(&5i32, Type::INT4), (&key, Type::INT4)])
                .await
                .expect("update");
            // Read on the connection the transaction holds.
            let kept: i32 = client
                .query_one(kept_begins, &[])
                .await
                .expect("read the connection's prepared statements")
                .get(0);
            assert_eq!(
                kept, 1,
                "round {round}, key {key}: BEGIN kept once on its connection"
            );
            let end = if round == 0 { "ROLLBACK" } else { "COMMIT" };
            client
                .batch_execute(end)
                .await
                .expect("end the transaction");
        }
    }
    assert_eq!(
        balances(&cluster, &keys).await,
        vec![10 + 2 * 5; keys.len()],
        "the rolled-back round left nothing, the two committed ones applied once"
    );

    for key in &keys {
        let key = *key as i32;
        client
            .batch_execute("BEGIN READ ONLY")
            .await
            .expect("begin read only");
        let refused = client
            .query_typed(update, &[(&5i32, Type::INT4), (&key, Type::INT4)])
            .await
            .expect_err("a write in a read-only transaction");
        assert_eq!(
            refused.code().map(|c| c.code()),
            Some("25006"),
            "the server's refusal: {refused}"
        );
        let aborted = client
            .query_typed(
                "SELECT abalance FROM accounts WHERE aid = $1",
                &[(&key, Type::INT4)],
            )
            .await
            .expect_err("the transaction is aborted");
        assert_eq!(aborted.code().map(|c| c.code()), Some("25P02"), "{aborted}");
        client.batch_execute("ROLLBACK").await.expect("rollback");
    }
    assert_eq!(balances(&cluster, &keys).await, vec![20; keys.len()]);
}

/// A SAVEPOINT or SET LOCAL sent right after BEGIN is held back with it,
/// and the first statement finds them all in front of it. A prepared
/// statement holds one command, so they go as one Query even before an
/// extended-protocol statement (Django's and SQLAlchemy's nested
/// transactions open a savepoint right after BEGIN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_or_set_local_after_begin_opens_with_it_before_an_extended_statement() {
    use tokio_postgres::types::Type;
    let accounts = Accounts::open(10).await;
    let (client, keys) = (&accounts.client, &accounts.keys);
    let update = "UPDATE accounts SET abalance = abalance + $1 WHERE aid = $2";
    // Simple-protocol statements, and the update (extended) by its delta.
    let steps = [
        ("BEGIN", None),
        ("SAVEPOINT a", None),
        (update, Some(5i32)),
        ("ROLLBACK TO SAVEPOINT a", None),
        (update, Some(1i32)),
        ("COMMIT", None),
    ];
    for key in keys {
        let key = *key as i32;
        for (sql, delta) in &steps {
            let done = match delta {
                None => client.batch_execute(sql).await,
                Some(delta) => client
                    .query_typed(sql, &[(delta, Type::INT4), (&key, Type::INT4)])
                    .await
                    .map(drop),
            };
            if let Err(error) = done {
                panic!("key {key}, {sql}: {error}");
            }
        }
    }
    assert_eq!(
        balances(&accounts.cluster, keys).await,
        vec![11; keys.len()],
        "the savepoint undid the first update and the commit kept the second"
    );

    for key in keys {
        let key = *key as i32;
        client.batch_execute("BEGIN").await.expect("begin");
        client
            .batch_execute("SET LOCAL lock_timeout = '1234ms'")
            .await
            .expect("set local");
        let row = client
            .query_typed(
                "SELECT current_setting('lock_timeout'), abalance FROM accounts WHERE aid = $1",
                &[(&key, Type::INT4)],
            )
            .await
            .expect("the first statement, after SET LOCAL");
        let (timeout, balance): (String, i32) = match row.first() {
            Some(row) => (row.get(0), row.get(1)),
            None => panic!("key {key}: its account row"),
        };
        assert_eq!(
            (timeout.as_str(), balance),
            ("1234ms", 11),
            "key {key}: the transaction's setting"
        );
        client.batch_execute("COMMIT").await.expect("commit");
    }
}

/// A rule can make an INSERT return rows (`DO INSTEAD SELECT`): a simple
/// Query returns them, Execute in the extended protocol does not. On a
/// database with such a rule, simple-protocol writes are not kept, so each
/// run through the proxy answers what the server answers directly, in and
/// out of transactions; reads are still kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_a_rule_turns_into_selects_are_not_kept_and_return_their_rows() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    for index in 0..cluster.cluster.servers.len() {
        cluster
            .connect(index)
            .await
            .batch_execute(
                "CREATE RULE history_echo AS ON INSERT TO history \
                 DO INSTEAD SELECT NEW.aid AS aid, NEW.delta * 2 AS doubled",
            )
            .await
            .expect("create the rule on a server");
    }
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let keys = key_per_server(&cluster, &map, "accounts");
    let client = proxy.connect().await;
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_simple_after);
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for round in 0..after + 2 {
        for (index, key) in keys.iter().enumerate() {
            let direct = cluster.connect(index).await;
            let sql = format!("INSERT INTO history (aid, delta) VALUES ({key}, {round})");
            let expected = text_rows(&direct, &sql).await;
            assert_eq!(
                expected,
                vec![vec![key.to_string(), (2 * round).to_string()]]
            );
            assert_eq!(text_rows(&client, &sql).await, expected, "{sql}");
            client.batch_execute("BEGIN").await.expect("begin");
            assert_eq!(
                text_rows(&client, &sql).await,
                expected,
                "{sql} inside a transaction"
            );
            client.batch_execute("COMMIT").await.expect("commit");
        }
    }
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed),
        before,
        "no write ran kept"
    );
    assert!(
        metrics.writes_unkept_for_rules.load(Ordering::Relaxed) > 0,
        "the writes past the threshold are counted as unkept for the rule"
    );
    for _ in 0..after + 1 {
        for key in &keys {
            let sql = format!("SELECT count(*) FROM history WHERE aid = {key}");
            assert_eq!(text_rows(&client, &sql).await, vec![vec!["0".to_string()]]);
        }
    }
    assert!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed) > before,
        "reads still run kept"
    );
}

/// A rule created through the proxy is seen by the servers' pooled
/// connections without waiting for them to be replaced: by one inside a
/// transaction that began before it (its next write is not kept), and by
/// every connection at its next checkout; after DROP RULE through the proxy,
/// writes are kept again. Two connections per server, so that the rule is
/// created on one while the other is held. Both ways a rule goes through the
/// proxy: on a sharded table (run on every server), and on a table of one
/// server, there in a transaction that writes after creating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_created_through_the_proxy_reaches_the_pooled_connections() {
    let Accounts {
        cluster,
        proxy,
        keys,
        client: holder,
    } = Accounts::with_pool(0, 2).await;
    let other = proxy.connect().await;
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_simple_after);
    let none = Vec::<Vec<String>>::new;
    // A sharded table (the rule runs on every server) and one homed on the
    // second server (it runs there): (table, the server its writes go to).
    for (table, index) in [("history", 0), ("notes", 1)] {
        let key = keys[index];
        let direct = cluster.connect(index).await;
        let insert =
            |delta: u64| format!("INSERT INTO {table} (aid, delta) VALUES ({key}, {delta})");
        // Without a rule the writes run kept, on both clients' connections.
        let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
        for round in 0..after + 2 {
            for client in [&holder, &other] {
                assert_eq!(text_rows(client, &insert(round)).await, none());
            }
        }
        assert!(
            metrics.kept_prepared_runs.load(Ordering::Relaxed) > before,
            "writes to {table} run kept before any rule"
        );
        // One connection to the server is held in a transaction (on
        // accounts: CREATE RULE waits for the transactions using the table).
        holder.batch_execute("BEGIN").await.expect("begin");
        holder
            .batch_execute(&format!(
                "UPDATE accounts SET abalance = abalance + 1 WHERE aid = {key}"
            ))
            .await
            .expect("update in the transaction");
        // The rule is created through the proxy, on the other connection:
        // on its own (history), or in a transaction that writes after it
        // (notes), where Postgres applies it at once.
        let expected = |delta: u64| vec![vec![key.to_string(), (2 * delta).to_string()]];
        let in_transaction = table == "notes";
        if in_transaction {
            other.batch_execute("BEGIN").await.expect("begin");
        }
        other
            .batch_execute(&format!(
                "CREATE RULE echo AS ON INSERT TO {table} \
                 DO INSTEAD SELECT NEW.aid AS aid, NEW.delta * 2 AS doubled"
            ))
            .await
            .expect("create the rule through the proxy");
        if in_transaction {
            assert_eq!(
                text_rows(&other, &insert(3)).await,
                expected(3),
                "a write to {table} after the rule in the transaction that created it"
            );
            other.batch_execute("COMMIT").await.expect("commit");
        }
        let on_server = format!("INSERT INTO {table} (aid, delta) VALUES ({key}, 1)");
        assert_eq!(
            text_rows(&direct, &on_server).await,
            expected(1),
            "on the server"
        );
        assert_eq!(
            text_rows(&holder, &insert(2)).await,
            expected(2),
            "a write to {table} in the transaction that began before the rule"
        );
        holder.batch_execute("COMMIT").await.expect("commit");
        for round in 0..after + 1 {
            for client in [&holder, &other] {
                assert_eq!(
                    text_rows(client, &insert(round)).await,
                    expected(round),
                    "a write to {table} after the rule"
                );
            }
        }
        // Dropped through the proxy: the writes are kept again.
        other
            .batch_execute(&format!("DROP RULE echo ON {table}"))
            .await
            .expect("drop the rule through the proxy");
        let kept = metrics.kept_prepared_runs.load(Ordering::Relaxed);
        for round in 0..2 {
            for client in [&holder, &other] {
                assert_eq!(text_rows(client, &insert(round)).await, none());
            }
        }
        assert_eq!(
            metrics.kept_prepared_runs.load(Ordering::Relaxed),
            kept + 4,
            "writes to {table} run kept again once the rule is dropped"
        );
    }
}

/// Reading the rules waits for no lock (`pg_get_ruledef` locks the rule's
/// table): while DDL holds a table with a rule, a client of any other table
/// is served at once, writes are not kept meanwhile, and the rules are read
/// again at a later checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_rules_waits_for_no_lock() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let keys = key_per_server(&cluster, &map, "accounts");
    let locker = cluster.connect(0).await;
    locker
        .batch_execute(
            "CREATE RULE history_echo AS ON INSERT TO history \
             DO INSTEAD SELECT NEW.aid AS aid, NEW.delta * 2 AS doubled",
        )
        .await
        .expect("a rule");
    locker
        .batch_execute("BEGIN; LOCK TABLE history IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("DDL's lock on the rule's table");
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 1).await;
    let client = proxy.connect().await;
    let read = format!("SELECT count(*) FROM accounts WHERE aid = {}", keys[0]);
    // Without the lock timeout, the rule read waits for the lock until the
    // connect timeout fails the checkout.
    let served = tokio::time::timeout(std::time::Duration::from_secs(3), text_rows(&client, &read))
        .await
        .expect("a read of another table is served while history is locked");
    assert_eq!(served, vec![vec!["0".to_string()]]);
    locker
        .batch_execute("COMMIT")
        .await
        .expect("release the lock");
    let metrics = &proxy.shared.metrics;
    let after = u64::from(proxy.shared.config.pool.prepare_simple_after);
    let before = metrics.kept_prepared_runs.load(Ordering::Relaxed);
    for round in 0..after + 2 {
        let sql = format!(
            "INSERT INTO history (aid, delta) VALUES ({}, {round})",
            keys[0]
        );
        assert_eq!(
            text_rows(&client, &sql).await,
            vec![vec![keys[0].to_string(), (2 * round).to_string()]],
            "{sql}"
        );
    }
    assert_eq!(
        metrics.kept_prepared_runs.load(Ordering::Relaxed),
        before,
        "no write ran kept"
    );
}

/// The query that finds rules returning rows, on a real server, against
/// how `pg_get_ruledef` prints each kind of rule action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rule_check_finds_actions_that_return_rows_and_only_those() {
    let cluster = TestCluster::start(1);
    let server = cluster.connect(0).await;
    server
        .batch_execute("CREATE TABLE t (a int); CREATE TABLE log (a int)")
        .await
        .expect("create the tables");
    let cases = [
        ("none", None, false),
        ("a SELECT", Some("DO INSTEAD SELECT NEW.a"), true),
        (
            "a SELECT also",
            Some("DO ALSO SELECT NEW.a * 2 AS doubled"),
            true,
        ),
        ("VALUES", Some("DO INSTEAD VALUES (NEW.a)"), true),
        (
            "a list with a SELECT",
            Some("DO ALSO (INSERT INTO log VALUES (NEW.a); SELECT NEW.a)"),
            true,
        ),
        (
            "an audit INSERT",
            Some("DO ALSO INSERT INTO log (a) VALUES (NEW.a)"),
            false,
        ),
        (
            "an INSERT from a query",
            Some("DO ALSO INSERT INTO log SELECT NEW.a"),
            false,
        ),
        ("NOTHING", Some("DO INSTEAD NOTHING"), false),
        (
            "a WITH",
            Some("DO INSTEAD WITH w AS (SELECT 1 AS one) SELECT NEW.a, one FROM w"),
            true,
        ),
    ];
    for (what, action, expected) in cases {
        if let Some(action) = action {
            server
                .batch_execute(&format!("CREATE RULE r AS ON INSERT TO t {action}"))
                .await
                .unwrap_or_else(|e| panic!("create the rule ({what}): {e:?}"));
        }
        let found: bool = server
            .query_one(proxy::backend::RULES_THAT_RETURN_ROWS, &[])
            .await
            .expect("run the rule check")
            .get(0);
        assert_eq!(found, expected, "{what}");
        if action.is_some() {
            server
                .batch_execute("DROP RULE r ON t")
                .await
                .expect("drop the rule");
        }
    }
}
