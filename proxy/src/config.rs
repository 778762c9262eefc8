//! The proxy's configuration: a TOML file, with environment variables and
//! flags on top (see `main.rs`). The parts every shardline binary shares —
//! `cluster`, `[etcd]`, the `[backend]` passwords — are types of the
//! `settings` crate, which also lays the environment and flags over them;
//! what only the proxy has (listen address, client auth, pools, TLS, limits)
//! is here. Secrets (user passwords, backend passwords) live only here,
//! never in etcd, and are never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use settings::{Credentials, EtcdSettings};

use crate::auth::{AuthMethod, ScramSecret, User, Users};
use crate::pool::{PoolConfig, Secrets};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address clients connect to.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Cluster name in etcd.
    #[serde(default = "settings::default_cluster")]
    pub cluster: String,
    #[serde(default)]
    pub etcd: EtcdSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub pool: PoolSettings,
    /// Passwords the proxy uses to log in to the servers (per server, or one
    /// for all), and TLS to them (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`).
    #[serde(default)]
    pub backend: Credentials,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub scatter: ScatterSettings,
    /// Transactions that write on several servers.
    #[serde(default)]
    pub transactions: TransactionSettings,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when unset.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The region this proxy runs in (a server's `region` in the map).
    /// Statements any server can answer — reference-table reads, catalog
    /// queries — go to a serving server of this region when there is one.
    #[serde(default)]
    pub region: Option<String>,
    /// `"strict"`: statements on partitions pinned to another region are
    /// refused (see `residency`); needs `region`. `"off"` by default.
    #[serde(default)]
    pub residency: crate::residency::Residency,
    /// Each serving thread sends what one pass of its event loop produced
    /// in one system call (io_uring), where the kernel allows it (see
    /// `outbox`): half the context switches where the proxy shares its
    /// cores, 2–6 % more tps on this project's bench (docs/PERFORMANCE.md,
    /// "Sends gathered per pass"). On by default; false: every connection
    /// writes directly.
    #[serde(default = "default_true")]
    pub gather_sends: bool,
}

/// Reads across partitions on several servers (scatter-gather).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScatterSettings {
    /// Whether a read-only SELECT without a single-server key runs on every
    /// server concerned (on by default). Off: such statements are refused, as
    /// before scatter reads existed; a session can still change it with
    /// `SET shardline.scatter`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most partial rows the proxy gathers to combine aggregates, GROUP BY or
    /// DISTINCT (each becomes parameters of the combining query on a server).
    #[serde(default = "default_max_combine_rows")]
    pub max_combine_rows: usize,
}

fn default_true() -> bool {
    true
}
fn default_max_combine_rows() -> usize {
    100_000
}

impl Default for ScatterSettings {
    fn default() -> ScatterSettings {
        ScatterSettings {
            enabled: true,
            max_combine_rows: default_max_combine_rows(),
        }
    }
}

/// Transactions that reach several servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransactionSettings {
    /// `2pc` (default): a transaction may run statements on several servers
    /// and commits on all of them with two-phase commit (the servers need
    /// `max_prepared_transactions` > 0). `refuse`: the first statement for a
    /// second server gets SQLSTATE 0A000, as before. A session can change
    /// it with `SET shardline.cross_server`.
    #[serde(default)]
    pub cross_server: CrossServer,
}

/// See [`TransactionSettings::cross_server`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum CrossServer {
    #[default]
    #[serde(rename = "2pc")]
    TwoPhase,
    #[serde(rename = "refuse")]
    Refuse,
}

impl TransactionSettings {
    /// Whether transactions may extend to a second server.
    pub fn two_phase(&self) -> bool {
        self.cross_server == CrossServer::TwoPhase
    }
}

