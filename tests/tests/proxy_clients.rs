//! Real clients through the real proxy: pgbench in simple, extended and
//! prepared modes with 16 clients, psql (including COPY), psycopg 3, password
//! authentication, query cancellation, and malformed input that must not
//! disturb other sessions.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardline_tests::fixtures::{create_table, init_schema};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue, MapStore, Table};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "clients";
const PARTITIONS: u32 = 16;
const ACCOUNTS: i64 = 2000;

async fn setup(cluster: &TestCluster) -> (MapStore, ClusterMap) {
    let (store, map) = init_schema(cluster, CLUSTER, PARTITIONS, |map| {
        map.declare(
            Group::hash("accounts", KeyType::Int)
                .table("pgbench_accounts", "aid")
                .table("users", "user_id"),
        );
        map.declare_table(Table::unsharded("notes", "pg1"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "pgbench_accounts",
        "aid int PRIMARY KEY, bid int, abalance int NOT NULL DEFAULT 0, filler char(84)",
    )
    .await;
    create_table(cluster, &map, "users", "user_id int PRIMARY KEY, name text").await;
    create_table(cluster, &map, "notes", "id int PRIMARY KEY, body text").await;
    // Load the accounts each server owns, directly.
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let owned: Vec<i32> = map
            .assignments
            .iter()
            .enumerate()
            .filter(|(_, a)| a.owner == server.name())
            .map(|(p, _)| p as i32)
            .collect();
        cluster
            .connect(index)
            .await
            .execute(
                &format!(
                    "INSERT INTO pgbench_accounts (aid, bid, abalance) SELECT g, 1, 0 FROM generate_series(1, {ACCOUNTS}) g \
                     WHERE (SELECT bool_or(satisfies_hash_partition('pgbench_accounts'::regclass, {PARTITIONS}, r, g)) FROM unnest($1::int[]) r)"
                ),
                &[&owned],
            )
            .await
            .expect("load accounts");
    }
    (store, map)
}

async fn total_balance(cluster: &TestCluster) -> i64 {
    let mut total = 0;
    for index in 0..cluster.cluster.servers.len() {
        let row = cluster
            .connect(index)
            .await
            .query_one(
                "SELECT coalesce(sum(abalance), 0)::bigint, count(*) FROM pgbench_accounts",
                &[],
            )
            .await
            .expect("sum");
        total += row.get::<_, i64>(0);
    }
    total
}

/// A pgbench script: one account's balance raised by 1 in a transaction
/// (and read in it and after it), the account drawn at random.
fn accounts_script() -> tempfile::NamedTempFile {
    let script = tempfile::NamedTempFile::new().expect("script file");
    std::fs::write(
        script.path(),
        format!(
            "\\set aid random(1, {ACCOUNTS})\n\
             BEGIN;\n\
             UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n\
             SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
             END;\n\
             SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
        ),
    )
    .expect("write script");
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_protocol_mode_with_16_clients() {
    let cluster = TestCluster::start(3);
    let (_store, _map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.pool.size = 20).await;
    let script = accounts_script();
    let transactions_per_client = 50;
    let mut expected = 0;
    for mode in ["simple", "extended", "prepared"] {
        pgbench_script(
            proxy.addr.port(),
            mode,
            script.path(),
            transactions_per_client,
        )
        .await;
        let processed = 16 * transactions_per_client;
        expected += i64::from(processed);
        assert_eq!(
            total_balance(&cluster).await,
            expected,
            "every committed update of -M {mode} is on its server"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_and_copy_through_the_proxy() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let port = proxy.addr.port().to_string();
    let run_psql = |args: Vec<String>, stdin: Option<String>| {
        let port = port.clone();
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new("psql")
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("psql runs");
            if let Some(input) = stdin {
                child
                    .stdin
                    .as_mut()
                    .expect("stdin")
                    .write_all(input.as_bytes())
                    .expect("write stdin");
            }
            drop(child.stdin.take());
            child.wait_with_output().expect("psql output")
        })
    };
    let script = "INSERT INTO users (user_id, name) VALUES (11, 'eleven');\n\
                  BEGIN;\n\
                  UPDATE users SET name = 'ELEVEN' WHERE user_id = 11;\n\
                  COMMIT;\n\
                  SELECT name FROM users WHERE user_id = 11;\n\
                  \\copy notes FROM STDIN\n1\tfirst\n2\tsecond\n\\.\n\
                  \\copy (SELECT id, body FROM notes ORDER BY id) TO STDOUT\n";
    let output = run_psql(vec!["-At".into()], Some(script.into()))
        .await
        .expect("psql task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["ELEVEN", "1\tfirst", "2\tsecond"],
        "{stdout}"
    );
    let owner = map
        .owner_of(
            map.partition_of("users", &KeyValue::Int(11))
                .expect("partition"),
        )
        .expect("owner")
        .name
        .clone();
    let owner_index = cluster.server_index(&owner);
    let row = cluster
        .connect(owner_index)
        .await
        .query_one("SELECT name FROM users WHERE user_id = 11", &[])
        .await
        .expect("row on owner");
    assert_eq!(row.get::<_, String>(0), "ELEVEN");
    let notes = cluster
        .connect(0)
        .await
        .query_one("SELECT count(*) FROM notes", &[])
        .await
        .expect("notes");
    assert_eq!(notes.get::<_, i64>(0), 2, "COPY reached the home server");

    // psql's \d uses catalog queries; an error exits non-zero with the message.
    let described = run_psql(vec!["-c".into(), "\\d users".into()], None)
        .await
        .expect("psql task");
    assert!(
        described.status.success(),
        "{}",
        String::from_utf8_lossy(&described.stderr)
    );
    assert!(String::from_utf8_lossy(&described.stdout).contains("user_id"));
    let failed = run_psql(
        vec!["-c".into(), "UPDATE users SET user_id = 0".into()],
        None,
    )
    .await
    .expect("psql task");
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot update the sharding key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_inserts_and_selects_by_key() {
    let cluster = TestCluster::start(3);
    let (_store, map) = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    // psycopg 3 uses the extended protocol, and prepares statements (named,
    // server-side) once a query has run prepare_threshold times.
    let program = format!(
        r#"
import psycopg
with psycopg.connect("{conninfo}", autocommit=True, prepare_threshold=2) as conn:
    for i in range(1, 41):
        conn.execute("INSERT INTO users (user_id, name) VALUES (%s, %s)", (i, f"py{{i}}"))
    for i in range(1, 41):
        row = conn.execute("SELECT name FROM users WHERE user_id = %s", (i,)).fetchone()
        assert row == (f"py{{i}}",), row
    with conn.transaction():
        conn.execute("UPDATE users SET name = name || '!' WHERE user_id = %s", (5,))
    print(conn.execute("SELECT name FROM users WHERE user_id = %s", (5,)).fetchone()[0])
"#,
        conninfo = proxy.conninfo()
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg("-c").arg(program).output()
    })
    .await
    .expect("task")
    .expect("python3 runs");
    assert!(
        output.status.success(),
        "psycopg script failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "py5!");
    for user in 1..=40 {
        let owner = map
            .owner_of(
                map.partition_of("users", &KeyValue::Int(user))
                    .expect("partition"),
            )
            .expect("owner")
            .name
            .clone();
        for (index, server) in cluster.cluster.servers.iter().enumerate() {
            let row = cluster
                .connect(index)
                .await
                .query_one(
                    "SELECT count(*) FROM users WHERE user_id = $1",
                    &[&(user as i32)],
                )
                .await
                .expect("count");
            let expected = i64::from(server.name() == owner);
            assert_eq!(
                row.get::<_, i64>(0),
                expected,
                "user {user} on {}",
                server.name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_logins() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    for method in [
        proxy::auth::AuthMethod::ScramSha256,
        proxy::auth::AuthMethod::Md5,
    ] {
        let proxy = TestProxy::start(&cluster, CLUSTER, |c| {
            c.auth.method = method;
            c.auth.users = vec![proxy::config::UserEntry {
                name: "app".into(),
                password: Some("s3cret".into()),
                ..Default::default()
            }];
        })
        .await;
        let conninfo = |password: &str| {
            format!(
                "host=127.0.0.1 port={} user=app dbname=postgres password={password}",
                proxy.addr.port()
            )
        };
        let (client, connection) =
            tokio_postgres::connect(&conninfo("s3cret"), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("{method:?} login: {e}"));
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT 40 + 2", &[])
            .await
            .expect("query after login");
        assert_eq!(row.get::<_, i32>(0), 42);
        let err = tokio_postgres::connect(&conninfo("wrong"), tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{method:?}: wrong password accepted"));
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("28P01"),
            "{method:?}: {err}"
        );
        let err = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=nobody dbname=postgres password=x",
                proxy.addr.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("unknown user refused");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_reaches_the_running_backend() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    let token = client.cancel_token();
    cancel_while_running(token, async move {
        client.batch_execute("SELECT pg_sleep(20)").await
    })
    .await;
}

/// Runs `sleeper` (a statement that sleeps 20 s) in a task, sends a
/// CancelRequest with `token` once it runs, and checks that it ended with
/// 57014 well before its sleep.
async fn cancel_while_running<T: Send + 'static>(
    token: tokio_postgres::CancelToken,
    sleeper: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
) {
    let started = Instant::now();
    let sleeper = tokio::spawn(sleeper);
    tokio::time::sleep(Duration::from_millis(300)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let err = match sleeper.await.expect("task") {
        Ok(_) => panic!("the statement ran to its end: not cancelled"),
        Err(err) => err,
    };
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn raw_login(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut startup = Vec::new();
    let params = b"user\0postgres\0database\0postgres\0\0";
    startup.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
    startup.extend_from_slice(&196_608_i32.to_be_bytes());
    startup.extend_from_slice(params);
    stream.write_all(&startup).await.expect("startup");
    // Read until ReadyForQuery.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = stream.read(&mut buf).await.expect("read login");
        assert!(n > 0, "proxy closed during login");
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

/// Reads until the proxy closes the connection (or 5 s); returns what it sent.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    all
}

/// A client that sends nothing for a while gives its buffers and its
/// request state back (see `proxy::session::client`); what its session
/// holds — prepared statements, settings, an open transaction, half a
/// message sent before the pause — is all still there when it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_idle_and_go_on_where_they_were() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let idle = proxy::session::IDLE_AFTER + Duration::from_millis(300);
    let client = proxy.connect().await;
    let by_key = client
        .prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
        .await
        .expect("prepare");
    client
        .batch_execute("SET statement_timeout = '12345'")
        .await
        .expect("set");
    tokio::time::sleep(idle).await;
    let row = client
        .query_one(&by_key, &[&7_i32])
        .await
        .expect("run prepared");
    assert_eq!(row.get::<_, i32>(0), 0);
    let row = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "12345ms");
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .execute(
            "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = $1",
            &[&7_i32],
        )
        .await
        .expect("update");
    tokio::time::sleep(idle).await;
    client.batch_execute("COMMIT").await.expect("commit");
    let row = client
        .query_one(&by_key, &[&7_i32])
        .await
        .expect("read back");
    assert_eq!(row.get::<_, i32>(0), 5);

    // Half a Query, a pause, then the rest: one message.
    let mut raw = raw_login(proxy.addr).await;
    let query = b"SELECT 1\0";
    let mut message = vec![b'Q'];
    message.extend_from_slice(&((4 + query.len()) as i32).to_be_bytes());
    message.extend_from_slice(query);
    raw.write_all(&message[..7]).await.expect("first half");
    tokio::time::sleep(idle).await;
    raw.write_all(&message[7..]).await.expect("second half");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .expect("reply in time")
            .expect("read reply");
        assert!(n > 0, "proxy closed the connection");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.windows(11).any(|w| w == b"C\0\0\0\x0dSELECT"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_without_disturbing_other_sessions() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |c| c.limits.max_message_bytes = 1 << 20).await;
    let bystander = proxy.connect().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("negative length", b"Q\xff\xff\xff\xf0".to_vec()),
        ("oversized message", {
            let mut m = b"Q".to_vec();
            m.extend_from_slice(&(4_i32 + (2 << 20)).to_be_bytes());
            m
        }),
        ("unknown message type", b"?\0\0\0\x04".to_vec()),
        (
            "Bind with bad counts",
            b"B\0\0\0\x0cp\0s\0\xff\xff\0\0".to_vec(),
        ),
        ("query without terminator", b"Q\0\0\0\x08abcd".to_vec()),
        ("invalid UTF-8", b"Q\0\0\0\x07\xff\xfe\0".to_vec()),
    ];
    for (name, bytes) in cases {
        let mut stream = raw_login(proxy.addr).await;
        stream.write_all(&bytes).await.expect("send");
        // A Sync so a Bind-style message is processed.
        let _ = stream.write_all(b"S\0\0\0\x04").await;
        let reply = read_to_close(&mut stream).await;
        assert!(
            reply.first() == Some(&b'E'),
            "{name}: expected an ErrorResponse, got {reply:?}"
        );
        let row = bystander
            .query_one("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: bystander broke: {e}"));
        assert_eq!(row.get::<_, i32>(0), 1);
    }
    // A client vanishing mid-query does not hurt the pool either.
    let mut stream = raw_login(proxy.addr).await;
    let query = b"SELECT pg_sleep(0.5)\0";
    let mut message = b"Q".to_vec();
    message.extend_from_slice(&((4 + query.len()) as i32).to_be_bytes());
    message.extend_from_slice(query);
    stream.write_all(&message).await.expect("send");
    drop(stream);
    for _ in 0..5 {
        bystander
            .query_one("SELECT 1", &[])
            .await
            .expect("bystander after a vanished client");
    }
    // Garbage instead of a startup packet.
    let mut stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"\0\0\0\x08\x12\x34\x56\x78")
        .await
        .expect("send");
    let reply = read_to_close(&mut stream).await;
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "unsupported protocol refused with an error"
    );
}

fn psql_with(conninfo: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql])
        .output()
        .expect("psql runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured_and_required() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed certificate");
    let cert = dir.path().join("proxy.crt");
    let key = dir.path().join("proxy.key");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");

    let plain = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let tls = TestProxy::start(&cluster, CLUSTER, |c| {
        c.tls.cert = Some(cert.clone());
        c.tls.key = Some(key.clone());
        c.tls.required = true;
    })
    .await;
    let conninfo = |proxy: &TestProxy, mode: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={mode}",
            proxy.addr.port()
        )
    };
    let checks = tokio::task::spawn_blocking(move || {
        let over_tls = psql_with(&conninfo(&tls, "require"), "SELECT 'tls ok'");
        let refused_plain = psql_with(&conninfo(&tls, "disable"), "SELECT 1");
        let no_tls_offered = psql_with(&conninfo(&plain, "require"), "SELECT 1");
        let plain_ok = psql_with(&conninfo(&plain, "prefer"), "SELECT 'plain ok'");
        (
            over_tls,
            refused_plain,
            no_tls_offered,
            plain_ok,
            tls,
            plain,
        )
    })
    .await
    .expect("psql task");
    let (over_tls, refused_plain, no_tls_offered, plain_ok, _tls, _plain) = checks;
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&over_tls.stdout).trim(), "tls ok");
    assert!(!refused_plain.status.success());
    assert!(
        String::from_utf8_lossy(&refused_plain.stderr).contains("requires TLS"),
        "{}",
        String::from_utf8_lossy(&refused_plain.stderr)
    );
    assert!(
        !no_tls_offered.status.success(),
        "sslmode=require fails when the proxy has no TLS"
    );
    assert!(plain_ok.status.success());
    assert_eq!(String::from_utf8_lossy(&plain_ok.stdout).trim(), "plain ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_count_requests_errors_and_pools() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    for user in 1..=5_i32 {
        client
            .execute(
                "INSERT INTO users (user_id, name) VALUES ($1, 'm')",
                &[&user],
            )
            .await
            .expect("insert");
    }
    let _ = client
        .batch_execute("UPDATE users SET user_id = 0")
        .await
        .expect_err("the sharding key cannot be updated");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let address = listener.local_addr().expect("metrics address");
    let server = tokio::spawn(proxy::scrape::serve(listener, vec![proxy.shared.clone()]));
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    server.abort();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    let value = |name: &str| shardline_tests::metric_value(&body, name);
    assert!(value("shardline_requests_total") >= 6.0);
    assert_eq!(value("shardline_route_errors_total"), 1.0);
    assert_eq!(value("shardline_logins_total"), 1.0);
    assert_eq!(value("shardline_clients"), 1.0);
    assert!(value("shardline_map_version") >= 2.0);
    assert!(
        body.contains("shardline_pool_connections{server=\"pg1\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backends_close_after_their_idle_timeout_under_steady_load() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    // 3 s: long enough that a loaded machine cannot close a connection
    // between the COMMITs and the first count below.
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| config.pool.idle_timeout_s = 3).await;
    // Three transactions at once open three server connections.
    let clients = [
        proxy.connect().await,
        proxy.connect().await,
        proxy.connect().await,
    ];
    let mut pids = std::collections::BTreeSet::new();
    for client in &clients {
        client.batch_execute("BEGIN").await.expect("begin");
        pids.insert(backend_pid(client, "an open transaction's").await);
    }
    for client in &clients {
        client.batch_execute("COMMIT").await.expect("commit");
    }
    let pools = proxy.shared.pools.all();
    let pool = pools
        .iter()
        .find(|p| &*p.server == "pg1")
        .expect("pg1's pool");
    let stat =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    // Each transaction held its own server connection.
    assert_eq!(pids.len(), 3, "three open transactions on {pids:?}");
    assert_eq!(
        stat(&pool.stats.connects),
        3,
        "connections opened for three open transactions ({} pools, {} checkouts, {} closed unhealthy, {} idle)",
        pools.len(),
        stat(&pool.stats.checkouts),
        stat(&pool.stats.closed_unhealthy),
        pool.idle_count(),
    );
    // All three go back to the pool: the client may read COMMIT's reply on
    // one worker thread before its session, on the other, has returned its
    // connection. On a machine loaded enough to stall for 3 s, one may
    // already have been closed as idle.
    let returned =
        shardline_tests::eventually(Duration::from_secs(2), || async { pool.in_use() == 0 }).await;
    assert!(
        returned,
        "{} connections still leased after COMMIT",
        pool.in_use()
    );
    assert_eq!(
        pool.idle_count() as u64 + stat(&pool.stats.closed_idle),
        3,
        "idle {}, closed idle {}, in use {}, closed unhealthy {}",
        pool.idle_count(),
        stat(&pool.stats.closed_idle),
        pool.in_use(),
        stat(&pool.stats.closed_unhealthy),
    );
    // Steady load reuses the newest connection; the two others idle on.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        clients[0].batch_execute("SELECT 1").await.expect("select");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pool.idle_count() + pool.in_use(),
        1,
        "connections idle past idle_timeout_s are closed even while others are busy"
    );
    assert_eq!(stat(&pool.stats.closed_idle), 2);
}

