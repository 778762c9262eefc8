//! `shardline-rebalancer`: the daemon that runs partition moves. Run one or
//! more; they elect a leader in etcd and only the leader acts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rebalancer::config::RebalancerConfig;
use settings::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "shardline-rebalancer",
    version,
    about = "Runs shardline partition moves"
)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "SHARDLINE_REBALANCER_CONFIG")]
    config: Option<PathBuf>,
    /// etcd endpoints, comma-separated (overrides SHARDLINE_ETCD and the config).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name (overrides SHARDLINE_CLUSTER and the config).
    #[arg(long)]
    cluster: Option<String>,
    /// This daemon's id in the election (default: hostname and pid).
    #[arg(long)]
    id: Option<String>,
    /// Moves running at once (overrides the config).
    #[arg(long)]
    max_concurrent_moves: Option<usize>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (overrides the config).
    #[arg(long)]
    metrics_listen: Option<String>,
}

fn main() -> ExitCode {
    telemetry::init_logging("info");
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => RebalancerConfig::read(path),
        None => Ok(RebalancerConfig::default()),
    };
    let mut config = match config {
        Ok(config) => match config
            .layered(&Overrides::env_then_flags(
                &args.etcd,
                args.cluster.as_deref(),
            ))
            .read_secrets()
        {
            Ok(config) => config,
            Err(e) => {
                eprintln!("shardline-rebalancer: {e}");
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            eprintln!("shardline-rebalancer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(n) = args.max_concurrent_moves {
        config.max_concurrent_moves = n;
    }
    if let Some(address) = &args.metrics_listen {
        config.metrics_listen = Some(address.clone());
    }
    if let Err(e) = pgtls::check(&config.credentials()) {
        eprintln!(
            "shardline-rebalancer: {e}: fix [backend] in the config or the SHARDLINE_BACKEND_SSL* variables"
        );
        return ExitCode::FAILURE;
    }
    let id = args.id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("shardline-rebalancer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        tracing::info!(%id, cluster = %config.cluster, "rebalancer starting");
        let metrics = std::sync::Arc::new(rebalancer::metrics::Metrics::default());
        if let Some(address) = &config.metrics_listen {
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => {
                    tracing::info!(%address, "metrics at /metrics");
                    tokio::spawn(rebalancer::metrics::serve(listener, metrics.clone()));
                }
                Err(e) => {
                    eprintln!("shardline-rebalancer: cannot listen for metrics on {address}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    eprintln!("shardline-rebalancer: cannot handle SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = rebalancer::daemon::run_with_metrics(config, id, metrics) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
            _ = terminate.recv() => tracing::info!("shutting down"),
        }
        ExitCode::SUCCESS
    })
}
