//! An in-memory copy of the map that follows etcd's watch.
//!
//! The cache loads the map once, then applies watch events from the revision
//! after the one it loaded. When the watch breaks (etcd restarted, network
//! cut) it reconnects and resumes from the last revision it applied, so no
//! change is skipped; if etcd compacted that revision away, it reloads the
//! whole map instead. Readers get the newest map without waiting:
//! [`MapCache::current`] is a cheap `Arc` clone.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use settings::EtcdSettings;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

use crate::store::{connect, decode_map, EtcdPaths, StoreError, Versioned};

/// How long a full reload may take before the session is retried.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The map as last seen, or `None` before the first load (or after the map
/// key was deleted).
pub type Snapshot = Option<Arc<Versioned>>;

/// Connection state of the cache, for health checks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheHealth {
    /// True while a watch stream is established.
    pub watching: bool,
    /// The etcd revision up to which every change has been seen.
    pub synced_revision: i64,
    /// False when the newest stored map could not be decoded or is invalid:
    /// the cache then still holds the last good map, which is out of date.
    pub map_current: bool,
}

/// Follows one cluster's map in etcd. Dropping it stops the watch task.
pub struct MapCache {
    snapshot: watch::Receiver<Snapshot>,
    health: watch::Receiver<CacheHealth>,
    task: JoinHandle<()>,
}

impl MapCache {
    /// Starts following the map of `cluster` in the etcd of `etcd`.
    pub fn spawn(etcd: EtcdSettings, cluster: &str) -> MapCache {
        MapCache::spawn_observed(etcd, cluster, None)
    }

    /// Like [`MapCache::spawn`], and also sends every map it applies, in order,
    /// to `observer` (used to measure propagation and to prove no update is lost).
    pub fn spawn_observed(
        etcd: EtcdSettings,
        cluster: &str,
        observer: Option<mpsc::UnboundedSender<Arc<Versioned>>>,
    ) -> MapCache {
        MapCache::spawn_inner(etcd, cluster, observer, None, 0)
    }

    fn spawn_inner(
        etcd: EtcdSettings,
        cluster: &str,
        observer: Option<mpsc::UnboundedSender<Arc<Versioned>>>,
        known: Snapshot,
        synced_revision: i64,
    ) -> MapCache {
        let (snapshot_tx, snapshot) = watch::channel(known);
        let (health_tx, health) = watch::channel(CacheHealth {
            watching: false,
            synced_revision,
            map_current: true,
        });
        let follower = Follower {
            etcd,
            cluster: cluster.to_string(),
            keys: EtcdPaths::new(cluster),
            snapshot: snapshot_tx,
            health: health_tx,
            observer,
            synced_revision,
            map_current: true,
        };
        MapCache {
            snapshot,
            health,
            task: tokio::spawn(follower.run()),
        }
    }

    /// Starts following as if `known` had already been applied and every
    /// change up to etcd revision `synced_revision` seen: the watch resumes
    /// after it (or reloads if etcd compacted it). Used to resume from a saved
    /// state, and by tests of the compaction path.
    pub fn spawn_resuming(
        etcd: EtcdSettings,
        cluster: &str,
        known: Arc<Versioned>,
        synced_revision: i64,
    ) -> MapCache {
        MapCache::spawn_inner(etcd, cluster, None, Some(known), synced_revision)
    }

