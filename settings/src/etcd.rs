//! Which etcd to talk to, how to log in to it, and which cluster's map to
//! use: the settings every shardline binary shares. They come in layers,
//! each replacing only what it sets:
//!
//! 1. the config file: `cluster = "..."` and the `[etcd]` table (`endpoints`,
//!    TLS files, user and password);
//! 2. the environment: `SHARDLINE_ETCD` (comma-separated), `SHARDLINE_CLUSTER`
//!    and the `SHARDLINE_ETCD_*` variables of [`EtcdSettings`]'s fields;
//! 3. the command line: `--etcd` and `--cluster`.
//!
//! A binary reads its file, then lays [`Overrides::env_then_flags`] over it.
//! What is still unset after that is the binary's call (a default, or an
//! error that says where to set it).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::credentials::{Password, SecretError};

/// The cluster name when none is configured.
pub const DEFAULT_CLUSTER: &str = "default";

/// etcd on this machine, for the daemons' defaults.
pub const LOCAL_ETCD: &str = "http://127.0.0.1:2379";

/// Environment variable with etcd endpoints, comma-separated.
pub const ETCD_VAR: &str = "SHARDLINE_ETCD";

/// Environment variable with the cluster name.
pub const CLUSTER_VAR: &str = "SHARDLINE_CLUSTER";

/// Environment variables over `[etcd] ca_file`, `cert_file`, `key_file`,
/// `user`, `password` and `password_file`.
pub const CA_FILE_VAR: &str = "SHARDLINE_ETCD_CA_FILE";
pub const CERT_FILE_VAR: &str = "SHARDLINE_ETCD_CERT_FILE";
pub const KEY_FILE_VAR: &str = "SHARDLINE_ETCD_KEY_FILE";
pub const USER_VAR: &str = "SHARDLINE_ETCD_USER";
pub const PASSWORD_VAR: &str = "SHARDLINE_ETCD_PASSWORD";
pub const PASSWORD_FILE_VAR: &str = "SHARDLINE_ETCD_PASSWORD_FILE";

/// [`DEFAULT_CLUSTER`] as a `String`, for `#[serde(default = ...)]`.
pub fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_string()
}

/// The `[etcd]` table of a config file. `https://` endpoints mean TLS; the
/// password is never serialized (a written file names a `password_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// e.g. `["https://10.0.0.1:2379", "https://10.0.0.2:2379"]`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// PEM certificate(s) of the CA that signed etcd's server certificates;
    /// without it, `https://` endpoints are checked against the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for etcd's `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// etcd user, when etcd has `auth enable`d; with `password` or `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing)]
    pub password: Option<Password>,
    /// A file whose first line is the password (better than `password`:
    /// the config file can then be shared and shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl EtcdSettings {
    /// Settings with these endpoints and nothing else.
    pub fn at(endpoints: Vec<String>) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            ..EtcdSettings::default()
        }
    }

    /// Whether etcd is reached over TLS: `https://` endpoints, or TLS files given.
    pub fn uses_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
            || self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
    }

    /// The etcd password: `password`, else the first line of `password_file`.
    /// An error names the file, never its content.
    pub fn password(&self) -> Result<Option<Password>, SecretError> {
        match (&self.password, &self.password_file) {
            (Some(password), _) => Ok(Some(password.clone())),
            (None, Some(path)) => Password::from_file(path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// `self` with what `over` sets laid on top. A password or a password
    /// file replaces both of the layer below.
    fn overlay(&mut self, over: &EtcdSettings) {
        if !over.endpoints.is_empty() {
            self.endpoints = over.endpoints.clone();
        }
        let replace = |below: &mut Option<PathBuf>, above: &Option<PathBuf>| {
            if above.is_some() {
                below.clone_from(above);
            }
        };
        replace(&mut self.ca_file, &over.ca_file);
        replace(&mut self.cert_file, &over.cert_file);
        replace(&mut self.key_file, &over.key_file);
        if over.user.is_some() {
            self.user.clone_from(&over.user);
        }
        if over.password.is_some() || over.password_file.is_some() {
            self.password.clone_from(&over.password);
            self.password_file.clone_from(&over.password_file);
        }
    }
}

/// A config file with only the shared settings: shardctl's file, and what
/// `shardctl dev up` writes for the cluster it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default)]
    pub etcd: EtcdSettings,
    /// `[backend]`: passwords (never written back) and TLS to the servers.
    #[serde(default, skip_serializing_if = "crate::Credentials::is_unset")]
    pub backend: crate::Credentials,
}

/// etcd settings and a cluster name given on top of a config file, by the
/// environment or by flags. Empty values count as not given, so an empty
/// `SHARDLINE_ETCD=` does not wipe the file's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    etcd: EtcdSettings,
    cluster: Option<String>,
}

