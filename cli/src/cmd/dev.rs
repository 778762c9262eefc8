//! `shardctl dev`: a local cluster (etcd + N Postgres servers) for the
//! quickstart and for trying shardline on one machine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use devcluster::{DevOptions, LocalCluster};
use shardmap::{Change, ClusterMap, Endpoint, MapStore, Server, ServerState};

use settings::{Credentials, SharedFile, SslMode, TlsKeys};

use crate::config::default_dev_dir;
use crate::context::Context;
use crate::output::{print_json, table};
use crate::progress;

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start etcd and N Postgres 15 servers on free ports, and initialise the map.
    Up {
        /// Directory for data, logs and cluster.json (default: $TMPDIR/shardline-dev).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Number of Postgres servers.
        #[arg(long, default_value_t = 3)]
        servers: usize,
        /// Logical partitions in the map.
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Run Postgres with fsync on (off by default: dev data is disposable).
        #[arg(long)]
        fsync: bool,
        /// Serve etcd and Postgres over TLS with certificates of a dev CA
        /// created in <dir>/tls (the cluster's config file points at them).
        #[arg(long)]
        tls: bool,
        /// Turn on etcd authentication: users `root` and `shardline` (limited
        /// to the cluster's keys) with random passwords in 0600 files of the
        /// cluster directory; the config file names the `shardline` one.
        #[arg(long)]
        etcd_auth: bool,
    },
    /// Stop everything `dev up` started, and delete its directory.
    Down {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the data directory (only stop the processes).
        #[arg(long)]
        keep_data: bool,
    },
    /// Show the addresses of the running dev cluster.
    Status {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub async fn run(context: &Context, command: DevCommand) -> Result<()> {
    match command {
        DevCommand::Up {
            dir,
            servers,
            partitions,
            fsync,
            tls,
            etcd_auth,
        } => {
            let options = DevOptions {
                dir: dir.unwrap_or_else(default_dev_dir),
                servers,
                fsync,
                tls,
                etcd_auth,
                etcd_token_ttl: None,
            };
            up(context, options, partitions).await
        }
        DevCommand::Down { dir, keep_data } => {
            let dir = dir.unwrap_or_else(default_dev_dir);
            let state = tokio::task::spawn_blocking(move || devcluster::stop_dir(&dir, keep_data))
                .await??;
            if context.json {
                print_json(&state)
            } else {
                println!(
                    "stopped etcd and {} Postgres servers{}",
                    state.servers.len(),
                    if keep_data {
                        ""
                    } else {
                        "; removed the cluster directory"
                    }
                );
                Ok(())
            }
        }
        DevCommand::Status { dir } => {
            let dir = dir.unwrap_or_else(default_dev_dir);
            let state = devcluster::read_state(&dir)?;
            print_state(context, &state, None)
        }
    }
}

async fn up(context: &Context, options: DevOptions, partitions: u32) -> Result<()> {
    let (dir, servers, tls) = (options.dir.clone(), options.servers, options.tls);
    anyhow::ensure!(servers >= 1, "--servers must be at least 1");
    anyhow::ensure!(
        partitions.is_power_of_two() && partitions <= shardmap::model::MAX_PARTITIONS,
        "--partitions {partitions} must be a power of two between 1 and {}",
        shardmap::model::MAX_PARTITIONS
    );
    let started = Instant::now();
    let bar = progress::startup_bar(servers as u64 + 3 + u64::from(tls));
    let progress_bar = bar.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::start_with_progress(&options, &mut |step| {
            progress_bar.set_message(step.to_string());
            progress_bar.inc(1);
        })
    })
    .await??;
    bar.set_message("initialising the map");
    let state = cluster.state();
    let config_path = match init_map(context, &state, partitions, &dir).await {
        Ok(path) => path,
        Err(e) => {
            bar.finish_and_clear();
            // Do not leave a half-made cluster behind.
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
            return Err(e);
        }
    };
    bar.inc(1);
    bar.finish_and_clear();
    // Leave the processes running: `dev down` stops them.
    std::mem::forget(cluster);
    print_state(context, &state, Some((started.elapsed(), &config_path)))
}

