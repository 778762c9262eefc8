//! The map's home in etcd: load, initialise, and change it with
//! compare-and-swap transactions that also append to the history.
//!
//! Key layout under `/shardline/<cluster>/`:
//! - `map`: the whole [`ClusterMap`] as JSON. Every change is one etcd
//!   transaction that succeeds only if `map` still has the mod-revision the
//!   writer read, so two writers can never both win from the same revision.
//! - `history/<version, 20 digits>`: one [`HistoryEntry`] per map version,
//!   written in the same transaction as the map (append-only: never rewritten).
//!
//! Other records of the cluster live beside these (jobs, proxies, two-phase
//! commit decisions): [`EtcdPaths`] names every key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, SortOrder,
    SortTarget, TlsOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};
use settings::EtcdSettings;

use crate::model::{ClusterMap, InvalidMap};

/// Where each thing of one cluster lives in etcd (the layout in the module
/// doc). Not to be confused with [`crate::keys`], the sharding-key values.
#[derive(Debug, Clone)]
pub struct EtcdPaths {
    prefix: String,
}

impl EtcdPaths {
    pub fn new(cluster: &str) -> EtcdPaths {
        EtcdPaths {
            prefix: format!("/shardline/{cluster}/"),
        }
    }
    /// Everything of this cluster.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn map(&self) -> String {
        format!("{}map", self.prefix)
    }
    pub fn history_prefix(&self) -> String {
        format!("{}history/", self.prefix)
    }
    pub fn history(&self, version: u64) -> String {
        format!("{}history/{version:020}", self.prefix)
    }
    /// Move jobs, one key per job (see [`crate::jobs`]).
    pub fn jobs_prefix(&self) -> String {
        format!("{}jobs/", self.prefix)
    }
    /// Live proxies, one leased key each (see [`crate::proxies`]).
    pub fn proxies_prefix(&self) -> String {
        format!("{}proxies/", self.prefix)
    }
    /// The registration of the proxy named `id`.
    pub fn proxy(&self, id: &str) -> String {
        format!("{}proxies/{id}", self.prefix)
    }
    /// Two-phase commit decision records, one key per global transaction id
    /// (written and read by the `twophase` crate).
    pub fn decisions_prefix(&self) -> String {
        format!("{}twophase/", self.prefix)
    }
    /// The decision record of global transaction `gid`.
    pub fn decision(&self, gid: &str) -> String {
        format!("{}twophase/{gid}", self.prefix)
    }
    /// The rebalancer leader election.
    pub fn election(&self) -> String {
        format!("{}rebalancer/leader", self.prefix)
    }
    /// The random salt that erasure records hash keys with (see
    /// [`MapStore::audit_salt`]).
    pub fn audit_salt(&self) -> String {
        format!("{}audit/salt", self.prefix)
    }
}

/// A map together with the etcd mod-revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub map: ClusterMap,
    /// etcd mod-revision of the `map` key: the compare-and-swap guard.
    pub revision: i64,
}

/// One change of the map: what, by whom, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The map version this change produced.
    pub version: u64,
    pub at_unix_ms: u64,
    pub actor: String,
    /// Short verb, e.g. `init`, `server add`, `table add`.
    pub action: String,
    /// Human-readable detail of the change.
    pub detail: String,
}

/// A description of a change a caller wants recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub action: String,
    pub detail: String,
}

