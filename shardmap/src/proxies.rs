//! Live proxies in etcd: each proxy keeps `/shardline/<cluster>/proxies/<id>`
//! alive with a lease and writes into it the map version it has
//! *acknowledged*: every statement it routed with an older map has finished,
//! so nothing it still runs was routed before that version. A cutover waits
//! until every registered proxy acknowledges the version that blocked the
//! partition, or until its key disappears (its lease expired, and a proxy
//! whose lease expired has stopped serving).

use etcd_client::{Client, GetOptions};
use serde::{Deserialize, Serialize};

use crate::store::{with_timeout, Keys, StoreError};

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

/// Every registered proxy. A record that cannot be decoded is reported with
/// `acked_map_version` 0 (it never acknowledges, so a cutover waits for its lease).
pub async fn list(client: &Client, cluster: &str) -> Result<Vec<LiveProxy>, StoreError> {
    let keys = Keys::new(cluster);
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
