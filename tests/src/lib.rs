//! The integration-test harness: a [`TestCluster`] is a real etcd and real
//! Postgres 15 servers on free loopback ports in a temporary directory,
//! stopped and deleted when the value is dropped (also when a test panics).
//! Also here: [`TestProxy`], a proxy inside the test process, and
//! [`Cutter`], a TCP forwarder that simulates a network partition.
//!
//! - [`fixtures`]: tables and test data on the servers, and reading them back.
//! - [`move_jobs`]: driving and observing partition moves.
//! - [`binaries`]: `shardctl` and `shardline-rebalancer` as real processes.
//! - [`latency`]: percentiles of measured latencies.
//! - [`differential`]: the same queries through the proxy and on one plain
//!   server, answers compared (the cross-shard read suite).

pub mod binaries;
pub mod counters;
pub mod differential;
pub mod fixtures;
pub mod latency;
pub mod move_jobs;

use std::time::Duration;

use devcluster::{DevOptions, LocalCluster};
use shardmap::{ClusterMap, Endpoint, MapStore, Server, Versioned};

pub struct TestCluster {
    pub cluster: LocalCluster,
    // Dropped after `cluster`, so the processes stop before their files go.
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts etcd and `servers` Postgres servers (fsync off).
    pub fn start(servers: usize) -> TestCluster {
        TestCluster::start_with(servers, false)
    }

    /// A cluster whose etcd and Postgres servers speak TLS with the
    /// certificates of a dev CA (`cluster.certs`).
    pub fn start_tls(servers: usize) -> TestCluster {
        TestCluster::start_with(servers, true)
    }

    /// A cluster whose etcd wants TLS with a client certificate and
    /// authentication: the `shardline` user may use only cluster `name`'s
    /// keys ([`TestCluster::etcd`] logs in as it). `token_ttl`: etcd's
    /// token lifetime in seconds (tests of re-authentication make it short).
    pub async fn start_secure(servers: usize, name: &str, token_ttl: Option<u32>) -> TestCluster {
        let options = |dir: &std::path::Path| DevOptions {
            dir: dir.to_path_buf(),
            servers,
            fsync: false,
            tls: true,
            etcd_auth: true,
            etcd_token_ttl: token_ttl,
        };
        let cluster = tokio::task::block_in_place(|| TestCluster::start_options(options));
        let login = cluster
            .cluster
            .etcd_login
            .clone()
            .expect("started with auth");
        let read = |path: &std::path::Path| {
            settings::Password::from_file(path)
                .expect("dev password file")
                .expose()
                .to_string()
        };
        let anonymous = settings::EtcdSettings {
            user: None,
            password_file: None,
            ..cluster.etcd()
        };
        shardmap::access::enable_auth(
            &anonymous,
            &read(&login.root_password_file),
            &login.user,
            &read(&login.password_file),
            name,
        )
        .await
        .expect("turn on etcd auth");
        cluster
    }

    fn start_with(servers: usize, tls: bool) -> TestCluster {
        TestCluster::start_options(|dir| DevOptions {
            dir: dir.to_path_buf(),
            servers,
            fsync: false,
            tls,
            etcd_auth: false,
            etcd_token_ttl: None,
        })
    }

    fn start_options(options: impl FnOnce(&std::path::Path) -> DevOptions) -> TestCluster {
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
        let options = options(dir.path());
        let cluster = match LocalCluster::start_owned(&options) {
            Ok(cluster) => cluster,
            Err(e) => panic!("cannot start the test cluster: {e}"),
        };
        TestCluster { cluster, _dir: dir }
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        vec![self.cluster.etcd_endpoint()]
    }

    /// How shardline reaches this etcd (TLS files and login when it wants them).
    pub fn etcd(&self) -> settings::EtcdSettings {
        self.cluster.etcd_settings()
    }

