//! Where shardctl finds etcd and which cluster it manages. The layers are
//! the shared ones (see `settings::etcd`): a TOML file, then
//! `SHARDLINE_ETCD` / `SHARDLINE_CLUSTER`, then `--etcd` / `--cluster`. The
//! file is `--config` / `SHARDLINE_CONFIG`; without one, and with no
//! endpoints from the environment or flags, it is the default dev cluster's
//! file if `shardctl dev up` started one. The file's `[backend]` table
//! (passwords, TLS to the servers) is laid under the environment's
//! `SHARDLINE_BACKEND_*` / `PG*` variables as in the other binaries.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use settings::{Overrides, SharedFile};

/// Where the default dev cluster lives.
pub fn default_dev_dir() -> PathBuf {
    std::env::temp_dir().join("shardline-dev")
}

/// The settings a command runs with (`Debug` shows no password).
#[derive(Debug, Clone)]
pub struct Settings {
    pub etcd: settings::EtcdSettings,
    pub cluster: String,
    /// How to log in to the servers and secure the connections.
    pub backend: settings::Credentials,
}

/// Resolves settings: the file (`config`, else the dev cluster's), with
/// `overrides` (environment, then flags) over it.
pub fn resolve(overrides: &Overrides, config: Option<&Path>) -> Result<Settings> {
    let file: SharedFile = match config {
        Some(path) => settings::read_toml(path)?,
        None => {
            let dev_config = default_dev_dir().join("shardline.toml");
            if !overrides.gives_endpoints() && dev_config.is_file() {
                settings::read_toml(&dev_config)?
            } else {
                SharedFile::default()
            }
        }
    };
    let mut etcd = file.etcd;
    let mut cluster = file.cluster.unwrap_or_else(settings::default_cluster);
    overrides.apply(&mut etcd, &mut cluster);
    if etcd.endpoints.is_empty() {
        bail!(
            "no etcd endpoints configured: pass --etcd http://HOST:PORT, set SHARDLINE_ETCD, \
             give --config FILE, or start a local cluster with `shardctl dev up`"
        );
    }
    // TLS settings are checked by the commands that connect to servers
    // (`Context::credentials`), so a map command works whatever they say.
    let backend = file
        .backend
        .read_files()
        .map_err(|e| anyhow::anyhow!("{e}: fix [backend] in the config file"))?
        .or_from_env();
    Ok(Settings {
        etcd,
        cluster,
        backend,
    })
}

/// Writes the file `shardctl dev up` leaves for its cluster.
pub fn write(file: &SharedFile, path: &Path) -> Result<()> {
    let text = toml::to_string(file).context("cannot encode config")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
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
        let from_file = resolve(&Overrides::default(), Some(&path)).expect("resolves");
        assert_eq!(from_file.cluster, "prod");
        assert_eq!(
            from_file.etcd.endpoints,
            vec!["http://10.0.0.1:2379".to_string()]
        );
        let flags = Overrides::given(&["http://127.0.0.1:1".into()], Some("x"));
        let flags = resolve(&flags, Some(&path)).expect("resolves");
        assert_eq!(flags.cluster, "x");
        assert_eq!(flags.etcd.endpoints, vec!["http://127.0.0.1:1".to_string()]);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "clustr = \"prod\"\n").expect("write");
        let err = resolve(&Overrides::default(), Some(&path)).expect_err("typo refused");
        assert!(format!("{err:#}").contains("clustr"), "{err:#}");
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shardline.toml");
        let file = SharedFile {
            cluster: Some("dev".into()),
            etcd: settings::EtcdSettings::at(vec!["http://127.0.0.1:2379".into()]),
            backend: settings::Credentials::default(),
        };
        write(&file, &path).expect("writes");
        let settings = resolve(&Overrides::default(), Some(&path)).expect("resolves");
        assert_eq!(settings.cluster, "dev");
    }
}