/// A client that finds every pooled connection busy for the whole checkout
/// timeout gets 53300 with what to do, not a connection failure, and its
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_with_53300_and_the_session_goes_on() {
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config.pool.size = 1;
        config.pool.checkout_timeout_ms = 300;
    })
    .await;
    let holder = proxy.connect().await;
    let waiter = proxy.connect().await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let held_pid = backend_pid(&holder, "the holder's").await;
    let error = waiter
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect_err("the only connection is in the holder's transaction");
    assert_pool_full(
        &error,
        &[
            "became free within",
            "pg_stat_activity",
            "checkout_timeout_ms",
        ],
        "",
    );
    holder.batch_execute("COMMIT").await.expect("commit");
    let pid = backend_pid(&waiter, "the waiter's, once the connection is free,").await;
    assert_eq!(pid, held_pid, "the pool's one connection serves the waiter");
}

/// `pool.size` is the whole proxy's, not each serving thread's: with two
/// threads and a pool of 4, four clients hold a transaction each however the
/// kernel spread them over the threads, the server sees 4 connections at
/// most, and a fifth client waits and gets 53300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_threads_share_one_pool() {
    const SIZE: usize = 4;
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let (proxy, _dir) = two_threads_proxy(&cluster, "threads-share", SIZE, 500).await;
    let connect = || async {
        let (client, connection) =
            tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls)
                .await
                .expect("connect to the proxy");
        tokio::spawn(connection);
        client
    };
    // Several rounds: each round's clients land on the threads anew.
    for round in 0..3 {
        let mut holders = Vec::new();
        let mut pids = std::collections::BTreeSet::new();
        for _ in 0..SIZE {
            let client = connect().await;
            client.batch_execute("BEGIN").await.expect("begin");
            let pid = backend_pid(&client, &format!("round {round}: a holder's")).await;
            assert!(
                pids.insert(pid),
                "round {round}: two transactions on server connection {pid}"
            );
            holders.push(client);
        }
        let opened = proxy_connections(&cluster).await;
        assert!(
            opened as usize <= SIZE,
            "round {round}: the proxy has {opened} connections open to the server, more than its pool of {SIZE}"
        );
        let extra = connect().await;
        let error = extra
            .query_one("SELECT 1", &[])
            .await
            .expect_err("every connection of the pool is in a transaction");
        assert_pool_full(
            &error,
            &[&format!("all {SIZE} connections")],
            &format!("round {round}: "),
        );
        holders[0].batch_execute("COMMIT").await.expect("commit");
        let row = extra
            .query_one("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("round {round}: once a holder committed: {e}"));
        assert_eq!(row.get::<_, i32>(0), 1);
    }
}