impl Change {
    pub fn new(action: impl Into<String>, detail: impl Into<String>) -> Change {
        Change {
            action: action.into(),
            detail: detail.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd request failed: {} ({})", etcd_detail(.0), etcd_hint(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd settings: {0}")]
    Settings(String),
    #[error("etcd did not answer within {0:?}: check that etcd is running and reachable")]
    Timeout(Duration),
    #[error("cluster {0:?} is not initialised in etcd: run `shardctl init` first")]
    NotInitialized(String),
    #[error("cluster {0:?} is already initialised in etcd")]
    AlreadyInitialized(String),
    #[error("the map changed concurrently (read at revision {expected}): re-read it and retry")]
    Conflict { expected: i64 },
    #[error(transparent)]
    Invalid(#[from] InvalidMap),
    #[error("the stored map for cluster {cluster:?} cannot be decoded: {why}")]
    Corrupt { cluster: String, why: String },
    #[error("{0}")]
    Rejected(String),
}

/// Largest encoded map written (etcd's default request limit is 1.5 MiB).
const MAX_MAP_BYTES: usize = 1_400_000;

/// How long one etcd request may take before the store gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to etcd as `etcd` says: its endpoints, TLS (`https://`, a CA,
/// a client certificate) and login. Keep-alives make a dead etcd noticed on
/// idle watch streams too. Files (certificates, the password file) are read
/// on every call, so a reconnect picks up rotated ones.
pub async fn connect(etcd: &EtcdSettings) -> Result<Client, StoreError> {
    let options = connect_options(etcd)?;
    with_timeout(Client::connect(&etcd.endpoints, Some(options))).await
}

/// Checks what [`connect`] would check before connecting (files readable,
/// user and password together, TLS and endpoints agreeing), so that a
/// daemon whose watchers retry forever stops at startup instead.
pub fn check_settings(etcd: &EtcdSettings) -> Result<(), StoreError> {
    connect_options(etcd).map(drop)
}

fn connect_options(etcd: &EtcdSettings) -> Result<ConnectOptions, StoreError> {
    // etcd refuses pings more often than every 5 s (GOAWAY "too_many_pings");
    // require_leader makes a member cut off from its cluster fail requests and
    // watches instead of serving stale data. etcd's tokens expire (simple
    // tokens after 5 idle minutes): requests refused for that log in again
    // and are retried; streams opened before keep going (etcd checks a
    // token when a watch or keep-alive stream opens), and the watchers
    // reconnect with a fresh client when a stream ends.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
        .with_auto_token_refresh(true);
    if let Some(tls) = tls_options(etcd)? {
        options = options.with_tls(tls);
    }
    match (
        &etcd.user,
        etcd.password()
            .map_err(|e| StoreError::Settings(e.to_string()))?,
    ) {
        (Some(user), Some(password)) => options = options.with_user(user, password.expose()),
        (Some(user), None) => {
            return Err(StoreError::Settings(format!(
                "etcd user {user:?} has no password: set [etcd] password_file or \
                 SHARDLINE_ETCD_PASSWORD_FILE"
            )))
        }
        (None, Some(_)) => {
            return Err(StoreError::Settings(
                "an etcd password is set but no user: set [etcd] user or SHARDLINE_ETCD_USER"
                    .into(),
            ))
        }
        (None, None) => {}
    }
    Ok(options)
}

/// TLS as `etcd` asks for it, or `None` for plain `http://` endpoints.
fn tls_options(etcd: &EtcdSettings) -> Result<Option<TlsOptions>, StoreError> {
    if !etcd.uses_tls() {
        return Ok(None);
    }
    if let Some(plain) = etcd.endpoints.iter().find(|e| !e.starts_with("https://")) {
        return Err(StoreError::Settings(format!(
            "endpoint {plain} is not https:// but TLS is configured (ca_file, cert_file or \
             another https:// endpoint): use https:// for every etcd endpoint"
        )));
    }
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            StoreError::Settings(format!("cannot read etcd {what} {}: {e}", path.display()))
        })
    };
    let mut tls = TlsOptions::new();
    tls = match &etcd.ca_file {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read("ca_file", path)?)),
        None => tls.with_native_roots(),
    };
    match (&etcd.cert_file, &etcd.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read("cert_file", cert)?,
                read("key_file", key)?,
            ))
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Settings(
                "a client certificate needs both [etcd] cert_file and key_file \
                 (SHARDLINE_ETCD_CERT_FILE, SHARDLINE_ETCD_KEY_FILE)"
                    .into(),
            ))
        }
    }
    Ok(Some(tls))
}

/// What went wrong in an etcd request, with the transport's causes (a TLS
/// handshake refused says so only in the error's sources).
fn etcd_detail(error: &etcd_client::Error) -> String {
    settings::error_chain(error)
}