/// TLS for clients: off unless a certificate and key are given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
    /// Refuse clients that do not ask for TLS.
    #[serde(default)]
    pub required: bool,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    #[serde(default = "default_method")]
    pub method: AuthMethod,
    #[serde(default)]
    pub users: Vec<UserEntry>,
    /// Delay before the error of a failed login, doubled for each further
    /// recent failure from the same address (like Postgres' `auth_delay`,
    /// growing); 0: none. Only the failing client waits.
    #[serde(default = "default_failure_delay_ms")]
    pub failure_delay_ms: u64,
    /// The most that delay grows to.
    #[serde(default = "default_failure_delay_max_ms")]
    pub failure_delay_max_ms: u64,
    /// Recent failed logins after which an address is refused (28000)
    /// before authenticating, until it has had no failure for
    /// `failure_window_s`; 0: never.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// A failed login stays recent until its address has had no other
    /// failure for this long.
    #[serde(default = "default_failure_window_s")]
    pub failure_window_s: u64,
    /// Most addresses with recent failures remembered (IPv6 counted per /64).
    #[serde(default = "default_tracked_addresses")]
    pub tracked_addresses: usize,
    /// Most clients each user may have at once, unless its `[[auth.users]]`
    /// entry says otherwise; unset: only `limits.max_clients` applies.
    #[serde(default)]
    pub max_clients_per_user: Option<usize>,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.users.iter().map(|u| u.name.as_str()).collect();
        f.debug_struct("AuthSettings")
            .field("method", &self.method)
            .field("users", &names)
            .field("failure_delay_ms", &self.failure_delay_ms)
            .field("failure_delay_max_ms", &self.failure_delay_max_ms)
            .field("max_failures", &self.max_failures)
            .field("failure_window_s", &self.failure_window_s)
            .field("tracked_addresses", &self.tracked_addresses)
            .field("max_clients_per_user", &self.max_clients_per_user)
            .finish()
    }
}

fn default_method() -> AuthMethod {
    AuthMethod::ScramSha256
}
fn default_failure_delay_ms() -> u64 {
    250
}
fn default_failure_delay_max_ms() -> u64 {
    5000
}
fn default_max_failures() -> u32 {
    20
}
fn default_failure_window_s() -> u64 {
    60
}
fn default_tracked_addresses() -> usize {
    10_000
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            method: default_method(),
            users: Vec::new(),
            failure_delay_ms: default_failure_delay_ms(),
            failure_delay_max_ms: default_failure_delay_max_ms(),
            max_failures: default_max_failures(),
            failure_window_s: default_failure_window_s(),
            tracked_addresses: default_tracked_addresses(),
            max_clients_per_user: None,
        }
    }
}

/// One client user: a clear password, or Postgres-style verifiers.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    /// `SCRAM-SHA-256$4096:...` as in `pg_authid`.
    #[serde(default)]
    pub scram_verifier: Option<String>,
    /// `md5...` as in `pg_authid`.
    #[serde(default)]
    pub md5_verifier: Option<String>,
    /// Most clients this user may have at once (Postgres' `CONNECTION
    /// LIMIT` of a role); unset: `auth.max_clients_per_user`.
    #[serde(default)]
    pub max_clients: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Most connections open to each server (and each replica) for the
    /// whole proxy, whatever the number of serving threads.
    #[serde(default = "default_pool_size")]
    pub size: usize,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_checkout_ms")]
    pub checkout_timeout_ms: u64,
    #[serde(default = "default_idle_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "default_lifetime_s")]
    pub max_lifetime_s: u64,
    /// An unnamed statement that clients have parsed this many times is kept
    /// prepared on the server connection (like JDBC's `prepareThreshold`):
    /// Postgres then skips parse and analysis, and after five executions may
    /// use a generic plan, as for any named statement. 0 turns it off.
    #[serde(default = "default_prepare_unnamed_after")]
    pub prepare_unnamed_after: u32,
    /// A simple Query the proxy can parameterize exactly (one SELECT, INSERT,
    /// UPDATE or DELETE whose literals are integers as comparison or
    /// arithmetic operands or VALUES items), sent this many times by
    /// clients, runs the same way: kept prepared, the integers sent as
    /// parameters of their own type. COMMIT and ROLLBACK inside a
    /// transaction run kept at once. 0 turns it all off.
    #[serde(default = "default_prepare_unnamed_after")]
    pub prepare_simple_after: u32,
    /// At most this many such statements are kept on one server connection.
    #[serde(default = "default_max_prepared_unnamed")]
    pub max_prepared_unnamed: usize,
    /// By server name (as in the map): the directory of the Unix-domain
    /// socket of that server's primary when it runs on this proxy's host
    /// (Postgres's `unix_socket_directories`; the socket is
    /// `<dir>/.s.PGSQL.<port>`, with the port from the map). The proxy then
    /// connects there instead of over TCP, and without TLS, as libpq does.
    /// Other proxies, the rebalancer and replication still use the map's
    /// address.
    #[serde(default)]
    pub socket_dirs: BTreeMap<String, PathBuf>,
}

fn default_pool_size() -> usize {
    20
}
fn default_connect_ms() -> u64 {
    5000
}
fn default_checkout_ms() -> u64 {
    10_000
}
fn default_idle_s() -> u64 {
    300
}
fn default_lifetime_s() -> u64 {
    3600
}
fn default_prepare_unnamed_after() -> u32 {
    5
}
fn default_max_prepared_unnamed() -> usize {
    100
}

