//! TLS from shardline to the Postgres servers, as libpq means its `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey`. The keys sit beside the passwords
//! (see [`crate::credentials`]): in `[backend]` for every server and in
//! `[backend.servers.NAME]` for one. Each key of a server is the first of
//!
//! 1. that server's own key,
//! 2. the key in `[backend]`,
//! 3. `SHARDLINE_BACKEND_SSLMODE` / `_SSLROOTCERT` / `_SSLCERT` / `_SSLKEY`,
//! 4. libpq's `PGSSLMODE` / `PGSSLROOTCERT` / `PGSSLCERT` / `PGSSLKEY`,
//!
//! and `sslmode` defaults to `prefer`, as in libpq: a server that accepts
//! TLS gets it, one that does not is still reached in clear, so upgrading
//! shardline changes nothing on a cluster without TLS. Set `verify-full` to
//! be protected against an active attacker.
//!
//! Only paths live here; the `pgtls` crate reads the files and speaks TLS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How much TLS a connection to a server needs (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Clear text only.
    Disable,
    /// TLS when the server accepts it, else clear text.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked unless
    /// `sslrootcert` is set (then as `verify-ca`, like libpq).
    Require,
    /// TLS, with the server's certificate chain checked against `sslrootcert`;
    /// its host name is not.
    VerifyCa,
    /// TLS, chain checked, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static str = "disable, prefer, require, verify-ca or verify-full";

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server that refuses TLS must not be used.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(text: &str) -> Result<SslMode, String> {
        Ok(match text.trim() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not known: use {}",
                    SslMode::NAMES
                ))
            }
        })
    }
}

/// The TLS keys of `[backend]` or of one `[backend.servers.NAME]`, each
/// unset unless given.
/// Unknown keys are refused by the tables it is flattened into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsKeys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<SslMode>,
    /// PEM file of the CA(s) the servers' certificates must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// PEM client certificate (chain) shown to the servers, with its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
}

/// Environment variables, shardline's first, each with libpq's after it.
pub const SSLMODE_VARS: [&str; 2] = ["SHARDLINE_BACKEND_SSLMODE", "PGSSLMODE"];
pub const SSLROOTCERT_VARS: [&str; 2] = ["SHARDLINE_BACKEND_SSLROOTCERT", "PGSSLROOTCERT"];
pub const SSLCERT_VARS: [&str; 2] = ["SHARDLINE_BACKEND_SSLCERT", "PGSSLCERT"];
pub const SSLKEY_VARS: [&str; 2] = ["SHARDLINE_BACKEND_SSLKEY", "PGSSLKEY"];

impl TlsKeys {
    pub fn is_empty(&self) -> bool {
        self == &TlsKeys::default()
    }

    /// `self`, with what it leaves unset taken from `under`.
    pub fn over(&self, under: &TlsKeys) -> TlsKeys {
        TlsKeys {
            sslmode: self.sslmode.or(under.sslmode),
            sslrootcert: self.sslrootcert.clone().or(under.sslrootcert.clone()),
            sslcert: self.sslcert.clone().or(under.sslcert.clone()),
            sslkey: self.sslkey.clone().or(under.sslkey.clone()),
        }
    }

    /// Fills what is unset from the variables (see the module doc). An
    /// sslmode variable that names no mode is an error naming it.
    pub fn or_from_vars(&self, var: &impl Fn(&str) -> Option<String>) -> Result<TlsKeys, String> {
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|name| {
                var(name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (name, v))
            })
        };
        let path = |names| first(names).map(|(_, v)| PathBuf::from(v));
        let sslmode = match first(SSLMODE_VARS) {
            Some((name, value)) => Some(value.parse().map_err(|e| format!("{name}: {e}"))?),
            None => None,
        };
        let env = TlsKeys {
            sslmode,
            sslrootcert: path(SSLROOTCERT_VARS),
            sslcert: path(SSLCERT_VARS),
            sslkey: path(SSLKEY_VARS),
        };
        Ok(self.over(&env))
    }

    /// The settings one server is reached with.
    pub fn resolve(&self) -> Result<BackendTls, String> {
        let tls = BackendTls {
            mode: self.sslmode.unwrap_or_default(),
            root_cert: self.sslrootcert.clone(),
            cert: self.sslcert.clone(),
            key: self.sslkey.clone(),
        };
        match (&tls.cert, &tls.key) {
            (Some(_), None) => return Err("sslcert is set but sslkey is not: give both".into()),
            (None, Some(_)) => return Err("sslkey is set but sslcert is not: give both".into()),
            _ => {}
        }
        if tls.root_cert.is_none() && matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(format!(
                "sslmode {} needs sslrootcert (the CA file the servers' certificates chain to)",
                tls.mode
            ));
        }
        Ok(tls)
    }
}

