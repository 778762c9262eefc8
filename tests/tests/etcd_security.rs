//! etcd with TLS, client certificates and authentication: a cluster whose
//! etcd wants all three still serves statements through the proxy, answers
//! `shardctl` and moves partitions with the rebalancer daemon, also after
//! etcd's auth tokens expired; clients without the client certificate or
//! with a wrong password are refused with errors that say what to check.

use std::time::Duration;

use shardline_tests::binaries::{shardctl, RebalancerProcess};
use shardline_tests::fixtures::{key_per_server, owner_of, setup_schema};
use shardline_tests::move_jobs::{jobs, other_server, submit, test_config, wait_terminal};
use shardline_tests::{eventually, TestCluster, TestProxy};
use shardmap::{Change, Phase};

/// etcd's token lifetime in these tests: short, so that every long-lived
/// client outlives a few tokens.
const TOKEN_TTL_SECONDS: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_shardctl_and_rebalancer_work_against_etcd_with_tls_and_auth() {
    const NAME: &str = "secure";
    let cluster = TestCluster::start_secure(3, NAME, Some(TOKEN_TTL_SECONDS)).await;
    let etcd = cluster.etcd();
    assert!(etcd.endpoints[0].starts_with("https://"), "{etcd:?}");
    assert!(etcd.user.is_some() && etcd.password_file.is_some());
    let (store, map) = setup_schema(&cluster, NAME, 8).await;
    let proxy = TestProxy::start(&cluster, NAME, |_| {}).await;
    let client = proxy.connect().await;
    let keys = key_per_server(&cluster, &map, "users");
    for key in &keys {
        client
            .execute("INSERT INTO users (id, n) VALUES ($1, 1)", &[key])
            .await
            .unwrap_or_else(|e| panic!("insert {key}: {e}"));
    }

    // shardctl logs in through the same settings, given as SHARDLINE_ETCD_*.
    let status: serde_json::Value =
        serde_json::from_str(&shardctl(&cluster, NAME, &["status", "--json"])).expect("json");
    assert_eq!(status["unreachable"], serde_json::json!([]), "{status}");

    // Outlive a few tokens with nothing but the streams open: the proxy's
    // watch and lease keep-alives must not depend on the token they opened with.
    tokio::time::sleep(Duration::from_secs(u64::from(TOKEN_TTL_SECONDS) * 3)).await;
    let saved = store
        .update("test", |_| {
            Ok(Change::new("touch", "after the tokens expired"))
        })
        .await
        .expect("a write after the token expired logs in again");
    let shared = proxy.shared.clone();
    let followed = eventually(Duration::from_secs(10), || {
        let shared = shared.clone();
        let version = saved.map.version;
        async move {
            let seen = shared.map.borrow().as_ref().map(|v| v.map.version);
            seen.is_some_and(|seen| seen >= version)
        }
    })
    .await;
    assert!(followed, "the proxy's watch stopped following the map");
    assert!(
        proxy.shared.liveness.serving(),
        "the proxy lost its registration"
    );

    // The rebalancer daemon (a real process reading [etcd] from its config
    // file) moves the partition of the first key, which needs the proxy's
    // acknowledgement of the block: proxy and daemon both write to etcd.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(&cluster, NAME);
    let _daemon = RebalancerProcess::start(&config, "secure-r1", None, dir.path());
    let jobs = jobs(&cluster, NAME).await;
    let key = keys[0];
    let partition = map
        .partition_of("users", &shardmap::KeyValue::Int(key))
        .expect("partition");
    let from = owner_of(&map, key);
    let to = other_server(&map, &from);
    let id = submit(&jobs, &map, partition, &to).await;
    let job = wait_terminal(&jobs, &id, Duration::from_secs(90)).await;
    assert_eq!(job.phase, Phase::Done, "{job:?}");
    let after = store.load().await.expect("load").map;
    assert_eq!(owner_of(&after, key), to);
    for key in &keys {
        let rows = client
            .query("SELECT n FROM users WHERE id = $1", &[key])
            .await
            .unwrap_or_else(|e| panic!("read {key} after the move: {e}"));
        assert_eq!(rows.len(), 1, "user {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_certificate_or_the_password_are_refused_clearly() {
    const NAME: &str = "refusals";
    let cluster = TestCluster::start_secure(0, NAME, None).await;
    let good = cluster.etcd();
    shardmap::MapStore::connect(&good, NAME)
        .await
        .expect("the right settings connect")
        .try_load()
        .await
        .expect("and may read the cluster's keys");

    let error = |settings: settings::EtcdSettings| async move {
        let attempt = async {
            let store = shardmap::MapStore::connect(&settings, NAME).await?;
            store.try_load().await
        };
        match attempt.await {
            Ok(_) => panic!("{settings:?} was let in"),
            Err(e) => e.to_string(),
        }
    };

    let wrong_password_file = cluster.cluster.dir().join("wrong.password");
    std::fs::write(&wrong_password_file, "not-the-password\n").expect("write");
    let wrong_password = error(settings::EtcdSettings {
        password_file: Some(wrong_password_file.clone()),
        ..good.clone()
    })
    .await;
    assert!(
        wrong_password.contains("authentication failed")
            && wrong_password.contains("check the etcd user and password"),
        "{wrong_password}"
    );
    assert!(
        !wrong_password.contains("not-the-password"),
        "{wrong_password}"
    );

    let no_login = error(settings::EtcdSettings {
        user: None,
        password_file: None,
        ..good.clone()
    })
    .await;
    assert!(
        no_login.contains("check the etcd user and password"),
        "{no_login}"
    );

    let no_certificate = error(settings::EtcdSettings {
        cert_file: None,
        key_file: None,
        ..good.clone()
    })
    .await;
    assert!(no_certificate.contains("cert_file"), "{no_certificate}");

    let plain = error(settings::EtcdSettings {
        endpoints: vec![good.endpoints[0].replace("https://", "http://")],
        ca_file: None,
        cert_file: None,
        key_file: None,
        ..good.clone()
    })
    .await;
    assert!(plain.contains("etcd"), "{plain}");

    let missing = error(settings::EtcdSettings {
        password_file: Some(cluster.cluster.dir().join("no-such.password")),
        ..good.clone()
    })
    .await;
    assert!(missing.contains("no-such.password"), "{missing}");

    // shardctl says the same, and exits non-zero.
    let output = std::process::Command::new(shardline_tests::binaries::workspace_binary(
        "shardctl", "shardctl",
    ))
    .args(["status"])
    .envs(cluster.etcd_env())
    .env("SHARDLINE_ETCD_PASSWORD_FILE", &wrong_password_file)
    .env("SHARDLINE_CLUSTER", NAME)
    .env_remove("SHARDLINE_CONFIG")
    .output()
    .expect("run shardctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("check the etcd user and password") && !stderr.contains("not-the-password"),
        "{stderr}"
    );
}