/// The proxy binary with two serving threads and a pool of `size`
/// connections per server; keep the returned dir while the proxy runs.
async fn two_threads_proxy(
    cluster: &TestCluster,
    name: &str,
    size: usize,
    checkout_timeout_ms: u64,
) -> (shardline_tests::binaries::ProxyProcess, tempfile::TempDir) {
    let config = format!("[pool]\nsize = {size}\ncheckout_timeout_ms = {checkout_timeout_ms}\n");
    two_threads_proxy_with(cluster, name, &config).await
}

/// The real proxy on two serving threads with `config` as its config file.
async fn two_threads_proxy_with(
    cluster: &TestCluster,
    name: &str,
    config: &str,
) -> (shardline_tests::binaries::ProxyProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("write the proxy's config");
    let config = path.to_str().expect("a UTF-8 temp path");
    let proxy = shardline_tests::binaries::ProxyProcess::start_with(
        cluster,
        CLUSTER,
        name,
        None,
        &[
            ("SHARDLINE_PROXY_THREADS", "2"),
            ("SHARDLINE_PROXY_CONFIG", config),
        ],
    )
    .await;
    (proxy, dir)
}

/// Far more clients than connections, on two serving threads: every
/// statement waits its turn and runs. Before a fix, a client handed room
/// by the other thread could report the pool exhausted at once (most of
/// 100 `pgbench -S` clients over a pool of 20 did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_more_clients_than_connections_on_two_threads_are_all_served() {
    const CLIENTS: usize = 64;
    const STATEMENTS: usize = 40;
    let cluster = TestCluster::start(1);
    let _ = setup(&cluster).await;
    let (proxy, _dir) = two_threads_proxy(&cluster, "many-clients", 4, 10_000).await;
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let conninfo = proxy.conninfo();
        clients.spawn(async move {
            let (db, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("client {client}: connect: {e}"));
            tokio::spawn(connection);
            let mut sum = 0i64;
            for statement in 0..STATEMENTS {
                let row = db
                    .query_one("SELECT $1::int8 + 1", &[&(statement as i64)])
                    .await
                    .unwrap_or_else(|e| panic!("client {client}, statement {statement}: {e:?}"));
                sum += row.get::<_, i64>(0);
            }
            sum
        });
    }
    let expected: i64 = (1..=STATEMENTS as i64).sum();
    while let Some(sum) = clients.join_next().await {
        assert_eq!(sum.expect("a client's task"), expected);
    }
}