/// Creates the map for a new dev cluster, or points an existing one (a
/// directory kept with `dev down --keep-data`) at the servers' new ports.
async fn init_map(
    context: &Context,
    state: &devcluster::ClusterState,
    partitions: u32,
    dir: &Path,
) -> Result<PathBuf> {
    let cluster_name = context.cluster_name();
    let members = state
        .servers
        .iter()
        .map(|s| {
            Ok(Server {
                name: s.name.clone(),
                primary: Endpoint::parse(&s.url()).map_err(anyhow::Error::msg)?,
                replicas: Vec::new(),
                region: None,
                state: ServerState::Active,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let etcd = state.etcd_settings();
    if let Some(login) = &state.etcd_login {
        let read =
            |path: &Path| settings::Password::from_file(path).map_err(|e| anyhow::anyhow!("{e}"));
        let anonymous = settings::EtcdSettings {
            user: None,
            password_file: None,
            ..etcd.clone()
        };
        shardmap::access::enable_auth(
            &anonymous,
            read(&login.root_password_file)?.expose(),
            &login.user,
            read(&login.password_file)?.expose(),
            &cluster_name,
        )
        .await
        .context("cannot turn on etcd authentication")?;
    }
    let store = MapStore::connect(&etcd, &cluster_name).await?;
    if store.try_load().await?.is_some() {
        store
            .update(&context.actor, |map| {
                for member in &members {
                    if let Some(server) = map.servers.get_mut(&member.name) {
                        server.primary = member.primary.clone();
                    }
                }
                Ok(Change::new("dev up", "servers restarted on new ports"))
            })
            .await?;
    } else {
        let map = ClusterMap::new(&cluster_name, partitions, members)?;
        store.initialize(map, &context.actor).await?;
    }
    let config = SharedFile {
        cluster: Some(cluster_name),
        etcd,
        backend: backend_settings(state),
    };
    let config_path = dir.join("shardline.toml");
    crate::config::write(&config, &config_path).context("cannot write the dev cluster's config")?;
    Ok(config_path)
}

/// The `[backend]` table of the dev cluster's config: with `--tls`, every
/// server is checked against the dev CA (`verify-full`: its certificate names
/// 127.0.0.1) and shown the dev client certificate. The same paths serve
/// the subscriptions of moves, which the servers open on this same machine.
fn backend_settings(state: &devcluster::ClusterState) -> Credentials {
    let mut backend = Credentials::default();
    if let Some(certs) = &state.certs {
        backend.tls = TlsKeys {
            sslmode: Some(SslMode::VerifyFull),
            sslrootcert: Some(certs.ca_cert.clone()),
            sslcert: Some(certs.client_cert.clone()),
            sslkey: Some(certs.client_key.clone()),
        };
    }
    backend
}

fn print_state(
    context: &Context,
    state: &devcluster::ClusterState,
    started: Option<(Duration, &PathBuf)>,
) -> Result<()> {
    if context.json {
        let mut value = serde_json::to_value(state)?;
        if let Some((elapsed, config)) = started {
            value["startup_seconds"] = serde_json::json!(elapsed.as_secs_f64());
            value["config"] = serde_json::json!(config);
        }
        return print_json(&value);
    }
    let mut out = table(&["component", "address", "data"]);
    out.add_row(vec![
        "etcd".to_string(),
        state.etcd.endpoint(),
        state.etcd.data_dir.display().to_string(),
    ]);
    for server in &state.servers {
        out.add_row(vec![
            format!("postgres {}", server.name),
            server.url(),
            server.data_dir.display().to_string(),
        ]);
    }
    println!("{out}");
    if let Some((elapsed, config)) = started {
        println!("dev cluster up in {:.1}s", elapsed.as_secs_f64());
        println!("shardctl finds it on its own; other tools can use:");
        println!("  export SHARDLINE_CONFIG={}", config.display());
        println!(
            "stop it with: shardctl dev down --dir {}",
            state.dir.display()
        );
    }
    Ok(())
}
