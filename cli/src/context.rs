//! What every shardctl command is given: where etcd is and which cluster
//! (resolved from the layers in [`crate::config`]), how to log in to the
//! servers, how to print, and who is acting.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use settings::{Credentials, Overrides};
use shardmap::{Change, ClusterMap, JobStore, MapStore};

use crate::config::{self, Settings};
use crate::output::print_json;
use crate::Cli;

pub struct Context {
    /// `--config` / `SHARDLINE_CONFIG`.
    config: Option<PathBuf>,
    /// The environment and flags over the config file's etcd and cluster.
    overrides: Overrides,
    pub json: bool,
    /// Recorded in the history as making each change.
    pub actor: String,
}

impl Context {
    pub fn new(cli: &Cli) -> Context {
        Context {
            config: cli.config.clone(),
            overrides: Overrides::env_then_flags(&cli.etcd, cli.cluster.as_deref()),
            json: cli.json,
            actor: cli.actor.clone().unwrap_or_else(config::default_actor),
        }
    }

    pub fn settings(&self) -> Result<Settings> {
        config::resolve(&self.overrides, self.config.as_deref())
    }

    /// How to log in to the servers and secure the connections: the config
    /// file's `[backend]`, then the environment (etcd never holds them).
    /// Checked only by the commands that connect to servers.
    pub fn credentials(&self) -> Result<Credentials> {
        let backend = self.settings()?.backend;
        pgtls::check(&backend).map_err(|e| {
            anyhow::anyhow!(
                "{e}: fix [backend] in the config file or the SHARDLINE_BACKEND_SSL* variables"
            )
        })?;
        Ok(backend)
    }

    /// The cluster named by the environment or `--cluster`, before any
    /// config file exists (for `dev up`, which writes that file).
    pub fn cluster_name(&self) -> String {
        self.overrides
            .cluster()
            .unwrap_or(settings::DEFAULT_CLUSTER)
            .to_string()
    }

    /// A connection to etcd, and the cluster it is for.
    pub async fn etcd(&self) -> Result<(etcd_client::Client, Settings)> {
        let settings = self.settings()?;
        let client = shardmap::store::connect(&settings.etcd)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to etcd at {}",
                    settings.etcd.endpoints.join(",")
                )
            })?;
        Ok((client, settings))
    }

    pub async fn store(&self) -> Result<MapStore> {
        let (client, settings) = self.etcd().await?;
        Ok(MapStore::with_client(client, &settings.cluster))
    }

    pub async fn job_store(&self) -> Result<JobStore> {
        let (client, settings) = self.etcd().await?;
        Ok(JobStore::new(client, &settings.cluster))
    }

    /// Applies `edit` to the stored map and reports the new version.
    pub async fn change<F>(&self, edit: F) -> Result<()>
    where
        F: FnMut(&mut ClusterMap) -> Result<Change, String>,
    {
        let store = self.store().await?;
        let saved = store.update(&self.actor, edit).await?;
        if self.json {
            print_json(
                &serde_json::json!({ "version": saved.map.version, "revision": saved.revision }),
            )
        } else {
            println!("map version {} saved", saved.map.version);
            Ok(())
        }
    }
}
