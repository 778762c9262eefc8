//! The proxy's registration in etcd: `/shardline/<cluster>/proxies/<id>`,
//! bound to a lease the proxy keeps alive, holding the map version the proxy
//! acknowledges (see [`crate::liveness`] and [`shardmap::proxies`]).
//!
//! Normal mode depends on the lease: the proxy serves normally only until
//! `time the last answered keep-alive was sent + TTL - SAFETY_MARGIN`. etcd
//! cannot expire the lease before `send time + TTL`, so when the rebalancer
//! sees the key vanish, this proxy has already entered degraded mode (each
//! request proves ownership on its server). After an outage it serves
//! normally again only once it holds a new lease and its map cache has
//! caught up with etcd past the moment of registering.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use shardmap::proxies::{ProxyRecord, LEASE_TTL_SECONDS};
use shardmap::store::EtcdPaths;
use shardmap::MapCache;
use tokio::sync::watch;
use tracing::{info, warn};
use twophase::GidGenerator;

use crate::liveness::Liveness;

/// Stop serving this long before the lease could possibly expire: covers
/// timer lateness and a request routed just before the deadline reaching
/// its backend just after.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(3);

/// Longest wait for one etcd request: well inside the lease, so a slow etcd
/// is noticed while the lease can still be renewed.
const ETCD_DEADLINE: Duration = Duration::from_secs(2);

/// How the registry reaches etcd and what it registers.
#[derive(Clone)]
pub struct Registration {
    pub etcd: settings::EtcdSettings,
    pub cluster: String,
    pub id: String,
    pub listen: String,
}

/// Keeps the registration alive and the acknowledgement current; flips
/// `liveness` to not serving when the lease can no longer be proven alive.
/// Runs until the task is dropped.
pub async fn keep_registered(
    registration: Registration,
    cache: Arc<MapCache>,
    liveness: Arc<Liveness>,
) {
    let key = EtcdPaths::new(&registration.cluster).proxy(&registration.id);
    let started_unix_ms = shardmap::store::now_unix_ms();
    // Serving ends at this instant unless a keep-alive moves it.
    let (deadline_tx, deadline_rx) = watch::channel::<Option<Instant>>(None);
    // One task: dropping it stops all three parts.
    tokio::select! {
        _ = enforce_deadline(deadline_rx, liveness.clone()) => {}
        _ = follow_map(cache.clone(), liveness.clone()) => {}
        _ = register_forever(&registration, &key, started_unix_ms, &cache, &liveness, &deadline_tx) => {}
    }
}

