//! Passwords never leak: the proxy, the rebalancer daemon and shardctl run
//! against a cluster whose Postgres servers want a password (a `shardline`
//! role with SCRAM) and whose etcd wants a user and password, both read from
//! password files; with debug logging, everything they print and serve at
//! `/metrics` is searched for the passwords, after checking that the logins
//! they were for did happen.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shardline_tests::binaries::{serves_within, workspace_binary};
use shardline_tests::fixtures::{create_table, key_per_server, owner_of};
use shardline_tests::move_jobs::{jobs, other_server, submit, wait_terminal};
use shardline_tests::TestCluster;
use shardmap::{Change, ClusterMap, Endpoint, Group, KeyType, Phase, Server};

const NAME: &str = "secrets";
const BACKEND_PASSWORD: &str = "backend-Pw-7f3a9c";
const WRONG_PASSWORD: &str = "wrong-Pw-21be04";

/// A process whose stdout and stderr go to files; killed when dropped.
struct Logged {
    child: Child,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut command: Command, dir: &Path, name: &str) -> Logged {
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).expect("log file");
    let err = std::fs::File::create(dir.join(format!("{name}.err"))).expect("log file");
    command
        .env("SHARDLINE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Logged {
        child: command.spawn().expect("start a shardline program"),
    }
}

