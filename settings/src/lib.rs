//! settings: what the proxy, the rebalancer and shardctl all need to know
//! before they start, read the same way by each.
//!
//! - [`etcd`]: where etcd is, how to log in to it (TLS, user and password)
//!   and which cluster's map to use, laid in layers: the config file, then
//!   `SHARDLINE_ETCD*` / `SHARDLINE_CLUSTER`, then flags.
//! - [`file`]: reading a TOML config file; unknown keys are errors that name
//!   the key and its line.
//! - [`credentials`]: the password for logging in to the Postgres servers:
//!   configured (inline or as a `password_file`), else
//!   `SHARDLINE_BACKEND_PASSWORD`, else `PGPASSWORD`.
//! - [`backend_tls`]: TLS to the Postgres servers (`sslmode` and the
//!   certificate files), in the same tables and layers as the passwords.
//!
//! Each binary keeps its own settings (the proxy's users and pools, the
//! rebalancer's move limits) in its own config type, and uses these parts
//! for what they share. Nothing here is ever read from etcd.

pub mod backend_tls;
pub mod credentials;
pub mod etcd;
pub mod file;

pub use backend_tls::{BackendTls, SslMode, TlsKeys};
pub use credentials::{Credentials, Password, SecretError, ServerCredentials};
pub use etcd::{default_cluster, EtcdSettings, Overrides, SharedFile, DEFAULT_CLUSTER, LOCAL_ETCD};
pub use file::{parse_toml, read_toml, FileError};