impl Default for PoolSettings {
    fn default() -> PoolSettings {
        PoolSettings {
            size: default_pool_size(),
            connect_timeout_ms: default_connect_ms(),
            checkout_timeout_ms: default_checkout_ms(),
            idle_timeout_s: default_idle_s(),
            max_lifetime_s: default_lifetime_s(),
            prepare_unnamed_after: default_prepare_unnamed_after(),
            prepare_simple_after: default_prepare_unnamed_after(),
            max_prepared_unnamed: default_max_prepared_unnamed(),
            socket_dirs: BTreeMap::new(),
        }
    }
}

impl PoolSettings {
    /// The names in `socket_dirs` that are no server of `map`: most likely
    /// a typo, which would leave that server on TCP without a word.
    pub fn unknown_socket_servers<'a>(&'a self, map: &shardmap::ClusterMap) -> Vec<&'a str> {
        self.socket_dirs
            .keys()
            .filter(|name| !map.servers.contains_key(*name))
            .map(String::as_str)
            .collect()
    }

    /// The pools' settings; `gather_sends` is the top-level key (it covers
    /// client sockets too).
    fn to_pool_config(&self, gather_sends: bool) -> PoolConfig {
        PoolConfig {
            size: self.size.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            checkout_timeout: Duration::from_millis(self.checkout_timeout_ms),
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            max_lifetime: Duration::from_secs(self.max_lifetime_s),
            socket_dirs: Arc::new(self.socket_dirs.clone()),
            gather_sends,
        }
    }
}

impl Secrets for Credentials {
    fn password_for(&self, server: &str, _user: &str) -> Option<String> {
        self.password_for_server(server).map(String::from)
    }