impl Overrides {
    /// Values from flags (or any other source): endpoints trimmed, empty
    /// ones dropped.
    pub fn given(endpoints: &[String], cluster: Option<&str>) -> Overrides {
        Overrides {
            etcd: EtcdSettings::at(
                endpoints
                    .iter()
                    .flat_map(|e| e.split(','))
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            cluster: cluster
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from),
        }
    }

    /// `SHARDLINE_ETCD`, `SHARDLINE_CLUSTER` and the `SHARDLINE_ETCD_*` variables.
    pub fn from_env() -> Overrides {
        Overrides::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`Overrides::from_env`], with `var` standing for the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Overrides {
        let endpoints: Vec<String> = var(ETCD_VAR).into_iter().collect();
        let mut overrides = Overrides::given(&endpoints, var(CLUSTER_VAR).as_deref());
        // A password is taken as given (spaces may be part of it); the rest trimmed.
        let set = |name| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let path = |name| set(name).map(PathBuf::from);
        let etcd = &mut overrides.etcd;
        etcd.ca_file = path(CA_FILE_VAR);
        etcd.cert_file = path(CERT_FILE_VAR);
        etcd.key_file = path(KEY_FILE_VAR);
        etcd.user = set(USER_VAR);
        etcd.password = var(PASSWORD_VAR)
            .filter(|p| !p.is_empty())
            .map(Password::new);
        etcd.password_file = path(PASSWORD_FILE_VAR);
        overrides
    }

    /// The environment with the flags over it: the layers above the file,
    /// as every binary uses them.
    pub fn env_then_flags(flag_endpoints: &[String], flag_cluster: Option<&str>) -> Overrides {
        Overrides::from_env().then(Overrides::given(flag_endpoints, flag_cluster))
    }

    /// `self` with `over` laid on top: what `over` gives wins.
    pub fn then(mut self, over: Overrides) -> Overrides {
        self.etcd.overlay(&over.etcd);
        Overrides {
            etcd: self.etcd,
            cluster: over.cluster.or(self.cluster),
        }
    }

    /// Whether these layers name etcd endpoints (then no file is needed for them).
    pub fn gives_endpoints(&self) -> bool {
        !self.etcd.endpoints.is_empty()
    }

