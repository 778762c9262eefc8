//! TLS from shardline to Postgres, against servers started with TLS
//! (`TestCluster::start_tls`: the dev CA's certificates, `ssl = on`, and a
//! pg_hba.conf that takes TCP connections over TLS only). The proxy's pools,
//! the rebalancer (and the subscription it creates) and shardctl all reach
//! such servers with `verify-full`; a host name the certificate does not
//! cover, or `sslmode = disable`, fails with a message saying what to change.

use std::path::Path;
use std::time::Duration;

use settings::SslMode;
use shardline_tests::binaries::workspace_binary;
use shardline_tests::fixtures::{key_per_server, setup_schema};
use shardline_tests::move_jobs::{
    assert_phase, jobs, other_server, submit, test_config, wait_terminal, InProcessRebalancer,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Endpoint, Phase, Server};
use tokio::net::{TcpListener, TcpStream};

/// The message and SQLSTATE of the error a statement through `proxy` gets.
async fn error_of(proxy: &TestProxy, sql: &str) -> (String, String) {
    let client = proxy.connect().await;
    let error = client
        .simple_query(sql)
        .await
        .expect_err("the statement fails");
    let db = error
        .as_db_error()
        .expect("an ErrorResponse from the proxy");
    eprintln!("{sql} -> {}: {}", db.code().code(), db.message());
    (db.code().code().to_string(), db.message().to_string())
}

/// Whether the connection serving `sql`'s statement runs over TLS, as the
/// server sees it.
async fn ssl_of_backend(proxy: &TestProxy) -> bool {
    proxy
        .connect()
        .await
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl through the proxy")
        .get(0)
}

/// Forwards connections to `127.0.0.2:<port>` to `target`: the same server
/// under a host name its certificate does not cover.
async fn alias(target: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_verifies_the_servers_and_says_what_is_wrong_when_it_cannot() {
    const NAME: &str = "tls";
    let cluster = TestCluster::start_tls(2);
    let (_store, map) = setup_schema(&cluster, NAME, 8).await;

    // verify-full with the dev CA and client certificate (the harness's default
    // for a TLS cluster): statements reach both servers, over TLS.
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let client = proxy.connect().await;
    let keys = key_per_server(&cluster, &map, "users");
    for key in &keys {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 1)", &[key])
            .await
            .expect("insert over TLS");
        let n: i64 = client
            .query_one("SELECT n FROM users WHERE id = $1", &[key])
            .await
            .expect("read over TLS")
            .get(0);
        assert_eq!(n, 1);
    }
    assert!(
        ssl_of_backend(&proxy).await,
        "the server sees a clear-text connection"
    );
    for index in 0..2 {
        let rows = cluster
            .connect(index)
            .await
            .query(
                "SELECT s.ssl, coalesce(s.client_dn, '') FROM pg_stat_ssl s \
                 JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'shardline'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        assert!(!rows.is_empty(), "no proxy connection on server {index}");
        for row in rows {
            let (ssl, client_dn): (bool, String) = (row.get(0), row.get(1));
            assert!(ssl, "a proxy connection to server {index} is in clear text");
            assert!(
                client_dn.contains("postgres"),
                "no client certificate: {client_dn:?}"
            );
        }
    }

    // The same servers named by 127.0.0.2, which their certificate does not cover.
    let (port1, _fwd1) = alias(cluster.cluster.servers[0].port()).await;
    let (port2, _fwd2) = alias(cluster.cluster.servers[1].port()).await;
    let aliased: Vec<Server> = [("pg1", port1), ("pg2", port2)]
        .iter()
        .map(|(name, port)| {
            let url = format!("postgres://postgres@127.0.0.2:{port}/postgres");
            Server::active(name, Endpoint::parse(&url).expect("url"))
        })
        .collect();
    let store = cluster.store("aliased").await;
    store
        .initialize(ClusterMap::new("aliased", 8, aliased).expect("map"), "test")
        .await
        .expect("init the aliased map");
    let full = TestProxy::start(&cluster, "aliased", |_| {}).await;
    let (code, message) = error_of(&full, "SELECT 1").await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains("does not match host 127.0.0.2") && message.contains("verify-ca"),
        "{message}"
    );
    // verify-ca checks the chain only: the same servers are fine.
    let chain_only = TestProxy::start(&cluster, "aliased", |config| {
        config.backend.tls.sslmode = Some(SslMode::VerifyCa);
    })
    .await;
    assert!(ssl_of_backend(&chain_only).await);

    // Clear text is refused by the servers' pg_hba.conf, and the error says so.
    let plain = TestProxy::start(&cluster, NAME, |config| {
        config.backend.tls.sslmode = Some(SslMode::Disable);
    })
    .await;
    let (code, message) = error_of(&plain, "SELECT 1").await;
    assert_eq!(code, "08006", "{message}");
    assert!(
        message.contains("no pg_hba.conf entry") && message.contains("TLS connections only"),
        "{message}"
    );
}