/// The pools of two serving threads for one server, sharing its budget of
/// `size` connections (what `main` builds for `--threads 2`).
fn two_threads_pools(
    cluster: &TestCluster,
    map: &ClusterMap,
    size: usize,
) -> (
    std::sync::Arc<proxy::pool::Pool>,
    std::sync::Arc<proxy::pool::Pool>,
) {
    use proxy::pool::{Budgets, PoolConfig, Pools};
    let config = PoolConfig {
        size,
        checkout_timeout: Duration::from_secs(3),
        ..PoolConfig::default()
    };
    let secrets = std::sync::Arc::new(cluster.backend_credentials());
    let budgets = std::sync::Arc::new(Budgets::default());
    let server = map.servers.get("pg1").expect("server pg1 in the map");
    let first = Pools::sharing(config.clone(), secrets.clone(), budgets.clone());
    let second = Pools::sharing(config, secrets, budgets);
    (first.for_server(server), second.for_server(server))
}

/// A thread whose clients find the budget spent takes the room of another
/// thread's idle connection at once, rather than waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_takes_the_room_of_another_threads_idle_connection() {
    let cluster = TestCluster::start(1);
    let (_, map) = setup(&cluster).await;
    let (first, second) = two_threads_pools(&cluster, &map, 2);
    let leases = [
        first.acquire().await.expect("a first connection"),
        first.acquire().await.expect("a second connection"),
    ];
    drop(leases);
    assert_eq!(first.idle_count(), 2);
    let started = Instant::now();
    let lease = second
        .acquire()
        .await
        .expect("room taken from the other thread's idle connection");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it waited {:?}, as if for the checkout timeout",
        started.elapsed()
    );
    assert_eq!(first.idle_count(), 1, "one idle connection gave its room");
    assert_eq!(second.in_use(), 1);
    drop(lease);
}