async fn register_forever(
    registration: &Registration,
    key: &str,
    started_unix_ms: u64,
    cache: &MapCache,
    liveness: &Arc<Liveness>,
    deadline_tx: &watch::Sender<Option<Instant>>,
) {
    loop {
        let attempt = register_once(
            registration,
            key,
            started_unix_ms,
            cache,
            liveness,
            deadline_tx,
        )
        .await;
        liveness.set_gids(None);
        match attempt {
            Ok(()) => warn!(%key, "proxy registration lost; registering again"),
            Err(e) => warn!(%key, error = %e, "cannot keep the proxy registered in etcd; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Tells `liveness` about every map version the cache applies.
async fn follow_map(cache: Arc<MapCache>, liveness: Arc<Liveness>) {
    let mut maps = cache.subscribe();
    loop {
        let version = maps.borrow_and_update().as_ref().map(|v| v.map.version);
        if let Some(version) = version {
            liveness.set_applied(version);
        }
        if maps.changed().await.is_err() {
            return;
        }
    }
}

/// Stops serving when the deadline passes.
async fn enforce_deadline(mut deadline: watch::Receiver<Option<Instant>>, liveness: Arc<Liveness>) {
    loop {
        let current = *deadline.borrow_and_update();
        match current {
            Some(at) if at > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    changed = deadline.changed() => if changed.is_err() { return },
                }
            }
            _ => {
                if liveness.serving() {
                    warn!("the proxy's etcd lease can no longer be proven alive: checking ownership on the servers until it re-registers");
                    // Degraded first: a request never finds the proxy in neither mode.
                    liveness.set_degraded(true);
                    liveness.set_serving(false);
                }
                if deadline.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn register_once(
    registration: &Registration,
    key: &str,
    started_unix_ms: u64,
    cache: &MapCache,
    liveness: &Arc<Liveness>,
    deadline: &watch::Sender<Option<Instant>>,
) -> Result<(), String> {
    let mut client: Client = shardmap::store::connect(&registration.etcd)
        .await
        .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    let lease = timed(client.lease_grant(LEASE_TTL_SECONDS, None)).await?;
    let lease_id = lease.id();
    let mut valid_until = sent + Duration::from_secs(lease.ttl().max(0) as u64);
    let record = |acked: u64| ProxyRecord {
        id: registration.id.clone(),
        listen: registration.listen.clone(),
        started_unix_ms,
        version: env!("CARGO_PKG_VERSION").to_string(),
        acked_map_version: acked,
    };
    let mut acked = liveness.acked();
    put(&client, &registration.cluster, &record(acked), lease_id).await?;
    info!(%key, lease = lease_id, "proxy registered");
    // Ids of this registration: its lease is their incarnation, so commits
    // of an earlier registration's transactions can no longer be recorded.
    match GidGenerator::new(&registration.id, lease_id) {
        Ok(gids) => liveness.set_gids(Some(gids)),
        Err(e) => warn!(error = %e, "two-phase commit is unavailable"),
    }
    if !liveness.serving() {
        // Serve again only with a map at least as new as the stored one after
        // registering: a cutover may have started while we were away.
        let store = shardmap::MapStore::with_client(client.clone(), &registration.cluster);
        let stored = store.try_load().await.map_err(|e| e.to_string())?;
        let needed = stored.map_or(0, |v| v.revision);
        let caught_up = async {
            loop {
                let current = cache.current().map_or(0, |v| v.revision);
                if cache.health().map_current && current >= needed {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timed_unit(caught_up).await?;
        // Re-acknowledge: the applied version may have moved while catching up.
        acked = liveness.acked();
        put(&client, &registration.cluster, &record(acked), lease_id).await?;
        info!("proxy serving again: registered and map caught up");
    }
    deadline.send_replace(Some(valid_until.checked_sub(SAFETY_MARGIN).unwrap_or(sent)));
    liveness.set_serving(true);
    liveness.set_degraded(false);

    let (mut keeper, mut responses) = timed(client.lease_keep_alive(lease_id)).await?;
    let mut changes = liveness.watch();
    let period = Duration::from_secs((LEASE_TTL_SECONDS / 3).max(1) as u64);
    let mut next_keepalive = Instant::now() + period;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_keepalive.into()) => {
                let sent = Instant::now();
                timed(keeper.keep_alive()).await?;
                match timed(responses.message()).await? {
                    Some(response) if response.ttl() > 0 => {
                        valid_until = sent + Duration::from_secs(response.ttl() as u64);
                        deadline.send_replace(Some(valid_until.checked_sub(SAFETY_MARGIN).unwrap_or(sent)));
                    }
                    _ => return Ok(()),
                }
                next_keepalive = Instant::now() + period;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err("liveness dropped".into());
                }
                let now_acked = liveness.acked();
                if now_acked != acked {
                    acked = now_acked;
                    put(&client, &registration.cluster, &record(acked), lease_id).await?;
                }
            }
        }
    }
}

async fn put(
    client: &Client,
    cluster: &str,
    record: &ProxyRecord,
    lease: i64,
) -> Result<(), String> {
    shardmap::proxies::register(client, cluster, record, lease, ETCD_DEADLINE)
        .await
        .map_err(|e| e.to_string())
}

/// An etcd call with a deadline well inside the lease.
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(ETCD_DEADLINE, call).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("etcd did not answer within {ETCD_DEADLINE:?}")),
    }
}

async fn timed_unit(wait: impl std::future::Future<Output = ()>) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .map_err(|_| "the map cache did not catch up with etcd within 10s".to_string())
}