/// Runs shardctl on `cluster` with the backend TLS given by `env`; returns
/// (success, stdout, stderr).
fn shardctl(
    cluster: &TestCluster,
    name: &str,
    env: &[(&str, &Path)],
    args: &[&str],
) -> (bool, String, String) {
    let mut command = std::process::Command::new(workspace_binary("shardctl", "shardctl"));
    command
        .args(args)
        .envs(cluster.etcd_env())
        .env("SHARDLINE_CLUSTER", name)
        .env("SHARDLINE_ACTOR", "test")
        .env_remove("SHARDLINE_CONFIG")
        .env_remove("PGSSLMODE")
        .env_remove("SHARDLINE_BACKEND_SSLMODE");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run shardctl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_and_shardctl_work_on_a_tls_only_cluster() {
    const NAME: &str = "tlsmove";
    let cluster = TestCluster::start_tls(2);
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let partition = 3u32;
    let owner = map.assignments[partition as usize].owner.clone();
    let to = other_server(&map, &owner);
    let source = cluster.server_index(&owner);
    let target = cluster.server_index(&to);
    // Enough rows that the subscription lives a moment.
    cluster
        .connect(source)
        .await
        .batch_execute(
            "INSERT INTO users_p3 SELECT g, 0 FROM generate_series(1, 300000) g \
             WHERE satisfies_hash_partition('users'::regclass, 8, 3, g::bigint)",
        )
        .await
        .expect("fill the partition");
    let expected: i64 = cluster
        .connect(source)
        .await
        .query_one("SELECT count(*) FROM users_p3", &[])
        .await
        .expect("count")
        .get(0);
    let _rebalancer = InProcessRebalancer::start(test_config(&cluster, NAME), "r1");
    let jobs = jobs(&cluster, NAME).await;
    let id = submit(&jobs, &map, partition, &to).await;

    // The subscription the rebalancer creates connects with the same settings.
    let watcher = cluster.connect(target).await;
    let mut conninfo = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while conninfo.is_none() && tokio::time::Instant::now() < deadline {
        if let Ok(rows) = watcher
            .query("SELECT subconninfo FROM pg_subscription", &[])
            .await
        {
            conninfo = rows.first().map(|row| row.get::<_, String>(0));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = conninfo.is_some();
    let conninfo = conninfo.unwrap_or_default();
    assert!(seen, "the move's subscription never appeared");
    eprintln!("subconninfo: {conninfo}");
    assert!(
        conninfo.contains("sslmode=verify-full")
            && conninfo.contains("sslrootcert=")
            && conninfo.contains("sslcert=")
            && conninfo.contains("sslkey="),
        "{conninfo}"
    );
    let job = wait_terminal(&jobs, &id, Duration::from_secs(60)).await;
    assert_phase(&job, Phase::Done);
    let after = store.load().await.expect("map").map;
    assert_eq!(after.assignments[partition as usize].owner, to);
    let moved: i64 = cluster
        .connect(target)
        .await
        .query_one("SELECT count(*) FROM users_p3", &[])
        .await
        .expect("count on the target")
        .get(0);
    // The servers take TLS connections only: the copy went over TLS.
    assert_eq!(moved, expected);

    // shardctl reaches the servers with the environment's TLS settings.
    let certs = cluster.cluster.certs.clone().expect("a TLS cluster");
    let verify = [
        ("SHARDLINE_BACKEND_SSLMODE", Path::new("verify-full")),
        ("SHARDLINE_BACKEND_SSLROOTCERT", certs.ca_cert.as_path()),
        ("SHARDLINE_BACKEND_SSLCERT", certs.client_cert.as_path()),
        ("SHARDLINE_BACKEND_SSLKEY", certs.client_key.as_path()),
    ];
    let (ok, out, err) = shardctl(&cluster, NAME, &verify, &["--json", "status"]);
    assert!(ok, "shardctl status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["unreachable"], serde_json::json!([]), "{out}");
    // Planning by bytes measures every server's leaves.
    let (ok, out, err) = shardctl(&cluster, NAME, &verify, &["rebalance", "--dry-run"]);
    assert!(ok, "shardctl rebalance --dry-run failed: {err}\n{out}");
    // Clear text: every server is unreachable, and says why.
    let plain = [("PGSSLMODE", Path::new("disable"))];
    let (ok, out, err) = shardctl(&cluster, NAME, &plain, &["--json", "status"]);
    assert!(ok, "shardctl status failed: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    let unreachable = status["unreachable"].to_string();
    eprintln!("shardctl status in clear text: {unreachable}");
    assert!(
        unreachable.contains("TLS connections only"),
        "{unreachable}"
    );
}