/// The TLS settings one server is reached with, resolved and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BackendTls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl BackendTls {
    /// Clear text, for tests and tools that never use TLS.
    pub fn disabled() -> BackendTls {
        BackendTls {
            mode: SslMode::Disable,
            ..BackendTls::default()
        }
    }

    /// These settings as libpq conninfo keywords (` sslmode=... sslrootcert=...`),
    /// for a connection another server opens (a subscription). The paths are
    /// read on *that* server's machine, by the user Postgres runs as.
    pub fn conninfo_keywords(&self, quote: impl Fn(&str) -> String) -> String {
        let mut out = format!(" sslmode={}", self.mode);
        for (key, path) in [
            ("sslrootcert", &self.root_cert),
            ("sslcert", &self.cert),
            ("sslkey", &self.key),
        ] {
            if let Some(path) = path {
                out.push_str(&format!(" {key}={}", quote(&path.to_string_lossy())));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_vars as vars;

    #[test]
    fn modes_parse_as_libpq_spells_them() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.as_str().parse::<SslMode>(), Ok(mode));
        }
        let error = "verify_full".parse::<SslMode>().expect_err("unknown");
        assert!(error.contains("verify-full"), "{error}");
        assert_eq!(SslMode::default(), SslMode::Prefer);
    }

    #[test]
    fn configured_then_shardline_variables_then_libpq_ones() {
        let configured = TlsKeys {
            sslmode: Some(SslMode::VerifyCa),
            ..TlsKeys::default()
        };
        let env = [
            ("SHARDLINE_BACKEND_SSLMODE", "require"),
            ("PGSSLMODE", "disable"),
            ("PGSSLROOTCERT", "/pg/root.crt"),
        ];
        let keys = configured.or_from_vars(&vars(&env)).expect("valid");
        assert_eq!(keys.sslmode, Some(SslMode::VerifyCa));
        assert_eq!(keys.sslrootcert, Some(PathBuf::from("/pg/root.crt")));
        let keys = TlsKeys::default().or_from_vars(&vars(&env)).expect("valid");
        assert_eq!(keys.sslmode, Some(SslMode::Require));
        let keys = TlsKeys::default()
            .or_from_vars(&vars(&[("PGSSLMODE", "disable")]))
            .expect("valid");
        assert_eq!(keys.sslmode, Some(SslMode::Disable));
        let error = TlsKeys::default()
            .or_from_vars(&vars(&[("SHARDLINE_BACKEND_SSLMODE", "on")]))
            .expect_err("not a mode");
        assert!(error.contains("SHARDLINE_BACKEND_SSLMODE"), "{error}");
    }

    #[test]
    fn resolving_refuses_half_settings() {
        let verify = TlsKeys {
            sslmode: Some(SslMode::VerifyFull),
            ..TlsKeys::default()
        };
        assert!(verify
            .resolve()
            .expect_err("no root")
            .contains("sslrootcert"));
        let half = TlsKeys {
            sslcert: Some("c.crt".into()),
            ..TlsKeys::default()
        };
        assert!(half.resolve().expect_err("no key").contains("sslkey"));
        assert_eq!(TlsKeys::default().resolve(), Ok(BackendTls::default()));
    }

    #[test]
    fn conninfo_keywords_carry_every_setting() {
        let tls = BackendTls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/tls/ca.crt".into()),
            cert: Some("/tls/client.crt".into()),
            key: Some("/tls/client.key".into()),
        };
        assert_eq!(
            tls.conninfo_keywords(|v| format!("'{v}'")),
            " sslmode=verify-full sslrootcert='/tls/ca.crt' sslcert='/tls/client.crt' sslkey='/tls/client.key'"
        );
    }
}
