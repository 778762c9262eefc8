//! Which etcd to talk to and which cluster's map to use: the settings every
//! shardline binary shares. They come in layers, each replacing only what it
//! sets:
//!
//! 1. the config file: `cluster = "..."` and `[etcd] endpoints = [...]`;
//! 2. the environment: `SHARDLINE_ETCD` (comma-separated) and `SHARDLINE_CLUSTER`;
//! 3. the command line: `--etcd` and `--cluster`.
//!
//! A binary reads its file, then lays [`Overrides::env_then_flags`] over it.
//! What is still unset after that is the binary's call (a default, or an
//! error that says where to set it).

use serde::{Deserialize, Serialize};

/// The cluster name when none is configured.
pub const DEFAULT_CLUSTER: &str = "default";

/// etcd on this machine, for the daemons' defaults.
pub const LOCAL_ETCD: &str = "http://127.0.0.1:2379";

/// Environment variable with etcd endpoints, comma-separated.
pub const ETCD_VAR: &str = "SHARDLINE_ETCD";

/// Environment variable with the cluster name.
pub const CLUSTER_VAR: &str = "SHARDLINE_CLUSTER";

/// [`DEFAULT_CLUSTER`] as a `String`, for `#[serde(default = ...)]`.
pub fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_string()
}

/// The `[etcd]` table of a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// e.g. `["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`.
    #[serde(default)]
    pub endpoints: Vec<String>,
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

/// etcd endpoints and a cluster name given on top of a config file, by the
/// environment or by flags. Empty values count as not given, so an empty
/// `SHARDLINE_ETCD=` does not wipe the file's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    endpoints: Vec<String>,
    cluster: Option<String>,
}

impl Overrides {
    /// Values from flags (or any other source): endpoints trimmed, empty
    /// ones dropped.
    pub fn given(endpoints: &[String], cluster: Option<&str>) -> Overrides {
        Overrides {
            endpoints: endpoints
                .iter()
                .flat_map(|e| e.split(','))
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            cluster: cluster
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from),
        }
    }

    /// `SHARDLINE_ETCD` and `SHARDLINE_CLUSTER`.
    pub fn from_env() -> Overrides {
        Overrides::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`Overrides::from_env`], with `var` standing for the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Overrides {
        let endpoints: Vec<String> = var(ETCD_VAR).into_iter().collect();
        Overrides::given(&endpoints, var(CLUSTER_VAR).as_deref())
    }

    /// The environment with the flags over it: the layers above the file,
    /// as every binary uses them.
    pub fn env_then_flags(flag_endpoints: &[String], flag_cluster: Option<&str>) -> Overrides {
        Overrides::from_env().then(Overrides::given(flag_endpoints, flag_cluster))
    }

    /// `self` with `over` laid on top: what `over` gives wins.
    pub fn then(self, over: Overrides) -> Overrides {
        Overrides {
            endpoints: if over.endpoints.is_empty() {
                self.endpoints
            } else {
                over.endpoints
            },
            cluster: over.cluster.or(self.cluster),
        }
    }

    /// Whether these layers name etcd endpoints (then no file is needed for them).
    pub fn gives_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The cluster these layers name, if any.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// Replaces the file's values with the ones given here.
    pub fn apply(&self, etcd: &mut EtcdSettings, cluster: &mut String) {
        if self.gives_endpoints() {
            etcd.endpoints = self.endpoints.clone();
        }
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
            EtcdSettings {
                endpoints: vec!["http://file:2379".into()],
            },
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
                endpoints: vec!["http://127.0.0.1:2379".into()],
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
}