    /// [`MapCache::spawn_resuming`] with an observer (see [`MapCache::spawn_observed`]).
    pub fn spawn_resuming_observed(
        etcd: EtcdSettings,
        cluster: &str,
        known: Arc<Versioned>,
        synced_revision: i64,
        observer: Option<mpsc::UnboundedSender<Arc<Versioned>>>,
    ) -> MapCache {
        MapCache::spawn_inner(etcd, cluster, observer, Some(known), synced_revision)
    }
    /// The newest map applied.
    pub fn current(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every applied change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    pub fn health(&self) -> CacheHealth {
        *self.health.borrow()
    }

    /// Waits until the cache holds map version `version` or newer.
    pub async fn wait_for_version(
        &self,
        version: u64,
        timeout: Duration,
    ) -> Option<Arc<Versioned>> {
        let mut rx = self.snapshot.clone();
        let wait = async {
            rx.wait_for(|s| s.as_ref().is_some_and(|v| v.map.version >= version))
                .await
                .ok()
                .and_then(|snapshot| snapshot.clone())
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

impl Drop for MapCache {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Follower {
    etcd: EtcdSettings,
    cluster: String,
    keys: EtcdPaths,
    snapshot: watch::Sender<Snapshot>,
    health: watch::Sender<CacheHealth>,
    observer: Option<mpsc::UnboundedSender<Arc<Versioned>>>,
    /// Every change up to this etcd revision has been seen; 0 = never loaded.
    synced_revision: i64,
    /// Whether the last stored map seen was decodable and valid.
    map_current: bool,
}

/// Why a watch session ended.
enum SessionEnd {
    /// Connection trouble: reconnect and resume.
    Disconnected(String),
    /// The revision to resume from was compacted: reload the whole map.
    Compacted,
}

impl Follower {
    async fn run(mut self) {
        const FIRST_BACKOFF: Duration = Duration::from_millis(50);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (end, established) = self.session().await;
            self.set_health(false);
            if established {
                backoff = FIRST_BACKOFF;
            }
            match end {
                SessionEnd::Compacted => {
                    info!(cluster = %self.cluster, "watch revision was compacted; reloading the whole map");
                    self.synced_revision = 0;
                    backoff = FIRST_BACKOFF;
                }
                SessionEnd::Disconnected(why) => {
                    debug!(cluster = %self.cluster, %why, ?backoff, "map watch interrupted; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// One connection: (re)load if needed, then apply watch events until the
    /// stream ends. Also says whether a watch was established.
    async fn session(&mut self) -> (SessionEnd, bool) {
        let mut established = false;
        let end = self.watch_session(&mut established).await;
        (end, established)
    }

    async fn watch_session(&mut self, established: &mut bool) -> SessionEnd {
        let client = match connect(&self.etcd).await {
            Ok(client) => client,
            Err(e) => return SessionEnd::Disconnected(e.to_string()),
        };
        if self.synced_revision == 0 {
            match tokio::time::timeout(RELOAD_TIMEOUT, self.reload(&client)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return SessionEnd::Disconnected(e.to_string()),
                Err(_) => return SessionEnd::Disconnected("reloading the map timed out".into()),
            }
        }
        let options = WatchOptions::new()
            .with_start_revision(self.synced_revision + 1)
            .with_progress_notify();
        let mut watch_client = client.watch_client();
        let mut stream = match watch_client.watch(self.keys.map(), Some(options)).await {
            Ok(stream) => stream,
            Err(e) => return SessionEnd::Disconnected(e.to_string()),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return SessionEnd::Disconnected("watch stream closed".into()),
                Err(e) => return SessionEnd::Disconnected(e.to_string()),
            };
            if response.compact_revision() > 0 {
                return SessionEnd::Compacted;
            }
            if response.canceled() {
                return SessionEnd::Disconnected(format!(
                    "watch canceled: {}",
                    response.cancel_reason()
                ));
            }
            if response.created() {
                *established = true;
                self.set_health(true);
                continue;
            }
            if response.events().is_empty() {
                // A progress notification: nothing changed up to this revision.
                if let Some(header) = response.header() {
                    self.synced_revision = self.synced_revision.max(header.revision());
                    self.set_health(true);
                }
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => self.apply_stored(Some(kv)),
                    EventType::Delete => self.apply_stored(None),
                }
                self.synced_revision = self.synced_revision.max(kv.mod_revision());
            }
            self.set_health(true);
        }
    }

    async fn reload(&mut self, client: &etcd_client::Client) -> Result<(), StoreError> {
        let mut kv = client.kv_client();
        let response = kv.get(self.keys.map(), None).await?;
        let store_revision = response.header().map(|h| h.revision()).unwrap_or(0);
        self.apply_stored(response.kvs().first());
        // Resume watching after the revision this read saw; never go backwards.
        self.synced_revision = self.synced_revision.max(store_revision);
        Ok(())
    }

    /// Applies the stored map (`None`: the key is gone). A map that cannot be
    /// decoded or fails validation is not applied: the last good one stays,
    /// and the health says it is out of date.
    fn apply_stored(&mut self, kv: Option<&etcd_client::KeyValue>) {
        // Health is updated before the map is published, so that a reader
        // who sees the new map also sees it reported current.
        let watching = self.health.borrow().watching;
        let Some(kv) = kv else {
            self.map_current = true;
            self.set_health(watching);
            self.publish(None);
            return;
        };
        match decode_map(&self.cluster, kv.value()) {
            Ok(map) => {
                self.map_current = true;
                self.set_health(watching);
                self.publish(Some(Arc::new(Versioned {
                    map,
                    revision: kv.mod_revision(),
                })));
            }
            Err(e) => {
                self.map_current = false;
                self.set_health(watching);
                error!(cluster = %self.cluster, error = %e, "the stored map cannot be used; keeping the last good one");
            }
        }
    }

    fn publish(&self, snapshot: Snapshot) {
        let is_newer = match (&*self.snapshot.borrow(), &snapshot) {
            (Some(old), Some(new)) => new.revision > old.revision,
            (None, None) => false,
            _ => true,
        };
        if !is_newer {
            return;
        }
        // Readers first, observer second: whoever hears of a version from the
        // observer finds it in `current()` already.
        let observed = snapshot.clone();
        self.snapshot.send_replace(snapshot);
        if let (Some(observer), Some(versioned)) = (&self.observer, observed) {
            let _ = observer.send(versioned);
        }
    }

    fn set_health(&self, watching: bool) {
        self.health.send_replace(CacheHealth {
            watching,
            synced_revision: self.synced_revision,
            map_current: self.map_current,
        });
    }
}
