//! The proxy's registration in etcd: a key under `/shardline/<cluster>/proxies/`
//! bound to a lease the proxy keeps alive. The rebalancer's cutover waits for
//! every registered proxy (or for its lease to expire).

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use serde::Serialize;
use tracing::{info, warn};

/// Lease time-to-live: a proxy that stops renewing disappears after this.
pub const LEASE_TTL_SECONDS: i64 = 10;

#[derive(Debug, Serialize)]
struct Registration<'a> {
    id: &'a str,
    listen: &'a str,
    started_unix_ms: u64,
    version: &'a str,
}

/// Keeps `/shardline/<cluster>/proxies/<id>` alive; re-registers after etcd
/// outages. Runs until the task is dropped.
pub async fn keep_registered(endpoints: Vec<String>, cluster: String, id: String, listen: String) {
    let key = format!("/shardline/{cluster}/proxies/{id}");
    let started_unix_ms = shardmap::store::now_unix_ms();
    loop {
        match register_once(&endpoints, &key, &id, &listen, started_unix_ms).await {
            Ok(()) => warn!(%key, "proxy registration lost; registering again"),
            Err(e) => warn!(%key, error = %e, "cannot register the proxy in etcd; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn register_once(
    endpoints: &[String],
    key: &str,
    id: &str,
    listen: &str,
    started_unix_ms: u64,
) -> Result<(), etcd_client::Error> {
    let mut client: Client = match shardmap::store::connect(endpoints).await {
        Ok(client) => client,
        Err(shardmap::StoreError::Etcd(e)) => return Err(e),
        Err(other) => return Err(etcd_client::Error::InvalidArgs(other.to_string())),
    };
    let lease = client.lease_grant(LEASE_TTL_SECONDS, None).await?;
    let value = serde_json::to_vec(&Registration {
        id,
        listen,
        started_unix_ms,
        version: env!("CARGO_PKG_VERSION"),
    })
    .unwrap_or_default();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease.id())))
        .await?;
    info!(%key, lease = lease.id(), "proxy registered");
    let (mut keeper, mut responses) = client.lease_keep_alive(lease.id()).await?;
    let mut tick =
        tokio::time::interval(Duration::from_secs((LEASE_TTL_SECONDS / 3).max(1) as u64));
    loop {
        tick.tick().await;
        keeper.keep_alive().await?;
        match responses.message().await? {
            Some(response) if response.ttl() > 0 => {}
            _ => return Ok(()),
        }
    }
}
