//! `shardline-proxy`: the routing proxy daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxy::config::ProxyConfig;
use proxy::metrics::Metrics;
use proxy::pool::Pools;

use proxy::context::Shared;
use proxy::server;
use settings::{Overrides, Password};
use shardmap::MapCache;

/// Every request allocates a few small buffers; mimalloc's thread-local free
/// lists make that measurably cheaper than glibc malloc (see docs/ARCHITECTURE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "shardline-proxy",
    version,
    about = "Postgres-wire shard-routing proxy"
)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "SHARDLINE_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the config).
    #[arg(long, env = "SHARDLINE_PROXY_LISTEN")]
    listen: Option<String>,
    /// etcd endpoints, comma-separated (overrides SHARDLINE_ETCD and the config).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name (overrides SHARDLINE_CLUSTER and the config).
    #[arg(long)]
    cluster: Option<String>,
    /// Client authentication: scram-sha-256, md5 or trust (overrides the config).
    #[arg(long, env = "SHARDLINE_AUTH_METHOD")]
    auth_method: Option<String>,
    /// Password for logging in to the servers (overrides `[backend] password`).
    /// Other users can read flags in `ps`: prefer the config file or
    /// SHARDLINE_BACKEND_PASSWORD, which is used when neither is set.
    #[arg(long)]
    backend_password: Option<String>,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9930 (overrides the config).
    #[arg(long, env = "SHARDLINE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// This proxy's region: statements any server can answer (reference
    /// reads) go to a server of this region when there is one.
    #[arg(long, env = "SHARDLINE_REGION")]
    region: Option<String>,
    /// `strict`: refuse statements on partitions pinned to another region
    /// than --region (SQLSTATE 42501); `off` (default) only prefers it.
    #[arg(long, env = "SHARDLINE_RESIDENCY")]
    residency: Option<proxy::residency::Residency>,
    /// Name this proxy registers under in etcd (default: host:port of --listen).
    #[arg(long, env = "SHARDLINE_PROXY_ID")]
    id: Option<String>,
    /// Serving threads, each with its own event loop, listener (SO_REUSEPORT)
    /// and backend pools (default: one per core the process may run on —
    /// its CPU affinity and cgroup quota — see docs/PERFORMANCE.md).
    #[arg(long, env = "SHARDLINE_PROXY_THREADS")]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    telemetry::init_logging("info");
    if let proxy::allocator::PurgeDelay::UnknownLayout(value) =
        proxy::allocator::purge_freed_memory_promptly()
    {
        tracing::warn!(
            value,
            "mimalloc's purge delay option did not read its known default: left as it is, \
             so memory freed after a burst of clients may stay resident longer"
        );
    }
    let args = Args::parse();
    // The main thread's runtime follows etcd and serves clients; `--threads`
    // adds serving threads, each with its own runtime, listener and pools.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ProxyConfig::read(path).map_err(anyhow::Error::msg)?,
        None => ProxyConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    Overrides::env_then_flags(&args.etcd, args.cluster.as_deref())
        .apply(&mut config.etcd, &mut config.cluster);
    if let Some(method) = args.auth_method {
        config.auth.method = serde_json::from_value(serde_json::Value::String(method.clone()))
            .map_err(|_| {
                anyhow::anyhow!("unknown auth method {method:?}: use scram-sha-256, md5 or trust")
            })?;
    }
    if let Some(region) = args.region {
        config.region = Some(region);
    }
    if let Some(residency) = args.residency {
        config.residency = residency;
    }
    anyhow::ensure!(
        config.residency == proxy::residency::Residency::Off || config.region.is_some(),
        "residency = \"strict\" needs the proxy's region: set region in the config, --region or SHARDLINE_REGION"
    );
    if let Some(metrics) = args.metrics_listen {
        config.metrics_listen = Some(metrics);
    }
    if let Some(password) = args.backend_password {
        config.backend.password = Some(Password::new(password));
    }
    config.backend = config.backend.read_files()?.or_from_env();
    // Refuse to start on TLS settings no connection could use (a missing
    // file, verify-full without sslrootcert) rather than fail every query.
    pgtls::check(&config.backend).map_err(|e| {
        anyhow::anyhow!("{e}: fix [backend] in the config or the SHARDLINE_BACKEND_SSL* variables")
    })?;
    anyhow::ensure!(
        !config.etcd.endpoints.is_empty(),
        "no etcd endpoints: set [etcd] endpoints in the config, --etcd, or SHARDLINE_ETCD"
    );
    shardmap::store::check_settings(&config.etcd)?;
    let users = config.users().map_err(anyhow::Error::msg)?;
    let tls = proxy::tls::from_config(&config.tls).map_err(anyhow::Error::msg)?;
    let cache = Arc::new(MapCache::spawn(config.etcd.clone(), &config.cluster));
    if cache
        .wait_for_version(1, Duration::from_secs(10))
        .await
        .is_none()
    {
        tracing::warn!(cluster = %config.cluster, "no shard map yet; clients get an error until one is loaded");
    }
    // A proxy usually has its machine (or container) to itself: one event
    // loop per core it may use. On a machine shared with Postgres and the
    // clients, a second thread gains nothing but costs nothing measurable
    // either (docs/PERFORMANCE.md).
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let pool_config = config.pool_config();
    if pool_config.size < threads {
        tracing::warn!(
            size = pool_config.size,
            threads,
            "[pool] size is smaller than the number of serving threads: busy connections go round the threads, closed on one and opened on another; raise [pool] size or lower --threads"
        );
    }
    // The configured pool size is per server for the whole proxy: the
    // threads' pools draw on one budget per server.
    let budgets = Arc::new(proxy::pool::Budgets::default());
    let listener = server::bind(&config.listen).await?;
    let address = listener.local_addr()?;
    let listen = address.to_string();
    let id = args.id.unwrap_or_else(|| listen.clone());
    twophase::GidGenerator::check_proxy_id(&id)?;
    // Before registering: the locks of transactions an earlier life of this
    // proxy left prepared would block the clients about to be served.
    let recovered = match cache.current() {
        Some(snapshot) => {
            proxy::recovery::at_start(
                &config.etcd,
                &config.cluster,
                &id,
                &snapshot.map,
                &config.backend,
            )
            .await
        }
        None => None,
    };
    // Not serving until registered: the cutover must know about this proxy.
    let liveness = proxy::liveness::Liveness::new(false);
    tokio::spawn(proxy::registry::keep_registered(
        proxy::registry::Registration {
            etcd: config.etcd.clone(),
            cluster: config.cluster.clone(),
            id,
            listen,
        },
        cache.clone(),
        liveness.clone(),
    ));
    if !config.pool.socket_dirs.is_empty() {
        tokio::spawn(warn_of_unknown_socket_servers(
            config.pool.clone(),
            cache.subscribe(),
        ));
    }
    let cancels = Arc::new(proxy::cancel::CancelRegistry::default());
    let two_phase = Arc::new(proxy::two_phase::TwoPhase::new(
        config.etcd.clone(),
        config.cluster.clone(),
    ));
    let logins = Arc::new(proxy::login_limits::LoginLimits::new(&config));
    let new_shared = |pool_config: proxy::pool::PoolConfig| {
        let mut shared = Shared::with_cancels(
            config.clone(),
            users.clone(),
            cache.subscribe(),
            Pools::sharing(
                pool_config,
                Arc::new(config.backend.clone()),
                budgets.clone(),
            ),
            cancels.clone(),
        );
        shared.tls = tls.clone();
        shared.liveness = liveness.clone();
        shared.two_phase = two_phase.clone();
        shared.logins = logins.clone();
        Arc::new(shared)
    };
    let mut all_shared = vec![new_shared(pool_config.clone())];
    if let Some(report) = recovered {
        let metrics = &all_shared[0].metrics;
        Metrics::add(&metrics.recovered_commits, report.committed() as u64);
        Metrics::add(&metrics.recovered_rollbacks, report.rolled_back() as u64);
    }
    let mut first_listener = Some(listener);
    if threads > 1 {
        // All threads, this one included, accept on SO_REUSEPORT sockets.
        drop(first_listener.take());
        for index in 1..threads {
            let shared = new_shared(pool_config.clone());
            all_shared.push(shared.clone());
            std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a serving thread");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        match server::bind_shared(address) {
                            Ok(listener) => server::serve(listener, shared).await,
                            Err(e) => tracing::error!(error = %e, "cannot bind a serving thread's listener"),
                        }
                    });
                })?;
        }
    }
    let listener = match first_listener {
        Some(listener) => listener,
        None => server::bind_shared(address)?,
    };
    if let Some(metrics_listen) = &config.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_listen).await?;
        tracing::info!(address = %metrics_listener.local_addr()?, "metrics at /metrics");
        tokio::spawn(proxy::scrape::serve(metrics_listener, all_shared.clone()));
    }
    let serving = tokio::spawn(server::serve(listener, all_shared[0].clone()));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        _ = serving => {}
    }
    drop(cache);
    Ok(())
}

/// Warns, whenever the map changes which they are, of the names in
/// `[pool.socket_dirs]` that are no server of the map.
async fn warn_of_unknown_socket_servers(
    pool: proxy::config::PoolSettings,
    mut maps: tokio::sync::watch::Receiver<shardmap::cache::Snapshot>,
) {
    let mut reported: Vec<String> = Vec::new();
    loop {
        let unknown: Vec<String> = match maps.borrow_and_update().as_ref() {
            Some(snapshot) => pool
                .unknown_socket_servers(&snapshot.map)
                .into_iter()
                .map(String::from)
                .collect(),
            None => Vec::new(),
        };
        if !unknown.is_empty() && unknown != reported {
            tracing::warn!(
                servers = ?unknown,
                "[pool.socket_dirs] names servers the map does not have: they are not used; check the names against `shardctl server list`"
            );
        }
        reported = unknown;
        if maps.changed().await.is_err() {
            return;
        }
    }
}
