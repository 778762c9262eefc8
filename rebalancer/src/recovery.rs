//! The leader's two-phase commit recovery: every
//! `twophase_recovery_interval_ms` it resolves, on every server of the map,
//! the prepared transactions of proxies that are no longer alive, by their
//! recorded decision (see [`twophase::recovery`]). So a proxy that crashed
//! and never came back leaves no transaction in doubt, holding locks (an
//! in-doubt one on a moving partition would block the cutover's DETACH).

use std::sync::Arc;
use std::time::Duration;

use shardmap::MapStore;
use tracing::warn;
use twophase::{Recovery, Scope};

use crate::config::RebalancerConfig;
use crate::leader::Leadership;
use crate::metrics::Metrics;

/// Longest wait for one server in a run.
const SERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs recovery every interval while `leadership` holds; returns when it
/// is lost (or at once when the interval is 0: recovery disabled).
pub async fn run_while_leading(
    client: etcd_client::Client,
    config: RebalancerConfig,
    leadership: Leadership,
    id: String,
    metrics: Arc<Metrics>,
) {
    if config.twophase_recovery_interval_ms == 0 {
        return;
    }
    let interval = Duration::from_millis(config.twophase_recovery_interval_ms);
    let store = MapStore::with_client(client.clone(), &config.cluster);
    let credentials = config.credentials();
    while leadership.is_valid() {
        match store.load().await {
            Ok(current) => {
                let run = Recovery {
                    cluster: &config.cluster,
                    map: &current.map,
                    credentials: &credentials,
                    scope: Scope::DeadWriters,
                    actor: format!("rebalancer:{id}"),
                    server_timeout: SERVER_TIMEOUT,
                };
                match twophase::recover(&client, &run).await {
                    Ok(report) => {
                        Metrics::add(&metrics.twophase_committed, report.committed() as u64);
                        Metrics::add(&metrics.twophase_rolled_back, report.rolled_back() as u64);
                    }
                    Err(e) => {
                        warn!(error = %e, "two-phase recovery failed; retrying next interval")
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "two-phase recovery cannot read the map; retrying next interval")
            }
        }
        tokio::time::sleep(interval).await;
    }
}
