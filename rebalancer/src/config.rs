//! The rebalancer daemon's settings: TOML file, then `SHARDLINE_*`
//! environment overrides, then flags (in `main`).

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalancerConfig {
    pub cluster: String,
    pub etcd: EtcdConfig,
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
    /// Password for the servers' users; never stored in etcd. Also read from
    /// `SHARDLINE_BACKEND_PASSWORD` or `PGPASSWORD`.
    pub backend_password: Option<String>,
    /// Where to serve Prometheus metrics (`host:port`), if anywhere.
    pub metrics_listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
        }
    }
}

impl Default for RebalancerConfig {
    fn default() -> Self {
        RebalancerConfig {
            cluster: "default".into(),
            etcd: EtcdConfig::default(),
            max_concurrent_moves: 2,
            max_moves_per_server: 1,
            catch_up_lag_bytes: 1 << 20,
            ack_timeout_ms: 15_000,
            lock_timeout_ms: 500,
            sync_timeout_ms: 30_000,
            max_cutover_attempts: 5,
            leader_ttl_seconds: 5,
            backend_password: None,
            metrics_listen: None,
        }
    }
}

impl RebalancerConfig {
    pub fn from_toml(text: &str) -> Result<RebalancerConfig, String> {
        toml::from_str(text).map_err(|e| format!("invalid rebalancer config: {e}"))
    }

    /// Applies `SHARDLINE_ETCD`, `SHARDLINE_CLUSTER` and the password variables.
    pub fn apply_env(&mut self) {
        if let Ok(etcd) = std::env::var("SHARDLINE_ETCD") {
            let endpoints: Vec<String> = etcd
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            if !endpoints.is_empty() {
                self.etcd.endpoints = endpoints;
            }
        }
        if let Ok(cluster) = std::env::var("SHARDLINE_CLUSTER") {
            if !cluster.is_empty() {
                self.cluster = cluster;
            }
        }
        if self.backend_password.is_none() {
            self.backend_password = std::env::var("SHARDLINE_BACKEND_PASSWORD")
                .or_else(|_| std::env::var("PGPASSWORD"))
                .ok();
        }
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
    fn unknown_keys_are_refused() {
        let error = RebalancerConfig::from_toml("max_moves = 3\n").expect_err("unknown key");
        assert!(error.contains("max_moves"), "{error}");
    }
}