/// A thread that took the whole budget while clients of another thread wait
/// gives up what it holds beyond an even split, even though its own clients
/// wait too: otherwise the other thread's clients would time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_holding_the_whole_pool_makes_room_for_another_threads_clients() {
    let cluster = TestCluster::start(1);
    let (_, map) = setup(&cluster).await;
    let (first, second) = two_threads_pools(&cluster, &map, 2);
    let held = first.acquire().await.expect("a first connection");
    let kept = first.acquire().await.expect("a second connection");
    let first_waiter = tokio::spawn({
        let first = first.clone();
        async move { first.acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second_waiter = tokio::spawn({
        let second = second.clone();
        async move { second.acquire().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first_waiter.is_finished() && !second_waiter.is_finished());
    drop(held);
    let second_lease = tokio::time::timeout(Duration::from_secs(2), second_waiter)
        .await
        .expect("the other thread's client got a connection before its timeout")
        .expect("join")
        .expect("a connection for the other thread's client");
    assert!(
        !first_waiter.is_finished(),
        "the returned connection was handed to the thread holding more than its share"
    );
    let opened = proxy_connections(&cluster).await;
    assert!(opened <= 2, "{opened} connections open for a budget of 2");
    drop(kept);
    let first_lease = tokio::time::timeout(Duration::from_secs(2), first_waiter)
        .await
        .expect("the first thread's waiting client got the connection returned there")
        .expect("join")
        .expect("a connection for the first thread's client");
    drop((first_lease, second_lease));
}

/// Clients already handed a connection no longer count as waiting: a third
/// connection returned in the same tick, before those two clients ran, goes
/// idle rather than being closed for clients that are served already.
#[tokio::test]
async fn a_served_client_no_longer_counts_as_waiting() {
    let cluster = TestCluster::start(1);
    let (_, map) = setup(&cluster).await;
    let server = map.servers.get("pg1").expect("server pg1 in the map");
    let pools = proxy::pool::Pools::new(
        proxy::pool::PoolConfig {
            size: 3,
            checkout_timeout: Duration::from_secs(3),
            ..proxy::pool::PoolConfig::default()
        },
        std::sync::Arc::new(cluster.backend_credentials()),
    );
    let pool = pools.for_server(server);
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(pool.acquire().await.expect("a connection"));
    }
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire().await.map(drop) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // All three go back before either waiter runs (one thread, no await).
    drop(leases);
    for waiter in waiters {
        waiter
            .await
            .expect("join")
            .expect("each waiter was handed a connection");
    }
    let closed = pool
        .stats
        .closed_idle
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(closed, 0, "a healthy connection was closed");
    assert_eq!(pool.idle_count(), 3, "all three connections are idle again");
}

/// `error` is the 53300 of a pool whose connections all stayed in use, and
/// its message says each of `says`; `context` starts a failure's message.
fn assert_pool_full(error: &tokio_postgres::Error, says: &[&str], context: &str) {
    let db = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300", "{context}{db:?}");
    for says in says {
        assert!(
            db.message().contains(says),
            "{context}{says:?} in {:?}",
            db.message()
        );
    }
}

/// How many connections the proxy (or a test's pools) holds open to the
/// first server: they log in with application_name `shardline`.
async fn proxy_connections(cluster: &TestCluster) -> i64 {
    cluster
        .connect(0)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardline'",
            &[],
        )
        .await
        .expect("count the proxy's connections to the server")
        .get(0)
}

/// The pid of the server connection the proxy runs `client`'s statement on;
/// `whose` names the statement in a failure.
async fn backend_pid(client: &tokio_postgres::Client, whose: &str) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap_or_else(|e| panic!("{whose} SELECT pg_backend_pid(): {e}"))
        .get(0)
}

/// A server on the proxy's host, named in `[pool] socket_dirs`, is reached
/// through its Unix-domain socket: statements for its keys run there
/// (Postgres sees no client address) while the other server's run over
/// TCP, writes land on the owner, and a CancelRequest reaches a statement
/// running over the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_named_in_socket_dirs_is_reached_through_its_unix_socket() {
    let cluster = TestCluster::start(2);
    let (_, map) = setup(&cluster).await;
    let local = cluster.cluster.servers[0].state();
    let proxy = TestProxy::start(&cluster, CLUSTER, |config| {
        config
            .pool
            .socket_dirs
            .insert(local.name.clone(), local.data_dir.clone());
    })
    .await;
    let keys = shardline_tests::fixtures::key_per_server(&cluster, &map, "pgbench_accounts");
    let client = proxy.connect().await;
    for (index, &key) in keys.iter().enumerate() {
        let key = i32::try_from(key).expect("a small key");
        let row = client
            .query_one(
                "SELECT inet_client_addr() IS NULL FROM pgbench_accounts WHERE aid = $1",
                &[&key],
            )
            .await
            .unwrap_or_else(|e| panic!("server {index}: {e}"));
        assert_eq!(
            row.get::<_, bool>(0),
            index == 0,
            "server {index}: over the Unix socket only when named in socket_dirs"
        );
        client
            .execute(
                "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid = $1",
                &[&key],
            )
            .await
            .unwrap_or_else(|e| panic!("server {index}: update: {e}"));
        let balance: i32 = cluster
            .connect(index)
            .await
            .query_one(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[&key],
            )
            .await
            .expect("read the owner directly")
            .get(0);
        assert_eq!(balance, 7, "server {index}: the write landed on the owner");
    }

    let token = client.cancel_token();
    let local_key = i32::try_from(keys[0]).expect("a small key");
    cancel_while_running(token, async move {
        client
            .query(
                "SELECT pg_sleep(20) FROM pgbench_accounts WHERE aid = $1",
                &[&local_key],
            )
            .await
    })
    .await;
}

