//! How shardline logs in to the Postgres servers of the map. The map in etcd
//! holds host, port, user and database only: passwords come from the machine
//! a binary runs on. For a server named `pg1` the password is the first of
//!
//! 1. the configured password of that server (`[backend.servers.pg1] password`
//!    or `password_file`),
//! 2. the configured password for all servers (`[backend] password` or
//!    `password_file`, or `--backend-password`),
//! 3. `SHARDLINE_BACKEND_PASSWORD`,
//! 4. `PGPASSWORD`,
//!
//! and none at all (trust authentication) when all four are unset.
//! The same tables hold the TLS keys (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`), layered the same way: see [`crate::backend_tls`].
//! Passwords are held as [`Password`], whose `Debug` never shows them, so a
//! config that holds one can be logged. A `password_file` holds the password
//! on its first line; [`Credentials::read_files`] reads them at startup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend_tls::{BackendTls, TlsKeys};

/// The variable shardline reads a backend password from.
pub const PASSWORD_VAR: &str = "SHARDLINE_BACKEND_PASSWORD";

/// libpq's own password variable, read after shardline's.
pub const PGPASSWORD_VAR: &str = "PGPASSWORD";

/// A secret, written in a config file as a plain string.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Password {
        Password(password.into())
    }

    /// The secret itself: only for handing to a Postgres or etcd connection.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first line of the file at `path`, without its line ending.
    pub fn from_file(path: &Path) -> Result<Password, SecretError> {
        let failed = |why: String| SecretError {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(failed("its first line is empty".into()));
        }
        Ok(Password(line.to_string()))
    }
}

/// A password file that cannot be used. Says which file and why, never
/// anything of what it holds.
#[derive(Debug, thiserror::Error)]
#[error("cannot use password file {}: {why}", path.display())]
pub struct SecretError {
    pub path: PathBuf,
    pub why: String,
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<set>")
    }
}

/// Passwords for the servers: one for all, and per server. As a TOML table:
/// `[backend] password = "..."` and `[backend.servers.NAME] password = "..."`.
/// Serialized (for the config `shardctl dev up` writes) without passwords.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// For every server without its own.
    #[serde(default, skip_serializing)]
    pub password: Option<Password>,
    /// TLS for every server, key by key unless a server sets its own.
    #[serde(flatten)]
    pub tls: TlsKeys,
    /// A file whose first line is the password for every server without
    /// its own (read at startup by [`Credentials::read_files`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// By server name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<String, ServerCredentials>,
    /// A TLS variable of the environment that cannot be used: reported by
    /// [`Credentials::tls_for_server`] (and so by every connection).
    #[serde(skip)]
    tls_env_error: Option<String>,
}

