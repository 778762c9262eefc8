//! Two-phase commit recovery when the proxy starts: before it registers and
//! serves, it finishes the prepared transactions its earlier life left on
//! the servers (by their recorded decision, see [`twophase::recovery`]), so
//! their locks do not block the clients it is about to serve. Kept short:
//! a server or etcd that does not answer is logged and skipped; the
//! rebalancer leader's periodic recovery picks up what is left once this
//! proxy's earlier lease has run out.

use std::time::Duration;

use settings::Credentials;
use shardmap::ClusterMap;
use twophase::{Recovery, RecoveryReport, Scope};

/// Longest wait for one server.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest the whole recovery may delay the start.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves the prepared transactions of earlier incarnations of proxy
/// `proxy_id`; `None` when it could not run (logged).
pub async fn at_start(
    etcd: &settings::EtcdSettings,
    cluster: &str,
    proxy_id: &str,
    map: &ClusterMap,
    credentials: &Credentials,
) -> Option<RecoveryReport> {
    let run = Recovery {
        cluster,
        map,
        credentials,
        scope: Scope::OwnEarlier {
            proxy_id: proxy_id.to_string(),
        },
        actor: format!("proxy:{proxy_id}"),
        server_timeout: SERVER_TIMEOUT,
    };
    let attempt = async {
        let etcd = shardmap::store::connect(etcd)
            .await
            .map_err(|e| e.to_string())?;
        twophase::recover(&etcd, &run)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(TOTAL_TIMEOUT, attempt).await {
        Ok(Ok(report)) => Some(report),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "two-phase recovery at start failed; starting anyway (the rebalancer retries it)");
            None
        }
        Err(_) => {
            tracing::warn!("two-phase recovery at start took over {TOTAL_TIMEOUT:?}; starting anyway (the rebalancer retries it)");
            None
        }
    }
}
