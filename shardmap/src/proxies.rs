//! Live proxies in etcd: each proxy keeps `/shardline/<cluster>/proxies/<id>`
//! alive with a lease and writes into it the map version it has
//! *acknowledged*: every statement it routed with an older map has finished,
//! so nothing it still runs was routed before that version. A cutover waits
//! until every registered proxy acknowledges the version that blocked the
//! partition, or until its key disappears (its lease expired, and a proxy
//! whose lease expired has stopped serving).

use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};

use crate::store::{with_deadline, with_timeout, EtcdPaths, StoreError};

/// Lease time-to-live of a proxy registration.
pub const LEASE_TTL_SECONDS: i64 = 10;

/// The value of a proxy's registration key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub id: String,
    pub listen: String,
    pub started_unix_ms: u64,
    /// The proxy's software version.
    pub version: String,
    /// The newest map version this proxy acknowledges (see the module doc).
    #[serde(default)]
    pub acked_map_version: u64,
}

/// A registration as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveProxy {
    pub record: ProxyRecord,
    pub lease: i64,
    pub key: String,
}

/// Writes a proxy's registration, or refreshes it with a newer
/// acknowledgement. It is bound to `lease`, so etcd deletes it when the proxy
/// stops keeping the lease alive. `deadline` bounds the request: a proxy
/// must hear back well inside its lease to know it may go on serving.
pub async fn register(
    client: &Client,
    cluster: &str,
    record: &ProxyRecord,
    lease: i64,
    deadline: Duration,
) -> Result<(), StoreError> {
    let key = EtcdPaths::new(cluster).proxy(&record.id);
    let value = serde_json::to_vec(record).map_err(|e| {
        StoreError::Rejected(format!(
            "cannot encode the registration of proxy {:?}: {e}",
            record.id
        ))
    })?;
    let mut kv = client.kv_client();
    with_deadline(
        deadline,
        kv.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await?;
    Ok(())
}

/// Every registered proxy. A record that cannot be decoded is reported with
/// `acked_map_version` 0 (it never acknowledges, so a cutover waits for its lease).
pub async fn list(client: &Client, cluster: &str) -> Result<Vec<LiveProxy>, StoreError> {
    let keys = EtcdPaths::new(cluster);
    let mut kv = client.kv_client();
    let response =
        with_timeout(kv.get(keys.proxies_prefix(), Some(GetOptions::new().with_prefix()))).await?;
    let mut proxies = Vec::new();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let record = serde_json::from_slice(kv.value()).unwrap_or_else(|_| ProxyRecord {
            id: key.rsplit('/').next().unwrap_or_default().to_string(),
            listen: String::new(),
            started_unix_ms: 0,
            version: "unknown".into(),
            acked_map_version: 0,
        });
        proxies.push(LiveProxy {
            record,
            lease: kv.lease(),
            key,
        });
    }
    Ok(proxies)
}