/// Runs shardctl with the cluster's etcd settings and `backend_password`;
/// keeps its output in `dir` and returns (success, stdout).
fn shardctl(
    cluster: &TestCluster,
    dir: &Path,
    run: usize,
    backend_password: &str,
    args: &[&str],
) -> (bool, String) {
    let output = Command::new(workspace_binary("shardctl", "shardctl"))
        .args(args)
        .envs(cluster.etcd_env())
        .env("SHARDLINE_CLUSTER", NAME)
        .env("SHARDLINE_BACKEND_PASSWORD", backend_password)
        .env("SHARDLINE_LOG", "debug")
        .env_remove("SHARDLINE_CONFIG")
        .output()
        .expect("run shardctl");
    std::fs::write(dir.join(format!("shardctl-{run}.out")), &output.stdout).expect("keep");
    std::fs::write(dir.join(format!("shardctl-{run}.err")), &output.stderr).expect("keep");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET /metrics` at `port`.
fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1."), "{body}");
    body
}

/// The `shardline` role with a password on every server, which must use it:
/// its pg_hba line comes before the dev cluster's trust lines.
async fn require_passwords(cluster: &TestCluster) {
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let hba = server.state().data_dir.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        std::fs::write(
            &hba,
            format!("host all shardline 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .expect("write pg_hba.conf");
        cluster
            .connect(index)
            .await
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE shardline LOGIN SUPERUSER PASSWORD '{BACKEND_PASSWORD}';
                 SELECT pg_reload_conf();"
            ))
            .await
            .expect("create the shardline role");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_reaches_logs_metrics_or_shardctl_output() {
    let cluster = TestCluster::start_secure(2, NAME, Some(2)).await;
    let logs = tempfile::tempdir().expect("tempdir");
    let dir = logs.path();
    require_passwords(&cluster).await;
    let backend_password_file = dir.join("backend.password");
    std::fs::write(&backend_password_file, format!("{BACKEND_PASSWORD}\n")).expect("write");
    let etcd = cluster.etcd();
    let etcd_password_file = etcd.password_file.clone().expect("etcd password file");
    let etcd_password = settings::Password::from_file(&etcd_password_file).expect("read");
    let root_password_file = cluster
        .cluster
        .etcd_login
        .as_ref()
        .map(|l| l.root_password_file.clone())
        .expect("root password file");
    let root_password = settings::Password::from_file(&root_password_file).expect("read");

    // The map names the `shardline` role: nothing can log in as it without
    // the password, so every statement below proves a login with it.
    let servers: Vec<Server> = cluster
        .cluster
        .servers
        .iter()
        .map(|s| {
            let url = format!("postgres://shardline@127.0.0.1:{}/postgres", s.state().port);
            Server::active(s.name(), Endpoint::parse(&url).expect("url"))
        })
        .collect();
    let store = cluster.store(NAME).await;
    store
        .initialize(ClusterMap::new(NAME, 8, servers).expect("map"), "test")
        .await
        .expect("init");
    let map = store
        .update("test", |map| {
            map.declare(Group::hash("users", KeyType::Bigint).table("users", "id"));
            Ok(Change::new("test-schema", "users"))
        })
        .await
        .expect("declare")
        .map;
    create_table(
        &cluster,
        &map,
        "users",
        "id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0",
    )
    .await;

    let proxy_port = free_port();
    let proxy_metrics = free_port();
    let proxy_config = dir.join("proxy.toml");
    std::fs::write(
        &proxy_config,
        format!(
            "listen = \"127.0.0.1:{proxy_port}\"\ncluster = {NAME:?}\n\
             metrics_listen = \"127.0.0.1:{proxy_metrics}\"\n[auth]\nmethod = \"trust\"\n\
             [backend]\npassword_file = {backend_password_file:?}\n[etcd]\n{}",
            toml::to_string(&etcd).expect("encode")
        ),
    )
    .expect("write proxy config");
    let mut proxy_command = Command::new(workspace_binary("proxy", "shardline-proxy"));
    proxy_command
        .arg("--config")
        .arg(&proxy_config)
        .args(["--id", "secret-proxy"])
        .env_remove("SHARDLINE_BACKEND_PASSWORD")
        .env_remove("PGPASSWORD");
    let _proxy = spawn(proxy_command, dir, "proxy");

    let rebalancer_metrics = free_port();
    let rebalancer_config = dir.join("rebalancer.toml");
    std::fs::write(
        &rebalancer_config,
        format!(
            "cluster = {NAME:?}\nleader_ttl_seconds = 3\n\
             metrics_listen = \"127.0.0.1:{rebalancer_metrics}\"\n\
             backend_password_file = {backend_password_file:?}\n[etcd]\n{}",
            toml::to_string(&etcd).expect("encode")
        ),
    )
    .expect("write rebalancer config");
    let mut rebalancer_command =
        Command::new(workspace_binary("rebalancer", "shardline-rebalancer"));
    rebalancer_command
        .arg("--config")
        .arg(&rebalancer_config)
        .args(["--id", "secret-r1"])
        .env_remove("SHARDLINE_BACKEND_PASSWORD")
        .env_remove("PGPASSWORD");
    let _rebalancer = spawn(rebalancer_command, dir, "rebalancer");

    // Statements through the proxy, on every server: the proxy logged in.
    let conninfo = format!("host=127.0.0.1 port={proxy_port} user=postgres dbname=postgres");
    let connected = serves_within(&conninfo, Duration::from_secs(20)).await;
    assert!(connected, "the proxy never served: see {}", dir.display());
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect through the proxy");
    tokio::spawn(connection);
    let keys = key_per_server(&cluster, &map, "users");
    for key in &keys {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 1)", &[key])
            .await
            .unwrap_or_else(|e| panic!("insert {key} through the proxy: {e}"));
    }

    // shardctl reaches every server with the password, and none without it.
    let (ok, status) = shardctl(&cluster, dir, 1, BACKEND_PASSWORD, &["status", "--json"]);
    assert!(ok, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["unreachable"], serde_json::json!([]), "{status}");
    let (_, refused) = shardctl(&cluster, dir, 2, WRONG_PASSWORD, &["status", "--json"]);
    let refused: serde_json::Value = serde_json::from_str(&refused).expect("json");
    let unreachable = refused["unreachable"].as_array().map_or(0, Vec::len);
    assert_eq!(
        unreachable, 2,
        "a wrong password must not log in: {refused}"
    );
    shardctl(&cluster, dir, 3, BACKEND_PASSWORD, &["status"]);

    // The rebalancer moves a partition: it and its subscription logged in.
    let jobs = jobs(&cluster, NAME).await;
    let key = keys[0];
    let partition = map
        .partition_of("users", &shardmap::KeyValue::Int(key))
        .expect("partition");
    let to = other_server(&map, &owner_of(&map, key));
    let id = submit(&jobs, &map, partition, &to).await;
    let job = wait_terminal(&jobs, &id, Duration::from_secs(90)).await;
    assert_eq!(job.phase, Phase::Done, "{job:?}");
    let rows = client
        .query("SELECT n FROM users WHERE id = $1", &[&key])
        .await
        .expect("read after the move");
    assert_eq!(rows.len(), 1);
    shardctl(&cluster, dir, 4, BACKEND_PASSWORD, &["status", "--json"]);
    shardctl(&cluster, dir, 5, BACKEND_PASSWORD, &["history", "--json"]);

    let mut seen = vec![
        ("proxy /metrics".to_string(), scrape(proxy_metrics)),
        (
            "rebalancer /metrics".to_string(),
            scrape(rebalancer_metrics),
        ),
    ];
    drop(_proxy);
    drop(_rebalancer);
    for entry in std::fs::read_dir(dir).expect("logs") {
        let path: PathBuf = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".out") || name.ends_with(".err") {
            seen.push((
                name,
                String::from_utf8_lossy(&std::fs::read(&path).expect("log")).into(),
            ));
        }
    }
    let proxy_log = seen
        .iter()
        .find(|(name, _)| name == "proxy.err")
        .map(|(_, text)| text.as_str())
        .unwrap_or_default();
    assert!(
        proxy_log.contains("DEBUG"),
        "debug logging was on: {proxy_log}"
    );
    for (name, text) in &seen {
        for (what, secret) in [
            ("the backend password", BACKEND_PASSWORD),
            ("a wrong backend password", WRONG_PASSWORD),
            ("the etcd password", etcd_password.expose()),
            ("etcd's root password", root_password.expose()),
        ] {
            assert!(!text.contains(secret), "{what} is in {name}:\n{text}");
        }
    }
}
