//! The rebalancer daemon's settings: its TOML file, with the environment
//! and flags over the shared parts (etcd, cluster; see [`settings::etcd`]).
//! The backend password and TLS are found as [`settings::credentials`] says.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use settings::{Credentials, EtcdSettings, Overrides, Password};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalancerConfig {
    pub cluster: String,
    /// `[etcd] endpoints`; `http://127.0.0.1:2379` when no layer names any.
    pub etcd: EtcdSettings,
    /// Moves running at once (each holds one replication slot and copies
    /// with Postgres's table-sync workers).
    pub max_concurrent_moves: usize,
    /// Moves copying from or to one server at once: a server's disks and
    /// CPU serve live traffic too.
    pub max_moves_per_server: usize,
    /// Cut over once the subscriber is this close to the source (bytes of WAL).
    pub catch_up_lag_bytes: u64,
    /// How long to wait for every proxy to acknowledge a block before
    /// giving the partition back and retrying later. Must exceed the proxies'
    /// lease TTL, so that a proxy cut off from etcd expires within it.
    pub ack_timeout_ms: u64,
    /// Longest wait for a lock in each cutover DDL step.
    pub lock_timeout_ms: u64,
    /// How long the subscriber may take to reach the source's final position.
    pub sync_timeout_ms: u64,
    /// Cutover attempts before the move is rolled back as failed.
    pub max_cutover_attempts: u32,
    /// Election lease: a dead leader is replaced after about this long.
    pub leader_ttl_seconds: i64,
    /// Password for the servers' users; never stored in etcd. When unset,
    /// `SHARDLINE_BACKEND_PASSWORD` or `PGPASSWORD` (see [`RebalancerConfig::credentials`]).
    pub backend_password: Option<Password>,
    /// `[backend]`: per-server passwords and TLS to the servers (`sslmode`,
    /// `sslrootcert`, `sslcert`, `sslkey`), as in the proxy's config.
    pub backend: Credentials,
    /// A file whose first line is the backend password (read at startup).
    pub backend_password_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`host:port`), if anywhere.
    pub metrics_listen: Option<String>,
    /// How often the leader resolves dead proxies' prepared transactions
    /// (two-phase commit recovery); 0 turns it off.
    pub twophase_recovery_interval_ms: u64,
}

impl Default for RebalancerConfig {
    fn default() -> Self {
        RebalancerConfig {
            cluster: settings::default_cluster(),
            etcd: EtcdSettings::at(vec![settings::LOCAL_ETCD.into()]),
            max_concurrent_moves: 2,
            max_moves_per_server: 1,
            catch_up_lag_bytes: 1 << 20,
            ack_timeout_ms: 15_000,
            lock_timeout_ms: 500,
            sync_timeout_ms: 30_000,
            max_cutover_attempts: 5,
            leader_ttl_seconds: 5,
            backend_password: None,
            backend: Credentials::default(),
            backend_password_file: None,
            metrics_listen: None,
            twophase_recovery_interval_ms: 10_000,
        }
    }
}

impl RebalancerConfig {
    pub fn from_toml(text: &str) -> Result<RebalancerConfig, String> {
        settings::parse_toml(text).map_err(|e| format!("invalid rebalancer config: {e}"))
    }

    pub fn read(path: &Path) -> Result<RebalancerConfig, String> {
        settings::read_toml(path).map_err(|e| e.to_string())
    }

    /// Lays `overrides` (the environment, then flags: see
    /// [`Overrides::env_then_flags`]) over the file's etcd endpoints and cluster.
    pub fn layered(mut self, overrides: &Overrides) -> RebalancerConfig {
        overrides.apply(&mut self.etcd, &mut self.cluster);
        if self.etcd.endpoints.is_empty() {
            // An `[etcd]` table without endpoints: the daemon's default.
            self.etcd.endpoints = RebalancerConfig::default().etcd.endpoints;
        }
        self
    }

    /// Reads `backend_password_file` (unless `backend_password` is set) and
    /// the `[backend]` table's password files, and checks the etcd
    /// settings: what a daemon must have before it starts.
    pub fn read_secrets(mut self) -> Result<RebalancerConfig, String> {
        if let (None, Some(path)) = (&self.backend_password, &self.backend_password_file) {
            self.backend_password = Some(Password::from_file(path).map_err(|e| e.to_string())?);
        }
        self.backend = self.backend.read_files().map_err(|e| e.to_string())?;
        shardmap::store::check_settings(&self.etcd).map_err(|e| e.to_string())?;
        Ok(self)
    }

    /// How the daemon logs in to the servers: `[backend]`, with
    /// `backend_password` as its password for all servers, else the
    /// environment (read each time a daemon starts leading).
    pub fn credentials(&self) -> Credentials {
        let mut credentials = self.backend.clone();
        if credentials.password.is_none() {
            credentials.password = self.backend_password.clone();
        }
        credentials.or_from_env()
    }

    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.lock_timeout_ms)
    }
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides_from_toml() {
        let config = RebalancerConfig::from_toml(
            "cluster = \"c1\"\nmax_concurrent_moves = 4\n[etcd]\nendpoints = [\"http://e:1\"]\n",
        )
        .expect("parse");
        assert_eq!(config.cluster, "c1");
        assert_eq!(config.max_concurrent_moves, 4);
        assert_eq!(config.etcd.endpoints, vec!["http://e:1".to_string()]);
        assert_eq!(config.lock_timeout_ms, 500);
        assert!(
            config.ack_timeout_ms > 10_000,
            "must exceed the proxy lease TTL"
        );
    }

    #[test]
    fn flags_and_an_empty_etcd_table_layer_like_the_other_binaries() {
        let config = RebalancerConfig::from_toml("cluster = \"c1\"\n[etcd]\n")
            .expect("parse")
            .layered(&Overrides::given(&[], Some("c2")));
        assert_eq!(config.cluster, "c2");
        assert_eq!(
            config.etcd.endpoints,
            vec![settings::LOCAL_ETCD.to_string()]
        );
    }

    #[test]
    fn a_backend_table_holds_tls_and_backend_password_stays_the_password_for_all() {
        let config = RebalancerConfig::from_toml(
            "backend_password = \"pw\"\n[backend]\nsslmode = \"verify-ca\"\n\
             sslrootcert = \"/tls/ca.crt\"\n[backend.servers.pg2]\nsslmode = \"disable\"\n",
        )
        .expect("parse");
        let credentials = config.credentials();
        assert_eq!(credentials.password_for_server("pg1"), Some("pw"));
        let pg1 = credentials.tls_for_server("pg1").expect("valid");
        assert_eq!(pg1.mode, settings::SslMode::VerifyCa);
        let pg2 = credentials.tls_for_server("pg2").expect("valid");
        assert_eq!(pg2.mode, settings::SslMode::Disable);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = RebalancerConfig::from_toml("max_moves = 3\n").expect_err("unknown key");
        assert!(error.contains("max_moves"), "{error}");
    }
}