    /// The cluster these layers name, if any.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// Replaces the file's values with the ones given here.
    pub fn apply(&self, etcd: &mut EtcdSettings, cluster: &mut String) {
        etcd.overlay(&self.etcd);
        if let Some(given) = &self.cluster {
            *cluster = given.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> (EtcdSettings, String) {
        (
            EtcdSettings::at(vec!["http://file:2379".into()]),
            "from-file".into(),
        )
    }

    fn env(etcd: Option<&str>, cluster: Option<&str>) -> Overrides {
        Overrides::from_vars(|name| match name {
            ETCD_VAR => etcd.map(String::from),
            CLUSTER_VAR => cluster.map(String::from),
            _ => None,
        })
    }

    #[test]
    fn env_replaces_the_file_and_flags_replace_the_env() {
        let (mut etcd, mut cluster) = file();
        let layers = env(Some("http://a:1, http://b:2"), Some("from-env"))
            .then(Overrides::given(&[], Some("from-flag")));
        layers.apply(&mut etcd, &mut cluster);
        assert_eq!(etcd.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(cluster, "from-flag");

        let (mut etcd, mut cluster) = file();
        env(Some("http://a:1"), None)
            .then(Overrides::given(&["http://c:3".into()], None))
            .apply(&mut etcd, &mut cluster);
        assert_eq!(
            (etcd.endpoints, cluster),
            (vec!["http://c:3".into()], "from-file".into())
        );
    }

    #[test]
    fn empty_values_leave_the_layer_below() {
        let (mut etcd, mut cluster) = file();
        let layers = env(Some(" , "), Some("")).then(Overrides::given(&["".into()], Some(" ")));
        assert!(!layers.gives_endpoints());
        assert_eq!(layers.cluster(), None);
        layers.apply(&mut etcd, &mut cluster);
        assert_eq!((etcd, cluster), file());
    }

    #[test]
    fn the_shared_file_round_trips_and_refuses_typos() {
        let file = SharedFile {
            cluster: Some("dev".into()),
            etcd: EtcdSettings {
                endpoints: vec!["https://127.0.0.1:2379".into()],
                ca_file: Some("/d/tls/ca.crt".into()),
                user: Some("shardline".into()),
                password_file: Some("/d/etcd.password".into()),
                ..EtcdSettings::default()
            },
            backend: crate::Credentials::default(),
        };
        let text = toml::to_string(&file).expect("encodes");
        assert_eq!(crate::parse_toml::<SharedFile>(&text), Ok(file));
        let error = crate::parse_toml::<SharedFile>("[etcd]\nendpoint = []\n").expect_err("typo");
        assert!(
            error.contains("endpoint") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn tls_and_login_come_in_layers_and_a_password_replaces_a_password_file() {
        let mut etcd: EtcdSettings = crate::parse_toml(
            "endpoints = [\"https://e:2379\"]\nca_file = \"/f/ca.crt\"\nuser = \"u\"\n\
             password_file = \"/f/pw\"\n",
        )
        .expect("parses");
        assert!(etcd.uses_tls());
        let mut cluster = String::from("c");
        Overrides::from_vars(|name| match name {
            CERT_FILE_VAR => Some("/env/client.crt".into()),
            KEY_FILE_VAR => Some("/env/client.key".into()),
            PASSWORD_VAR => Some(" from env ".into()),
            USER_VAR => Some("".into()),
            _ => None,
        })
        .apply(&mut etcd, &mut cluster);
        assert_eq!(etcd.ca_file, Some("/f/ca.crt".into()));
        assert_eq!(etcd.cert_file, Some("/env/client.crt".into()));
        assert_eq!(etcd.user.as_deref(), Some("u"));
        assert_eq!(
            etcd.password_file, None,
            "the env's password replaces the file's"
        );
        let password = etcd.password().expect("inline").expect("set");
        assert_eq!(password.expose(), " from env ");
        let text = toml::to_string(&SharedFile {
            cluster: None,
            etcd: etcd.clone(),
            backend: Default::default(),
        })
        .expect("encodes");
        assert!(!text.contains("from env"), "{text}");
        assert!(!format!("{etcd:?}").contains("from env"));
    }

    #[test]
    fn a_password_file_is_read_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\nignored\n").expect("write");
        let mut etcd = EtcdSettings::at(vec!["http://e:1".into()]);
        etcd.password_file = Some(path.clone());
        assert!(!etcd.uses_tls());
        let password = etcd.password().expect("reads").expect("set");
        assert_eq!(password.expose(), "s3cret");
        etcd.password_file = Some(dir.path().join("missing"));
        let error = etcd.password().expect_err("missing").to_string();
        assert!(
            error.contains("missing") && error.contains("password"),
            "{error}"
        );
    }
}