/// What to check for an etcd error.
fn etcd_hint(error: &etcd_client::Error) -> &'static str {
    let text = etcd_detail(error).to_lowercase();
    if text.contains("authentication failed")
        || text.contains("user name is empty")
        || text.contains("permission denied")
        || text.contains("invalid auth token")
        || text.contains("unauthenticated")
    {
        "check the etcd user and password: [etcd] user and password_file, or \
         SHARDLINE_ETCD_USER and SHARDLINE_ETCD_PASSWORD_FILE"
    } else if text.contains("certificate")
        || text.contains("tls")
        || text.contains("handshake")
        || text.contains("alert")
    {
        "check etcd's TLS settings: https:// endpoints, [etcd] ca_file, cert_file and key_file"
    } else {
        // An etcd that wants a client certificate and gets none closes the
        // connection after the TLS 1.3 handshake: the client sees only that.
        "is etcd running at the configured endpoints? If it wants TLS, check https:// \
         endpoints and [etcd] ca_file, cert_file and key_file (a client certificate)"
    }
}

/// An etcd request that fails with [`StoreError::Timeout`] after the store's
/// usual 10 s.
pub async fn with_timeout<T>(
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    with_deadline(REQUEST_TIMEOUT, future).await
}

/// An etcd request that fails with [`StoreError::Timeout`] after `deadline`.
pub async fn with_deadline<T>(
    deadline: Duration,
    future: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, future).await {
        Ok(result) => result.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout(deadline)),
    }
}

/// Milliseconds since the Unix epoch, for history timestamps.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads and writes one cluster's map in etcd.
#[derive(Clone)]
pub struct MapStore {
    client: Client,
    cluster: String,
    keys: EtcdPaths,
}

impl MapStore {
    pub async fn connect(etcd: &EtcdSettings, cluster: &str) -> Result<MapStore, StoreError> {
        Ok(MapStore::with_client(connect(etcd).await?, cluster))
    }

    pub fn with_client(client: Client, cluster: &str) -> MapStore {
        MapStore {
            client,
            cluster: cluster.to_string(),
            keys: EtcdPaths::new(cluster),
        }
    }

