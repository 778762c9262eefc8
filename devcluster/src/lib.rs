//! devcluster: a local shardline cluster in one directory — one etcd and N
//! Postgres 15 servers on free loopback ports — for `shardctl dev up`, the
//! quickstart and the integration tests.
//!
//! It installs nothing: [`Tools::discover`] finds `etcd`, `initdb`, `pg_ctl`
//! and says what to install when something is missing. Postgres refuses to
//! run as root, so when we are root every Postgres command runs as the
//! `postgres` user through `runuser`, and the cluster directory is handed to it.
//!
//! The directory holds `cluster.json` (ports, pids, data directories), which
//! lets another process (`shardctl dev down`) find and stop what this one started.

pub mod certs;
mod process;
mod tools;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use certs::{DevCa, DevCertificates};
pub use process::{EtcdProcess, PgServer};
pub use tools::Tools;

/// Name of the state file in a cluster directory.
pub const STATE_FILE: &str = "cluster.json";
/// A proxy started for the cluster writes its pid here; `dev down` stops it.
pub const PROXY_PID_FILE: &str = "proxy.pid";
/// Likewise for a rebalancer daemon.
pub const REBALANCER_PID_FILE: &str = "rebalancer.pid";

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}")]
    Missing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl DevError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
        let what = what.into();
        move |source| DevError::Io { what, source }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    /// Number of Postgres servers.
    pub servers: usize,
    /// Postgres `fsync`: off makes tests faster; data is disposable anyway.
    pub fsync: bool,
    /// Create a dev CA ([`certs`]) in `<dir>/tls` and serve etcd and Postgres
    /// over TLS with its certificates. Postgres then takes TCP connections
    /// over TLS only (`hostssl` in pg_hba.conf).
    pub tls: bool,
    /// Make password files for etcd's `root` and `shardline` users
    /// ([`EtcdLogin`]); whoever has an etcd client then creates the users and
    /// enables auth (`shardmap::access::enable_auth`).
    pub etcd_auth: bool,
    /// etcd's `--auth-token-ttl` in seconds (etcd's default, 300, when unset):
    /// tests make tokens expire quickly to exercise re-authentication.
    pub etcd_token_ttl: Option<u32>,
}

/// What was started, as written to `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub dir: PathBuf,
    pub etcd: EtcdState,
    pub servers: Vec<PgState>,
    /// The dev CA's files, when the cluster was started with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<DevCertificates>,
    /// etcd's users, when the cluster was started with [`DevOptions::etcd_auth`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_login: Option<EtcdLogin>,
}

impl ClusterState {
    /// How shardline reaches this cluster's etcd: its endpoint, the dev CA
    /// and client certificate with TLS, the `shardline` user with auth.
    pub fn etcd_settings(&self) -> settings::EtcdSettings {
        let mut etcd = settings::EtcdSettings::at(vec![self.etcd.endpoint()]);
        if let (true, Some(certs)) = (self.etcd.tls, &self.certs) {
            etcd.ca_file = Some(certs.ca_cert.clone());
            etcd.cert_file = Some(certs.client_cert.clone());
            etcd.key_file = Some(certs.client_key.clone());
        }
        if let Some(login) = &self.etcd_login {
            etcd.user = Some(login.user.clone());
            etcd.password_file = Some(login.password_file.clone());
        }
        etcd
    }
}

/// etcd's users in a dev cluster: `root`, and one for shardline limited to
/// the cluster's keys. Their passwords are random, in 0600 files of the
/// cluster directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdLogin {
    pub user: String,
    pub password_file: PathBuf,
    pub root_password_file: PathBuf,
}

/// The etcd user shardline's programs log in as in a dev cluster.
pub const ETCD_USER: &str = "shardline";

impl EtcdLogin {
    /// The password files in `dir`, made with random passwords if missing.
    fn create(dir: &Path) -> Result<EtcdLogin, DevError> {
        let login = EtcdLogin {
            user: ETCD_USER.into(),
            password_file: dir.join("etcd.password"),
            root_password_file: dir.join("etcd-root.password"),
        };
        for path in [&login.password_file, &login.root_password_file] {
            if !path.exists() {
                certs::write(path, &format!("{}\n", random_password()?), 0o600)?;
            }
        }
        Ok(login)
    }
}