/// Runs pgbench's script `script` through `port` with 16 clients in `mode`,
/// `transactions` each; fails the test unless all of them commit.
async fn pgbench_script(
    port: u16,
    mode: &'static str,
    script: &std::path::Path,
    transactions: u32,
) {
    let output = tokio::task::spawn_blocking({
        let script = script.to_path_buf();
        move || {
            Command::new("pgbench")
                .args([
                    "-n",
                    "-M",
                    mode,
                    "-c",
                    "16",
                    "-j",
                    "2",
                    "-t",
                    &transactions.to_string(),
                ])
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-f",
                ])
                .arg(&script)
                .arg("postgres")
                .output()
                .expect("pgbench runs")
        }
    })
    .await
    .expect("pgbench task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let processed = 16 * transactions;
    assert!(
        output.status.success()
            && stdout.contains(&format!(
                "number of transactions actually processed: {processed}/{processed}"
            )),
        "pgbench -M {mode}:\n{stdout}\n{stderr}"
    );
}

/// The `shardline_sends_gathered_total` a proxy's metrics endpoint reports.
async fn sends_gathered(metrics: u16) -> u64 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", metrics))
        .await
        .expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .expect("ask for metrics");
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .expect("read metrics");
    text.lines()
        .find_map(|line| line.strip_prefix("shardline_sends_gathered_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shardline_sends_gathered_total in:\n{text}"))
}