/// One server's own login.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCredentials {
    #[serde(default, skip_serializing)]
    pub password: Option<Password>,
    #[serde(flatten)]
    pub tls: TlsKeys,
    /// A file whose first line is this server's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl Credentials {
    /// One password (or none) for every server.
    pub fn with_password(password: Option<Password>) -> Credentials {
        Credentials {
            password,
            ..Credentials::default()
        }
    }

    /// Reads every `password_file` into its `password` (a configured
    /// password wins over a file beside it).
    pub fn read_files(mut self) -> Result<Credentials, SecretError> {
        let read = |password: &mut Option<Password>, file: &Option<PathBuf>| {
            if let (None, Some(path)) = (&password, file) {
                *password = Some(Password::from_file(path)?);
            }
            Ok(())
        };
        read(&mut self.password, &self.password_file)?;
        for server in self.servers.values_mut() {
            read(&mut server.password, &server.password_file)?;
        }
        Ok(self)
    }

    /// Whether nothing is configured (what a written config file leaves out).
    pub fn is_unset(&self) -> bool {
        self == &Credentials::default()
    }

    /// Only what the environment gives, for a program without a config file.
    pub fn from_env() -> Credentials {
        Credentials::default().or_from_env()
    }

    /// When no password for all servers is configured, takes it from
    /// `SHARDLINE_BACKEND_PASSWORD`, else `PGPASSWORD`.
    pub fn or_from_env(self) -> Credentials {
        self.or_from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`Credentials::or_from_env`], with `var` standing for the environment.
    pub fn or_from_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Credentials {
        if self.password.is_none() {
            self.password = var(PASSWORD_VAR)
                .or_else(|| var(PGPASSWORD_VAR))
                .map(Password);
        }
        match self.tls.or_from_vars(&var) {
            Ok(tls) => self.tls = tls,
            Err(e) => self.tls_env_error = Some(e),
        }
        self
    }

    /// The TLS settings for the server named `server`: its own keys, then
    /// `[backend]`'s, then the environment's (see [`crate::backend_tls`]).
    pub fn tls_for_server(&self, server: &str) -> Result<BackendTls, String> {
        if let Some(error) = &self.tls_env_error {
            return Err(error.clone());
        }
        let keys = match self.servers.get(server) {
            Some(own) => own.tls.over(&self.tls),
            None => self.tls.clone(),
        };
        keys.resolve().map_err(|e| match server {
            "" => format!("[backend] TLS settings: {e}"),
            _ => format!("TLS settings for server {server}: {e}"),
        })
    }

    /// Checks the TLS settings of every server named in the config (and
    /// those for all others), so a binary can refuse to start on a mistake.
    pub fn check_tls(&self) -> Result<(), String> {
        self.tls_for_server("")?;
        for server in self.servers.keys() {
            self.tls_for_server(server)?;
        }
        Ok(())
    }

    /// The password to log in to the server named `server`, if any.
    pub fn password_for_server(&self, server: &str) -> Option<&str> {
        self.servers
            .get(server)
            .and_then(|s| s.password.as_ref())
            .or(self.password.as_ref())
            .map(Password::expose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_vars as vars;

    #[test]
    fn configured_then_shardline_variable_then_pgpassword() {
        let both = [
            (PASSWORD_VAR, "from-shardline"),
            (PGPASSWORD_VAR, "from-pg"),
        ];
        let configured =
            Credentials::with_password(Some(Password::new("configured"))).or_from_vars(vars(&both));
        assert_eq!(configured.password_for_server("pg1"), Some("configured"));
        let from_env = Credentials::default().or_from_vars(vars(&both));
        assert_eq!(from_env.password_for_server("pg1"), Some("from-shardline"));
        let pg_only = Credentials::default().or_from_vars(vars(&[(PGPASSWORD_VAR, "from-pg")]));
        assert_eq!(pg_only.password_for_server("pg1"), Some("from-pg"));
        assert_eq!(
            Credentials::default()
                .or_from_vars(vars(&[]))
                .password_for_server("pg1"),
            None
        );
    }

    #[test]
    fn a_server_of_its_own_wins_and_nothing_is_printed() {
        let credentials: Credentials =
            crate::parse_toml("password = \"for-all\"\n[servers.pg1]\npassword = \"pg1-only\"\n")
                .expect("parses");
        let credentials = credentials.or_from_vars(vars(&[(PASSWORD_VAR, "from-env")]));
        assert_eq!(credentials.password_for_server("pg1"), Some("pg1-only"));
        assert_eq!(credentials.password_for_server("pg2"), Some("for-all"));
        let debug = format!("{credentials:?}");
        assert!(
            !debug.contains("for-all") && !debug.contains("pg1-only"),
            "{debug}"
        );
        assert!(debug.contains("pg1") && debug.contains("<set>"), "{debug}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = crate::parse_toml::<Credentials>("pasword = \"x\"\n").expect_err("typo");
        assert!(error.contains("pasword"), "{error}");
    }

    #[test]
    fn tls_keys_sit_beside_the_passwords_and_a_server_overrides_key_by_key() {
        let credentials: Credentials = crate::parse_toml(
            "sslmode = \"verify-full\"\nsslrootcert = \"/tls/ca.crt\"\n\
             [servers.pg2]\nsslmode = \"verify-ca\"\npassword = \"x\"\n",
        )
        .expect("parses");
        let credentials = credentials.or_from_vars(vars(&[("PGSSLMODE", "disable")]));
        let pg1 = credentials.tls_for_server("pg1").expect("valid");
        assert_eq!(pg1.mode, crate::SslMode::VerifyFull);
        let pg2 = credentials.tls_for_server("pg2").expect("valid");
        assert_eq!(pg2.mode, crate::SslMode::VerifyCa);
        assert_eq!(pg2.root_cert, Some("/tls/ca.crt".into()));
        let error = crate::parse_toml::<Credentials>("sslmod = \"require\"\n").expect_err("typo");
        assert!(error.contains("sslmod"), "{error}");
        let error = crate::parse_toml::<Credentials>("[servers.pg1]\nsslrootcrt = \"x\"\n")
            .expect_err("typo");
        assert!(error.contains("sslrootcrt"), "{error}");
        let error = crate::parse_toml::<Credentials>("sslmode = \"on\"\n").expect_err("bad mode");
        assert!(error.contains("verify-full"), "{error}");
    }

    #[test]
    fn a_bad_sslmode_variable_fails_every_server_and_passwords_are_never_written() {
        let credentials = Credentials::with_password(Some(Password::new("secret")))
            .or_from_vars(vars(&[("SHARDLINE_BACKEND_SSLMODE", "yes")]));
        let error = credentials.check_tls().expect_err("bad variable");
        assert!(error.contains("SHARDLINE_BACKEND_SSLMODE"), "{error}");
        let text = toml::to_string(&credentials).expect("encodes");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn password_files_are_read_at_startup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = dir.path().join("all");
        std::fs::write(&all, "for-all\r\n").expect("write");
        let text = format!(
            "password_file = {all:?}\n[servers.pg2]\npassword_file = {:?}\n",
            dir.path().join("nope")
        );
        let credentials: Credentials = crate::parse_toml(&text).expect("parses");
        let error = credentials.clone().read_files().expect_err("missing file");
        assert!(error.to_string().contains("nope"), "{error}");
        let mut credentials = credentials;
        credentials.servers.clear();
        let credentials = credentials.read_files().expect("reads");
        assert_eq!(credentials.password_for_server("pg1"), Some("for-all"));
        std::fs::write(&all, "\n").expect("write");
        let error = Password::from_file(&all).expect_err("empty");
        assert!(error.to_string().contains("empty"), "{error}");
    }
}
