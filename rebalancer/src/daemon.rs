//! The rebalancer daemon: campaign for leadership, then run jobs until
//! leadership is lost. Jobs past `pending` are always resumed (one of them
//! may hold a blocked partition); new jobs start while fewer than
//! `max_concurrent_moves` are running. Beside the jobs, the leader runs
//! two-phase commit recovery periodically, and keeps degraded mode's
//! ownership check function on every server (`owner_check`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shardmap::{JobStore, MapStore, Phase};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::RebalancerConfig;
use crate::leader::{self, Leadership};
use crate::metrics::Metrics;
use crate::mover::{self, MoveContext};
use crate::MoveError;

/// Runs forever: campaign, lead, and campaign again after losing leadership.
pub async fn run(config: RebalancerConfig, id: String) {
    run_with_metrics(config, id, Arc::new(Metrics::default())).await
}

/// [`run`], counting into `metrics`.
pub async fn run_with_metrics(config: RebalancerConfig, id: String, metrics: Arc<Metrics>) {
    loop {
        match shardmap::store::connect(&config.etcd).await {
            Ok(client) => {
                let election = shardmap::store::EtcdPaths::new(&config.cluster).election();
                match leader::campaign(&client, &election, &id, config.leader_ttl_seconds).await {
                    Ok(leadership) => {
                        Metrics::set(&metrics.leader, 1);
                        lead(client, leadership, &config, &id, metrics.clone()).await;
                        Metrics::set(&metrics.leader, 0);
                    }
                    Err(e) => warn!(error = %e, "campaign failed; retrying"),
                }
            }
            Err(e) => warn!(error = %e, "cannot reach etcd; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Acts as leader until leadership is lost; aborts its jobs then (their
/// state is in etcd: the next leader resumes them).
pub async fn lead(
    client: etcd_client::Client,
    leadership: Leadership,
    config: &RebalancerConfig,
    id: &str,
    metrics: Arc<Metrics>,
) {
    let context = Arc::new(MoveContext {
        etcd: client.clone(),
        store: MapStore::with_client(client.clone(), &config.cluster),
        jobs: JobStore::new(client, &config.cluster),
        cluster: config.cluster.clone(),
        config: config.clone(),
        credentials: config.credentials(),
        leader: leadership.clone(),
        actor: format!("rebalancer:{id}"),
        metrics: metrics.clone(),
    });
    // Prepared transactions of dead proxies hold locks (a cutover's DETACH
    // waits behind them): resolved on their own schedule, beside the jobs.
    // Aborted when this function ends or its task is aborted, so its clone of
    // the leadership never keeps the lease alive on its own.
    let recovery = AbortOnDrop(tokio::spawn(crate::recovery::run_while_leading(
        context.etcd.clone(),
        config.clone(),
        leadership.clone(),
        id.to_string(),
        metrics.clone(),
    )));
    let owner_checks = AbortOnDrop(tokio::spawn(crate::owner_check::run_while_leading(
        context.clone(),
    )));
    let mut running: HashMap<String, JoinHandle<Result<Phase, MoveError>>> = HashMap::new();
    // Servers each running job copies from or to, for the per-server limit.
    let mut servers_of: HashMap<String, [String; 2]> = HashMap::new();
    while leadership.is_valid() {
        running.retain(|id, task| {
            if task.is_finished() {
                info!(job = %id, "job task ended");
                false
            } else {
                true
            }
        });
        servers_of.retain(|id, _| running.contains_key(id));
        Metrics::set(&metrics.jobs_running, running.len() as u64);
        match context.jobs.list().await {
            Ok(jobs) => {
                let mut active = running.len();
                for stored in jobs {
                    let job = &stored.job;
                    if job.phase.is_terminal() || running.contains_key(&job.id) {
                        continue;
                    }
                    let resume = job.phase != Phase::Pending;
                    let busy = |server: &str| {
                        servers_of
                            .values()
                            .filter(|pair| pair.iter().any(|s| s == server))
                            .count()
                    };
                    let per_server = config.max_moves_per_server.max(1);
                    if !resume
                        && (active >= config.max_concurrent_moves.max(1)
                            || busy(&job.from) >= per_server
                            || busy(&job.to) >= per_server)
                    {
                        continue;
                    }
                    active += 1;
                    servers_of.insert(job.id.clone(), [job.from.clone(), job.to.clone()]);
                    info!(job = %job.id, phase = %job.phase, partition = job.partition, "running job");
                    let id = job.id.clone();
                    let context = context.clone();
                    running.insert(
                        id.clone(),
                        tokio::spawn(async move {
                            let result = mover::run(context, stored).await;
                            match &result {
                                Ok(phase) => info!(job = %id, %phase, "job finished"),
                                Err(e) => error!(job = %id, error = %e, "job stopped"),
                            }
                            result
                        }),
                    );
                }
            }
            Err(e) => warn!(error = %e, "cannot list jobs"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warn!("lost leadership: stopping every job (the next leader resumes them)");
    drop(recovery);
    drop(owner_checks);
    for task in running.values() {
        task.abort();
    }
}

/// A task that stops when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