/// 32 hex digits from the kernel's random source.
fn random_password() -> Result<String, DevError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(DevError::io("cannot read /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdState {
    pub pid: u32,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    /// Whether clients speak TLS to it (with a client certificate).
    #[serde(default)]
    pub tls: bool,
    /// Plain-HTTP `/health` and `/metrics` (`--listen-metrics-urls`), which
    /// need no client certificate.
    #[serde(default)]
    pub metrics_port: Option<u16>,
}

impl EtcdState {
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgState {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl PgState {
    /// URL without password (the dev cluster trusts loopback connections).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
    /// libpq key=value connection string.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

/// A running local cluster. Dropping it stops everything only when it was
/// started with [`LocalCluster::start_owned`] (tests); `shardctl dev up` leaves
/// the processes running for `dev down`.
pub struct LocalCluster {
    pub etcd: EtcdProcess,
    pub servers: Vec<PgServer>,
    /// Streaming read replicas added with `add_replica`.
    pub replicas: Vec<PgServer>,
    /// The dev CA's files, when started with [`DevOptions::tls`].
    pub certs: Option<DevCertificates>,
    /// etcd's users, when started with [`DevOptions::etcd_auth`].
    pub etcd_login: Option<EtcdLogin>,
    dir: PathBuf,
    stop_on_drop: bool,
}

impl LocalCluster {
    /// Starts etcd and the Postgres servers; they outlive this process.
    pub fn start(options: &DevOptions) -> Result<LocalCluster, DevError> {
        LocalCluster::start_inner(options, false, &mut |_| {})
    }

    /// Like [`LocalCluster::start`], reporting each step to `progress`.
    pub fn start_with_progress(
        options: &DevOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LocalCluster, DevError> {
        LocalCluster::start_inner(options, false, progress)
    }

    /// Starts a cluster that is stopped when the value is dropped (tests).
    pub fn start_owned(options: &DevOptions) -> Result<LocalCluster, DevError> {
        LocalCluster::start_inner(options, true, &mut |_| {})
    }

    fn start_inner(
        options: &DevOptions,
        stop_on_drop: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LocalCluster, DevError> {
        let tools = Tools::discover()?;
        let dir = &options.dir;
        if let Ok(state) = read_state(dir) {
            if process::etcd_alive(&state.etcd) {
                return Err(DevError::Failed(format!(
                    "a dev cluster is already running in {}: run `shardctl dev down --dir {}` first",
                    dir.display(),
                    dir.display()
                )));
            }
        }
        fs::create_dir_all(dir)
            .map_err(DevError::io(format!("cannot create {}", dir.display())))?;
        // Postgres resolves relative paths against its data directory.
        let dir = &dir
            .canonicalize()
            .map_err(DevError::io(format!("cannot resolve {}", dir.display())))?;
        tools.hand_to_postgres(dir)?;
        let certs = if options.tls {
            progress("creating a dev CA");
            let certs = DevCertificates::create(&dir.join("tls"))?;
            tools.hand_tree_to_postgres(&dir.join("tls"))?;
            Some(certs)
        } else {
            None
        };

        let etcd_login = if options.etcd_auth {
            Some(EtcdLogin::create(dir)?)
        } else {
            None
        };
        progress("starting etcd");
        let etcd = EtcdProcess::start(
            &tools,
            &dir.join("etcd"),
            certs.as_ref(),
            options.etcd_token_ttl,
        )?;
        let mut cluster = LocalCluster {
            etcd,
            servers: Vec::new(),
            replicas: Vec::new(),
            certs,
            etcd_login,
            dir: dir.clone(),
            stop_on_drop: true, // until fully started, so a failure cleans up
        };
        // Written after every step, so `dev down` finds whatever a crash leaves.
        cluster.write_state()?;
        let template = dir.join("template");
        if options.servers > 0 && !template.join("PG_VERSION").exists() {
            progress("initdb (template)");
            tools.initdb(&template)?;
        }
        for i in 1..=options.servers {
            let name = format!("pg{i}");
            progress(&format!("starting Postgres {name}"));
            let server = PgServer::start(
                &tools,
                &template,
                &dir.join(&name),
                &name,
                options.fsync,
                cluster.certs.as_ref(),
            )?;
            cluster.servers.push(server);
            cluster.write_state()?;
        }
        cluster.stop_on_drop = stop_on_drop;
        Ok(cluster)
    }

    /// Adds a streaming read replica of server `index`; it is stopped with the
    /// cluster.
    pub fn add_replica(&mut self, index: usize) -> Result<PgState, DevError> {
        let tools = Tools::discover()?;
        let primary = self
            .servers
            .get(index)
            .ok_or_else(|| DevError::Failed(format!("no server {index}")))?;
        let name = format!("{}-replica", primary.name());
        let replica = PgServer::start_replica(&tools, primary, &self.dir.join(&name), &name)?;
        let state = replica.state();
        self.replicas.push(replica);
        Ok(state)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn etcd_endpoint(&self) -> String {
        self.etcd.state().endpoint()
    }

    /// See [`ClusterState::etcd_settings`].
    pub fn etcd_settings(&self) -> settings::EtcdSettings {
        self.state().etcd_settings()
    }

    pub fn state(&self) -> ClusterState {
        ClusterState {
            dir: self.dir.clone(),
            etcd: self.etcd.state(),
            servers: self.servers.iter().map(|s| s.state()).collect(),
            certs: self.certs.clone(),
            etcd_login: self.etcd_login.clone(),
        }
    }

    /// Rewrites `cluster.json` (after an etcd restart changed its pid).
    pub fn write_state(&self) -> Result<(), DevError> {
        let json = serde_json::to_vec_pretty(&self.state())
            .map_err(|e| DevError::Failed(format!("cannot encode cluster state: {e}")))?;
        let path = self.dir.join(STATE_FILE);
        fs::write(&path, json).map_err(DevError::io(format!("cannot write {}", path.display())))
    }

    /// Stops everything this cluster runs.
    pub fn stop(mut self) -> Result<(), DevError> {
        self.stop_on_drop = false;
        self.stop_all()
    }

    fn stop_all(&mut self) -> Result<(), DevError> {
        let mut errors = Vec::new();
        for server in self.replicas.iter_mut().chain(self.servers.iter_mut()) {
            if let Err(e) = server.stop() {
                errors.push(e.to_string());
            }
        }
        if let Err(e) = self.etcd.stop() {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DevError::Failed(errors.join("; ")))
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            if let Err(e) = self.stop_all() {
                tracing::warn!(error = %e, "stopping the local cluster left something behind");
            }
        }
    }
}

/// Reads `cluster.json` from a cluster directory.
pub fn read_state(dir: &Path) -> Result<ClusterState, DevError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DevError::Failed(format!(
                "no dev cluster in {} (no {STATE_FILE}): start one with `shardctl dev up`",
                dir.display()
            ))
        } else {
            DevError::Io {
                what: format!("cannot read {}", path.display()),
                source: e,
            }
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        DevError::Failed(format!(
            "{} is not a valid cluster state file: {e}",
            path.display()
        ))
    })
}

/// Stops the cluster described by `dir/cluster.json` (started by another
/// process) and, unless `keep_data`, removes the directory.
pub fn stop_dir(dir: &Path, keep_data: bool) -> Result<ClusterState, DevError> {
    let tools = Tools::discover()?;
    let state = read_state(dir)?;
    let mut errors = Vec::new();
    // A proxy the quickstart started for this cluster, if any.
    for (file, program) in [
        (PROXY_PID_FILE, "shardline-proxy"),
        (REBALANCER_PID_FILE, "shardline-rebalancer"),
    ] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                process::stop_named_pid(pid, program);
            }
        }
    }
    for server in &state.servers {
        if let Err(e) = process::stop_postgres(&tools, &server.data_dir) {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = process::stop_etcd_pid(&state.etcd) {
        errors.push(e.to_string());
    }
    if !errors.is_empty() {
        return Err(DevError::Failed(errors.join("; ")));
    }
    if keep_data {
        let _ = fs::remove_file(dir.join(STATE_FILE));
    } else {
        fs::remove_dir_all(dir)
            .map_err(DevError::io(format!("cannot remove {}", dir.display())))?;
    }
    Ok(state)
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
