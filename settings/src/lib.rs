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

/// An error with its causes on one line, each cause once (transport errors
/// often repeat their source in their own text): how every shardline
/// program reports an error from a library to a person.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A stand-in for the environment in tests: the variables `set` names.
#[cfg(test)]
pub(crate) fn test_vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        set.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }
}
