//! The integration-test harness: a [`TestCluster`] is a real etcd and real
//! Postgres 15 servers on free loopback ports in a temporary directory,
//! stopped and deleted when the value is dropped (also when a test panics).

use std::time::Duration;

use devcluster::{DevOptions, LocalCluster};
use shardmap::{ClusterMap, Endpoint, MapStore, Server, ServerState, Versioned};

pub struct TestCluster {
    pub cluster: LocalCluster,
    // Dropped after `cluster`, so the processes stop before their files go.
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts etcd and `servers` Postgres servers (fsync off).
    pub fn start(servers: usize) -> TestCluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SHARDLINE_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::Builder::new()
            .prefix("shardline-test-")
            .tempdir()
            .expect("cannot create a temp dir for the test cluster");
        let options = DevOptions {
            dir: dir.path().to_path_buf(),
            servers,
            fsync: false,
        };
        let cluster = match LocalCluster::start_owned(&options) {
            Ok(cluster) => cluster,
            Err(e) => panic!("cannot start the test cluster: {e}"),
        };
        TestCluster { cluster, _dir: dir }
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        vec![self.cluster.etcd_endpoint()]
    }

    /// A map store for `cluster` on this etcd.
    pub async fn store(&self, cluster: &str) -> MapStore {
        MapStore::connect(&self.etcd_endpoints(), cluster)
            .await
            .expect("cannot connect to the test etcd")
    }

    /// The servers of this cluster as map entries.
    pub fn map_servers(&self) -> Vec<Server> {
        self.cluster
            .servers
            .iter()
            .map(|s| Server {
                name: s.name().to_string(),
                primary: Endpoint::parse(&s.state().url()).expect("dev URLs parse"),
                replicas: Vec::new(),
                region: None,
                state: ServerState::Active,
            })
            .collect()
    }

    /// Initialises a map of `partitions` partitions over this cluster's servers
    /// (or over one placeholder server when it has none).
    pub async fn init_map(&self, cluster: &str, partitions: u32) -> (MapStore, Versioned) {
        let mut servers = self.map_servers();
        if servers.is_empty() {
            servers.push(Server {
                name: "placeholder".into(),
                primary: Endpoint::parse("postgres://postgres@127.0.0.1:9/postgres")
                    .expect("parses"),
                replicas: Vec::new(),
                region: None,
                state: ServerState::Active,
            });
        }
        let store = self.store(cluster).await;
        let map = ClusterMap::new(cluster, partitions, servers).expect("valid map");
        let saved = store.initialize(map, "test").await.expect("init");
        (store, saved)
    }

    /// A client connected straight to Postgres server `index` (no proxy).
    pub async fn connect(&self, index: usize) -> tokio_postgres::Client {
        let conninfo = self.cluster.servers[index].state().conninfo();
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {conninfo}: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
