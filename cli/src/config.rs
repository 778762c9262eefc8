//! Where shardctl finds etcd and which cluster it manages: command-line flags,
//! then environment variables (`SHARDLINE_ETCD`, `SHARDLINE_CLUSTER`, handled
//! by clap), then a TOML file (`--config` / `SHARDLINE_CONFIG`), then the
//! default dev cluster's own config if `shardctl dev up` started one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Cluster name used when none is configured.
pub const DEFAULT_CLUSTER: &str = "default";

/// The TOML config file.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub etcd: EtcdConfig,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {} is not valid", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).context("cannot encode config")?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Where the default dev cluster lives.
pub fn default_dev_dir() -> PathBuf {
    std::env::temp_dir().join("shardline-dev")
}

/// The settings a command runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub cluster: String,
}

/// Resolves settings from flags/env (`flag_*`) and the config files.
pub fn resolve(
    flag_endpoints: &[String],
    flag_cluster: Option<&str>,
    config: Option<&Path>,
) -> Result<Settings> {
    let file = match config {
        Some(path) => FileConfig::read(path)?,
        None => {
            let dev_config = default_dev_dir().join("shardline.toml");
            if flag_endpoints.is_empty() && dev_config.is_file() {
                FileConfig::read(&dev_config)?
            } else {
                FileConfig::default()
            }
        }
    };
    let endpoints: Vec<String> = if flag_endpoints.is_empty() {
        file.etcd.endpoints.clone()
    } else {
        flag_endpoints.to_vec()
    };
    if endpoints.is_empty() {
        bail!(
            "no etcd endpoints configured: pass --etcd http://HOST:PORT, set SHARDLINE_ETCD, \
             give --config FILE, or start a local cluster with `shardctl dev up`"
        );
    }
    let cluster = flag_cluster
        .map(str::to_string)
        .or(file.cluster)
        .unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
    Ok(Settings { endpoints, cluster })
}

/// Who is making a change, for the history: `user@host`.
pub fn default_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(|| {
            let output = std::process::Command::new("id").arg("-un").output().ok()?;
            let name = String::from_utf8(output.stdout).ok()?;
            Some(name.trim().to_string()).filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "cluster = \"prod\"\n[etcd]\nendpoints = [\"http://10.0.0.1:2379\"]\n",
        )
        .expect("write");
        let from_file = resolve(&[], None, Some(&path)).expect("resolves");
        assert_eq!(from_file.cluster, "prod");
        assert_eq!(
            from_file.endpoints,
            vec!["http://10.0.0.1:2379".to_string()]
        );
        let flags =
            resolve(&["http://127.0.0.1:1".into()], Some("x"), Some(&path)).expect("resolves");
        assert_eq!(flags.cluster, "x");
        assert_eq!(flags.endpoints, vec!["http://127.0.0.1:1".to_string()]);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "clustr = \"prod\"\n").expect("write");
        let err = resolve(&[], None, Some(&path)).expect_err("typo refused");
        assert!(format!("{err:#}").contains("clustr"), "{err:#}");
    }
}