/// The real proxy, two serving threads, sends what each pass of an event
/// loop produced in one io_uring_enter (`proxy::outbox`). Nothing may be
/// lost or reordered: pgbench in prepared mode commits every update on the
/// key's server, and a result far larger than the socket buffers reaches a
/// client that reads it slowly (the backlog path), byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_gathered_per_pass_lose_and_reorder_nothing() {
    let cluster = TestCluster::start(3);
    let _ = setup(&cluster).await;
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let (proxy, _dir) = two_threads_proxy_with(
        &cluster,
        "gathering",
        &format!("gather_sends = true\nmetrics_listen = \"127.0.0.1:{metrics}\"\n"),
    )
    .await;

    let script = accounts_script();
    pgbench_script(proxy.port, "prepared", script.path(), 50).await;
    assert_eq!(
        total_balance(&cluster).await,
        16 * 50,
        "every committed update is on its server"
    );
    // Where the kernel refuses io_uring (a container's seccomp profile),
    // the proxy writes directly: the rest checks that path instead.
    let gathered = sends_gathered(metrics).await;
    if proxy::outbox::available() {
        assert!(
            gathered >= 16 * 50 * 4,
            "sends were not gathered: {gathered}"
        );
    } else {
        assert_eq!(gathered, 0);
    }

    // 32 MB of rows, read 64 KB at a time with pauses: the proxy's sends
    // find the socket full and queue behind what the kernel did not take.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
    let mut raw = raw_login(addr).await;
    let rows: usize = 4000;
    let width: usize = 8000;
    let sql =
        format!("SELECT g, repeat(chr(65 + g % 26), {width}) FROM generate_series(1, {rows}) g\0");
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((4 + sql.len()) as i32).to_be_bytes());
    query.extend_from_slice(sql.as_bytes());
    raw.write_all(&query).await.expect("send the query");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !got.ends_with(b"Z\0\0\0\x05I") {
        assert!(
            Instant::now() < deadline,
            "the result did not arrive within 60 s"
        );
        let n = raw.read(&mut buf).await.expect("read the result");
        assert!(n > 0, "the proxy closed the connection mid-result");
        got.extend_from_slice(&buf[..n]);
        if got.len() < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Each DataRow: 'D', length, 2 columns, then the number and the letters.
    let mut at = got.iter().position(|&b| b == b'D').expect("rows");
    for g in 1..=rows {
        assert_eq!(got[at], b'D', "row {g}: a DataRow where one is due");
        let len = i32::from_be_bytes(got[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let row = &got[at + 5..at + 1 + len];
        let number_len = i32::from_be_bytes(row[2..6].try_into().expect("4 bytes")) as usize;
        assert_eq!(
            &row[6..6 + number_len],
            g.to_string().as_bytes(),
            "row {g} in its place"
        );
        let letters = &row[6 + number_len + 4..];
        let letter = b'A' + (g % 26) as u8;
        assert!(
            letters.len() == width && letters.iter().all(|&b| b == letter),
            "row {g}'s bytes"
        );
        at += 1 + len;
    }
    assert_eq!(got[at], b'C', "CommandComplete after the last row");
}