    pub fn keys(&self) -> &EtcdPaths {
        &self.keys
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// This cluster's audit salt: 32 random bytes, made by the first caller
    /// and the same for every later one. Records that must show *that*
    /// something happened to a key without showing the key (`shardctl
    /// erase`) keep a keyed hash of it, so an auditor with the salt can
    /// check a given key, while the history alone does not name it.
    pub async fn audit_salt(&self) -> Result<Vec<u8>, StoreError> {
        let key = self.keys.audit_salt();
        let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
            .iter()
            .flat_map(|u| u.as_bytes().to_vec())
            .collect();
        // Written only if absent: concurrent first callers agree on one.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), fresh, None)]);
        let mut kv = self.client.kv_client();
        with_timeout(kv.txn(txn)).await?;
        let response = with_timeout(kv.get(key.clone(), None)).await?;
        match response.kvs().first() {
            Some(stored) if stored.value().len() == 32 => Ok(stored.value().to_vec()),
            _ => Err(StoreError::Corrupt {
                cluster: self.cluster.clone(),
                why: format!("{key} does not hold a 32-byte salt"),
            }),
        }
    }

    /// The current map, or `None` if the cluster was never initialised.
    pub async fn try_load(&self) -> Result<Option<Versioned>, StoreError> {
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.get(self.keys.map(), None)).await?;
        match response.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                map: decode_map(&self.cluster, kv.value())?,
                revision: kv.mod_revision(),
            })),
        }
    }

    /// The current map; an error if the cluster was never initialised.
    pub async fn load(&self) -> Result<Versioned, StoreError> {
        self.try_load()
            .await?
            .ok_or_else(|| StoreError::NotInitialized(self.cluster.clone()))
    }

    /// Stores the first version of the map; fails if one exists already.
    pub async fn initialize(
        &self,
        mut map: ClusterMap,
        actor: &str,
    ) -> Result<Versioned, StoreError> {
        if map.cluster != self.cluster {
            return Err(StoreError::Rejected(format!(
                "map is for cluster {:?} but this store manages {:?}",
                map.cluster, self.cluster
            )));
        }
        map.version = 1;
        map.validate()?;
        let change = Change::new(
            "init",
            format!(
                "{} partitions over {} servers",
                map.partitions,
                map.servers.len()
            ),
        );
        let guard = Compare::create_revision(self.keys.map(), CompareOp::Equal, 0);
        match self.commit(guard, &[], &map, actor, &change).await? {
            Some(revision) => Ok(Versioned { map, revision }),
            None => Err(StoreError::AlreadyInitialized(self.cluster.clone())),
        }
    }

    /// Writes `next` as the successor of `current`, only if the stored map is
    /// still exactly `current` (same mod-revision). Validates `next` first.
    pub async fn compare_and_swap(
        &self,
        current: &Versioned,
        next: ClusterMap,
        actor: &str,
        change: &Change,
    ) -> Result<Versioned, StoreError> {
        self.compare_and_swap_guarded(current, next, actor, change, &[])
            .await
    }

    /// [`compare_and_swap`](Self::compare_and_swap) that also requires every
    /// compare in `guards` to hold (the rebalancer passes its election key, so
    /// a deposed leader's write fails). A failed guard reports a conflict.
    pub async fn compare_and_swap_guarded(
        &self,
        current: &Versioned,
        mut next: ClusterMap,
        actor: &str,
        change: &Change,
        guards: &[Compare],
    ) -> Result<Versioned, StoreError> {
        if next.cluster != current.map.cluster || next.partitions != current.map.partitions {
            return Err(StoreError::Rejected(
                "a change may not rename the cluster or change its partition count".into(),
            ));
        }
        next.version = current.map.version + 1;
        next.validate()?;
        let guard = Compare::mod_revision(self.keys.map(), CompareOp::Equal, current.revision);
        match self.commit(guard, guards, &next, actor, change).await? {
            Some(revision) => Ok(Versioned {
                map: next,
                revision,
            }),
            None => Err(StoreError::Conflict {
                expected: current.revision,
            }),
        }
    }

    /// Reads the map, applies `edit`, and writes it back; on a concurrent
    /// change, re-reads and applies `edit` again (up to a few times).
    /// `edit` returns the description of the change, or a refusal.
    pub async fn update<F>(&self, actor: &str, mut edit: F) -> Result<Versioned, StoreError>
    where
        F: FnMut(&mut ClusterMap) -> Result<Change, String>,
    {
        const ATTEMPTS: usize = 8;
        let mut last_conflict = None;
        for _ in 0..ATTEMPTS {
            let current = self.load().await?;
            let mut next = current.map.clone();
            let change = edit(&mut next).map_err(StoreError::Rejected)?;
            match self.compare_and_swap(&current, next, actor, &change).await {
                Err(conflict @ StoreError::Conflict { .. }) => last_conflict = Some(conflict),
                other => return other,
            }
        }
        Err(last_conflict.unwrap_or(StoreError::Conflict { expected: 0 }))
    }

    /// Runs the guarded transaction; `None` when the guard failed.
    async fn commit(
        &self,
        guard: Compare,
        extra_guards: &[Compare],
        map: &ClusterMap,
        actor: &str,
        change: &Change,
    ) -> Result<Option<i64>, StoreError> {
        let entry = HistoryEntry {
            version: map.version,
            at_unix_ms: now_unix_ms(),
            actor: actor.to_string(),
            action: change.action.clone(),
            detail: change.detail.clone(),
        };
        let map_json = serde_json::to_vec(map).map_err(|e| StoreError::Rejected(e.to_string()))?;
        let entry_json =
            serde_json::to_vec(&entry).map_err(|e| StoreError::Rejected(e.to_string()))?;
        if map_json.len() > MAX_MAP_BYTES {
            return Err(StoreError::Rejected(format!(
                "the encoded map is {} bytes, over the {MAX_MAP_BYTES}-byte limit of one etcd request: \
                 use fewer partitions or shorter server names",
                map_json.len()
            )));
        }
        let history_key = self.keys.history(map.version);
        let mut compares = vec![
            guard,
            // Append-only: never overwrite an existing history entry.
            Compare::create_revision(history_key.clone(), CompareOp::Equal, 0),
        ];
        compares.extend(extra_guards.iter().cloned());
        let txn = Txn::new().when(compares).and_then([
            TxnOp::put(self.keys.map(), map_json, None),
            TxnOp::put(history_key, entry_json, None),
        ]);
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.txn(txn)).await?;
        if !response.succeeded() {
            return Ok(None);
        }
        let revision = response.header().map(|h| h.revision()).ok_or_else(|| {
            StoreError::Rejected("etcd answered a transaction without a header".into())
        })?;
        Ok(Some(revision))
    }

    /// History entries, oldest first; with `limit`, only the newest `limit`.
    pub async fn history(&self, limit: Option<usize>) -> Result<Vec<HistoryEntry>, StoreError> {
        if limit == Some(0) {
            // etcd reads a limit of 0 as "no limit".
            return Ok(Vec::new());
        }
        let mut options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend);
        if let Some(limit) = limit {
            options = options.with_limit(limit as i64);
        }
        let mut kv = self.client.kv_client();
        let response = with_timeout(kv.get(self.keys.history_prefix(), Some(options))).await?;
        let mut entries = response
            .kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<HistoryEntry>(kv.value()).map_err(|e| {
                    StoreError::Corrupt {
                        cluster: self.cluster.clone(),
                        why: format!("history entry {}: {e}", String::from_utf8_lossy(kv.key())),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        entries.reverse();
        Ok(entries)
    }
}

/// Decodes a stored map and checks it belongs to `cluster` and is valid.
pub fn decode_map(cluster: &str, bytes: &[u8]) -> Result<ClusterMap, StoreError> {
    let map: ClusterMap = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        cluster: cluster.to_string(),
        why: e.to_string(),
    })?;
    if map.cluster != cluster {
        return Err(StoreError::Corrupt {
            cluster: cluster.to_string(),
            why: format!("it names cluster {:?}", map.cluster),
        });
    }
    map.validate().map_err(|e| StoreError::Corrupt {
        cluster: cluster.to_string(),
        why: e.to_string(),
    })?;
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_settings_that_cannot_work_are_refused_before_connecting() {
        let refused = |etcd: EtcdSettings| match check_settings(&etcd) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("{etcd:?} accepted"),
        };
        let plain = EtcdSettings::at(vec!["http://e:2379".into()]);
        assert!(check_settings(&plain).is_ok());
        let user_only = refused(EtcdSettings {
            user: Some("u".into()),
            ..plain.clone()
        });
        assert!(user_only.contains("password_file"), "{user_only}");
        let password_only = refused(EtcdSettings {
            password: Some(settings::Password::new("hunter2")),
            ..plain.clone()
        });
        assert!(password_only.contains("no user") && !password_only.contains("hunter2"));
        let dir = std::env::temp_dir().join(format!("shardmap-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pem = dir.join("ca.crt");
        std::fs::write(&pem, "not checked before connecting").expect("write");
        let mixed = refused(EtcdSettings {
            ca_file: Some(pem.clone()),
            ..plain.clone()
        });
        assert!(mixed.contains("https://"), "{mixed}");
        let tls = EtcdSettings::at(vec!["https://e:2379".into()]);
        let half = refused(EtcdSettings {
            cert_file: Some(pem.clone()),
            ..tls.clone()
        });
        assert!(half.contains("key_file"), "{half}");
        let missing = refused(EtcdSettings {
            ca_file: Some(dir.join("missing.crt")),
            ..tls.clone()
        });
        assert!(missing.contains("missing.crt"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_path_of_a_cluster_is_under_its_prefix() {
        let paths = EtcdPaths::new("prod");
        assert_eq!(paths.map(), "/shardline/prod/map");
        assert_eq!(
            paths.history(7),
            "/shardline/prod/history/00000000000000000007"
        );
        // A registration is found by listing the proxies prefix.
        assert_eq!(paths.proxy("p1"), format!("{}p1", paths.proxies_prefix()));
        for path in [
            paths.map(),
            paths.history_prefix(),
            paths.jobs_prefix(),
            paths.election(),
        ] {
            assert!(path.starts_with(paths.prefix()), "{path}");
        }
    }
}