    /// [`TestCluster::etcd`] as the environment variables of a shardline program.
    pub fn etcd_env(&self) -> Vec<(&'static str, String)> {
        use settings::etcd::*;
        let etcd = self.etcd();
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        [
            (ETCD_VAR, Some(etcd.endpoints.join(","))),
            (CA_FILE_VAR, path(&etcd.ca_file)),
            (CERT_FILE_VAR, path(&etcd.cert_file)),
            (KEY_FILE_VAR, path(&etcd.key_file)),
            (USER_VAR, etcd.user.clone()),
            (PASSWORD_FILE_VAR, path(&etcd.password_file)),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
    }

    /// A map store for `cluster` on this etcd.
    pub async fn store(&self, cluster: &str) -> MapStore {
        MapStore::connect(&self.etcd(), cluster)
            .await
            .expect("cannot connect to the test etcd")
    }

    /// The servers of this cluster as map entries.
    pub fn map_servers(&self) -> Vec<Server> {
        self.cluster
            .servers
            .iter()
            .map(|s| {
                let primary = Endpoint::parse(&s.state().url()).expect("dev URLs parse");
                Server::active(s.name(), primary)
            })
            .collect()
    }

    /// Initialises a map of `partitions` partitions over this cluster's servers
    /// (or over one placeholder server when it has none).
    pub async fn init_map(&self, cluster: &str, partitions: u32) -> (MapStore, Versioned) {
        let mut servers = self.map_servers();
        if servers.is_empty() {
            let nowhere = Endpoint::parse("postgres://postgres@127.0.0.1:9/postgres");
            servers.push(Server::active("placeholder", nowhere.expect("parses")));
        }
        let store = self.store(cluster).await;
        let map = ClusterMap::new(cluster, partitions, servers).expect("valid map");
        let saved = store.initialize(map, "test").await.expect("init");
        (store, saved)
    }

    /// The index of server `name` in this cluster.
    pub fn server_index(&self, name: &str) -> usize {
        self.cluster
            .servers
            .iter()
            .position(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no server {name} in the test cluster"))
    }

    /// How shardline reaches this cluster's servers: nothing to set for a
    /// plain cluster; for one started with TLS, what `shardctl dev up --tls`
    /// writes (verify-full against the dev CA, the dev client certificate).
    pub fn backend_credentials(&self) -> settings::Credentials {
        let mut credentials = settings::Credentials::default();
        if let Some(certs) = &self.cluster.certs {
            credentials.tls = settings::TlsKeys {
                sslmode: Some(settings::SslMode::VerifyFull),
                sslrootcert: Some(certs.ca_cert.clone()),
                sslcert: Some(certs.client_cert.clone()),
                sslkey: Some(certs.client_key.clone()),
            };
        }
        credentials
    }

    /// A client connected straight to Postgres server `index` (no proxy),
    /// over TLS when the cluster has it.
    pub async fn connect(&self, index: usize) -> tokio_postgres::Client {
        let conninfo = self.cluster.servers[index].state().conninfo();
        let config: tokio_postgres::Config = conninfo.parse().expect("dev conninfo parses");
        let tls = match self.cluster.certs {
            Some(_) => self
                .backend_credentials()
                .tls_for_server("")
                .expect("dev TLS settings"),
            None => settings::BackendTls::disabled(),
        };
        let (client, connection) = pgtls::connect(config, &tls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {conninfo}: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

/// The value of the unlabelled metric `name` in a `/metrics` body; panics
/// (showing the body) when it is missing.
pub fn metric_value(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} missing in:\n{body}"))
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

/// A proxy running inside the test process.
pub struct TestProxy {
    pub addr: std::net::SocketAddr,
    pub shared: std::sync::Arc<proxy::context::Shared>,
    _cache: std::sync::Arc<shardmap::MapCache>,
    task: tokio::task::JoinHandle<()>,
    registry: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.registry.abort();
    }
}

impl TestProxy {
    /// Starts a proxy for `cluster_name` on a free port, with trust auth and
    /// the cluster's backend TLS (see [`TestCluster::backend_credentials`])
    /// unless `configure` changes them.
    pub async fn start(
        cluster: &TestCluster,
        cluster_name: &str,
        configure: impl FnOnce(&mut proxy::config::ProxyConfig),
    ) -> TestProxy {
        let mut config = proxy::config::ProxyConfig {
            listen: "127.0.0.1:0".into(),
            cluster: cluster_name.into(),
            ..Default::default()
        };
        config.etcd = cluster.etcd();
        config.auth.method = proxy::auth::AuthMethod::Trust;
        config.backend = cluster.backend_credentials();
        configure(&mut config);
        let users = config.users().expect("users");
        let cache =
            std::sync::Arc::new(shardmap::MapCache::spawn(config.etcd.clone(), cluster_name));
        assert!(
            cache
                .wait_for_version(1, Duration::from_secs(10))
                .await
                .is_some(),
            "the proxy's map cache never loaded the map"
        );
        let pools = proxy::pool::Pools::new(
            config.pool_config(),
            std::sync::Arc::new(config.backend.clone()),
        );
        let listener = proxy::server::bind(&config.listen)
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let tls = proxy::tls::from_config(&config.tls).expect("TLS settings");
        // Registered like the real daemon: cutovers wait for this proxy.
        let liveness = proxy::liveness::Liveness::new(false);
        let registry = tokio::spawn(proxy::registry::keep_registered(
            proxy::registry::Registration {
                etcd: config.etcd.clone(),
                cluster: cluster_name.into(),
                id: format!("test-{}", addr.port()),
                listen: addr.to_string(),
            },
            cache.clone(),
            liveness.clone(),
        ));
        let config_etcd = config.etcd.clone();
        let mut shared = proxy::context::Shared::new(config, users, cache.subscribe(), pools);
        shared.tls = tls;
        shared.liveness = liveness.clone();
        shared.two_phase = std::sync::Arc::new(proxy::two_phase::TwoPhase::new(
            config_etcd,
            cluster_name.into(),
        ));
        let shared = std::sync::Arc::new(shared);
        let task = tokio::spawn(proxy::server::serve(listener, shared.clone()));
        let registered = eventually(Duration::from_secs(15), || {
            let liveness = liveness.clone();
            async move { liveness.serving() }
        })
        .await;
        assert!(registered, "the test proxy never registered in etcd");
        TestProxy {
            addr,
            shared,
            _cache: cache,
            task,
            registry,
        }
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.addr.port()
        )
    }

    /// Waits at most `timeout` until the proxy is in degraded mode
    /// (`degraded`), or serves normally (not); whether it got there.
    pub async fn reaches_degraded(&self, degraded: bool, timeout: Duration) -> bool {
        let liveness = self.shared.liveness.clone();
        eventually(timeout, || {
            let liveness = liveness.clone();
            async move {
                if degraded {
                    liveness.degraded()
                } else {
                    liveness.serving() && !liveness.degraded()
                }
            }
        })
        .await
    }

    /// A tokio-postgres client connected through the proxy.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect through the proxy: {e}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }
}

/// A TCP forwarder a test can cut: stands between a proxy and etcd to
/// simulate a network partition.
pub struct Cutter {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    /// Forwards connections on a free port to `target` (`host:port`).
    pub async fn start(target: &str) -> Cutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the cutter");
        let addr = listener.local_addr().expect("cutter address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Default::default();
        let target = target.to_string();
        let task = {
            let (cut, connections) = (cut.clone(), connections.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let target = target.clone();
                    let handle = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().expect("lock").push(handle);
                }
            })
        };
        Cutter {
            addr,
            cut,
            connections,
            task,
        }
    }

    /// `http://addr`, for etcd clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for handle in self.connections.lock().expect("lock").drain(..) {
            handle.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