    fn tls_for(&self, server: &str) -> Result<pgtls::Connector, String> {
        pgtls::Connector::new(&self.tls_for_server(server)?).map_err(|e| match server {
            "" => format!("[backend] TLS settings: {e}"),
            _ => format!("TLS settings for server {server}: {e}"),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest message a client may send (Postgres's own limit is 1 GiB).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Longest a statement for a blocked partition is held before it fails.
    #[serde(default = "default_blocked_wait_ms")]
    pub blocked_wait_ms: u64,
    /// Most client connections at once, for the whole proxy (every serving
    /// thread); per user: `auth.max_clients_per_user`.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
}

fn default_max_message() -> usize {
    crate::wire::frame::DEFAULT_MAX_MESSAGE
}
fn default_blocked_wait_ms() -> u64 {
    10_000
}
fn default_max_clients() -> usize {
    10_000
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: default_max_message(),
            blocked_wait_ms: default_blocked_wait_ms(),
            max_clients: default_max_clients(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            listen: default_listen(),
            cluster: settings::default_cluster(),
            etcd: EtcdSettings::default(),
            auth: AuthSettings::default(),
            pool: PoolSettings::default(),
            backend: Credentials::default(),
            limits: Limits::default(),
            scatter: ScatterSettings::default(),
            transactions: TransactionSettings::default(),
            tls: TlsSettings::default(),
            metrics_listen: None,
            region: None,
            residency: Default::default(),
            gather_sends: true,
        }
    }
}

impl ProxyConfig {
    /// The pools' settings: `[pool]`, and whether their connections gather
    /// their sends (a top-level key, since it covers client sockets too).
    pub fn pool_config(&self) -> PoolConfig {
        self.pool.to_pool_config(self.gather_sends)
    }

    pub fn from_toml(text: &str) -> Result<ProxyConfig, String> {
        settings::parse_toml(text)
    }

    pub fn read(path: &Path) -> Result<ProxyConfig, String> {
        settings::read_toml(path).map_err(|e| e.to_string())
    }

    /// The user table, with SCRAM secrets derived once from clear passwords.
    pub fn users(&self) -> Result<Users, String> {
        let mut users = Users::default();
        for entry in &self.auth.users {
            let mut user = match &entry.password {
                Some(password) => User::from_password(&entry.name, password),
                None => User {
                    scram: None,
                    md5: None,
                },
            };
            if let Some(verifier) = &entry.scram_verifier {
                user.scram = Some(ScramSecret::parse_verifier(verifier).ok_or_else(|| {
                    format!(
                        "user {:?}: scram_verifier is not a SCRAM-SHA-256 verifier",
                        entry.name
                    )
                })?);
            }
            if let Some(md5) = &entry.md5_verifier {
                if !md5.starts_with("md5") || md5.len() != 35 {
                    return Err(format!(
                        "user {:?}: md5_verifier must be 'md5' and 32 hex digits",
                        entry.name
                    ));
                }
                user.md5 = Some(md5.clone());
            }
            users.by_name.insert(entry.name.clone(), user);
        }
        users.mock_iterations = users.usual_iterations();
        let needs_secrets = self.auth.method != AuthMethod::Trust;
        if needs_secrets && users.by_name.is_empty() {
            return Err(format!(
                "auth method {:?} needs users: add [[auth.users]] entries, or set auth.method = \"trust\"",
                self.auth.method
            ));
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_gathered_unless_turned_off() {
        let unset = ProxyConfig::from_toml("").expect("parse");
        assert!(unset.gather_sends);
        assert!(unset.pool_config().gather_sends);
        assert!(ProxyConfig::default().gather_sends);
        let off = ProxyConfig::from_toml("gather_sends = false").expect("parse");
        assert!(!off.gather_sends);
        assert!(!off.pool_config().gather_sends);
    }

    #[test]
    fn socket_dirs_parse_and_names_the_map_lacks_are_found() {
        let config = ProxyConfig::from_toml(
            r#"
            [pool.socket_dirs]
            pg1 = "/var/run/postgresql"
            pg9 = "/tmp"
            "#,
        )
        .expect("parses");
        assert_eq!(
            config.pool_config().socket_dirs.get("pg1"),
            Some(&PathBuf::from("/var/run/postgresql"))
        );
        let server = |name: &str| {
            shardmap::Server::active(
                name,
                shardmap::Endpoint::parse("postgres://h:1/d").expect("url"),
            )
        };
        let map =
            shardmap::ClusterMap::new("t", 4, vec![server("pg1"), server("pg2")]).expect("map");
        assert_eq!(config.pool.unknown_socket_servers(&map), vec!["pg9"]);
    }

    #[test]
    fn full_config_parses_and_hides_secrets() {
        let config = ProxyConfig::from_toml(
            r#"
            listen = "127.0.0.1:7000"
            cluster = "prod"
            [etcd]
            endpoints = ["http://127.0.0.1:2379"]
            [auth]
            method = "md5"
            [[auth.users]]
            name = "app"
            password = "hunter2"
            [pool]
            size = 5
            [backend]
            password = "backend-secret"
            [backend.servers.pg1]
            password = "pg1-secret"
            [limits]
            max_message_bytes = 1048576
            "#,
        )
        .expect("parses");
        assert_eq!(config.pool.size, 5);
        assert_eq!(
            config.backend.password_for("pg1", "x").as_deref(),
            Some("pg1-secret")
        );
        assert_eq!(
            config.backend.password_for("pg2", "x").as_deref(),
            Some("backend-secret")
        );
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("secret\""),
            "{debug}"
        );
        assert!(config.users().expect("users").by_name.contains_key("app"));
    }

    #[test]
    fn login_limits_parse_with_defaults_a_dba_expects() {
        let defaults = ProxyConfig::from_toml("").expect("defaults");
        assert_eq!(
            (
                defaults.auth.failure_delay_ms,
                defaults.auth.max_failures,
                defaults.auth.max_clients_per_user
            ),
            (250, 20, None)
        );
        let config = ProxyConfig::from_toml(
            r#"
            [auth]
            failure_delay_ms = 0
            failure_delay_max_ms = 1000
            max_failures = 5
            failure_window_s = 300
            tracked_addresses = 100
            max_clients_per_user = 50
            [[auth.users]]
            name = "batch"
            password = "pw"
            max_clients = 2
            "#,
        )
        .expect("parses");
        assert_eq!(config.auth.max_failures, 5);
        assert_eq!(config.auth.failure_window_s, 300);
        assert_eq!(config.auth.max_clients_per_user, Some(50));
        assert_eq!(config.auth.users[0].max_clients, Some(2));
        let typo = ProxyConfig::from_toml("[auth]\nmax_failure = 3").expect_err("unknown key");
        assert!(typo.contains("max_failure"), "{typo}");
    }

    #[test]
    fn typos_and_missing_users_are_errors() {
        let typo = ProxyConfig::from_toml("listne = \"x\"").expect_err("unknown key");
        assert!(typo.contains("listne") && typo.contains("line 1"), "{typo}");
        let config = ProxyConfig::from_toml("").expect("defaults");
        assert!(config.users().is_err(), "scram without users is refused");
    }
}
