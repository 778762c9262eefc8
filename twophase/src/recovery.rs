//! Recovery: resolves the prepared transactions a crashed proxy left on the
//! servers, by their recorded decision (presumed abort), and deletes the
//! decision records nothing needs any more.
//!
//! A gid's writer is *alive* while the proxy's registration key is bound to
//! the lease the gid was made under. An alive writer may still be about to
//! record its commit, so its transactions are never touched. A dead one can
//! no longer record anything ([`crate::DecisionStore::record_commit`] is
//! guarded by that same lease), so the decision read after seeing it dead is
//! final: `commit` → COMMIT PREPARED; no record → `abort` is recorded (by
//! `settle`, which also stops any late commit) → ROLLBACK PREPARED.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use etcd_client::Client;
use settings::Credentials;
use shardmap::store::{EtcdPaths, StoreError};
use shardmap::{ClusterMap, Server};
use tokio::task::JoinSet;
use tokio_postgres::error::SqlState;
use tracing::{debug, info, warn};

use crate::decisions::{Decision, DecisionStore};
use crate::gid::{Gid, GID_PREFIX};

/// Whose prepared transactions a run resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every proxy's whose writer is not alive (the rebalancer leader).
    DeadWriters,
    /// Those of proxy `proxy_id`, of every incarnation, alive or not: a
    /// proxy starting has made none yet, so any it finds are its earlier
    /// life's (whose lease may not have run out yet). Two processes must
    /// never share a proxy id. Other proxies' are left alone.
    OwnEarlier { proxy_id: String },
}

/// One recovery run.
#[derive(Debug, Clone)]
pub struct Recovery<'a> {
    pub cluster: &'a str,
    /// The servers to look at: every server of this map (primaries).
    pub map: &'a ClusterMap,
    pub credentials: &'a Credentials,
    pub scope: Scope,
    /// Who runs it, recorded in the abort records it writes (e.g.
    /// `rebalancer:<id>`, `proxy:<id>`).
    pub actor: String,
    /// Longest wait for connecting to and listing one server, and for each
    /// COMMIT/ROLLBACK PREPARED there: a server that is down is reported,
    /// not waited for.
    pub server_timeout: Duration,
}

/// What a run did on one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerReport {
    pub committed: usize,
    pub rolled_back: usize,
    /// Prepared transactions not touched: an alive writer's, outside the
    /// scope, or named `sl_...` without being a valid gid.
    pub left_alone: usize,
    /// Why the server could not be (fully) recovered.
    pub error: Option<String>,
}

/// What a run did, per server; see [`recover`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub servers: BTreeMap<String, ServerReport>,
    /// Decision records deleted (their gids are prepared nowhere any more).
    pub records_deleted: usize,
}

impl RecoveryReport {
    pub fn committed(&self) -> usize {
        self.servers.values().map(|s| s.committed).sum()
    }
    pub fn rolled_back(&self) -> usize {
        self.servers.values().map(|s| s.rolled_back).sum()
    }
    pub fn left_alone(&self) -> usize {
        self.servers.values().map(|s| s.left_alone).sum()
    }
    /// Servers that could not be recovered, with the reason.
    pub fn errors(&self) -> Vec<(&str, &str)> {
        self.servers
            .iter()
            .filter_map(|(name, s)| Some((name.as_str(), s.error.as_deref()?)))
            .collect()
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} committed, {} rolled back, {} left alone on {} servers; {} decision records deleted",
            self.committed(),
            self.rolled_back(),
            self.left_alone(),
            self.servers.len(),
            self.records_deleted
        )?;
        for (server, error) in self.errors() {
            write!(f, "; {server}: {error}")?;
        }
        Ok(())
    }
}

/// Resolves, on every server of the map, the prepared transactions of
/// shardline whose writer is dead (or, with [`Scope::OwnEarlier`], that
/// this proxy's earlier life left), then deletes the decision records of
/// dead writers' gids that are prepared nowhere any more. Servers that cannot
/// be reached are reported in the result; records are deleted only when
/// every server was checked. Fails only when etcd cannot be read or written.
pub async fn recover(etcd: &Client, run: &Recovery<'_>) -> Result<RecoveryReport, StoreError> {
    // Registrations are read first: a writer dead at this point stays dead,
    // so every decision read afterwards is final.
    let prefix = EtcdPaths::new(run.cluster).proxies_prefix();
    let alive: HashMap<String, i64> = shardmap::proxies::list(etcd, run.cluster)
        .await?
        .into_iter()
        .filter_map(|p| Some((p.key.strip_prefix(&prefix)?.to_string(), p.lease)))
        .collect();
    let in_scope = |gid: &Gid| match &run.scope {
        Scope::DeadWriters => alive.get(gid.proxy()) != Some(&gid.incarnation()),
        Scope::OwnEarlier { proxy_id } => gid.proxy() == proxy_id,
    };

    let mut report = RecoveryReport::default();
    let mut listed = Vec::new();
    for (name, result) in list_servers(run).await {
        let entry = report.servers.entry(name.clone()).or_default();
        match result {
            Ok((client, gids)) => listed.push((name, client, gids)),
            Err(e) => entry.error = Some(e),
        }
    }

    let store = DecisionStore::new(etcd.clone(), run.cluster);
    let mut decided: HashMap<String, Decision> = HashMap::new();
    // Gids still prepared somewhere after this run.
    let mut remaining: HashSet<String> = HashSet::new();
    for (name, client, gids) in &listed {
        let mut server = ServerReport::default();
        for text in gids {
            let gid = match Gid::parse(text) {
                Ok(gid) if in_scope(&gid) => gid,
                _ => {
                    server.left_alone += 1;
                    remaining.insert(text.clone());
                    continue;
                }
            };
            let decision = match decided.get(text) {
                Some(decision) => *decision,
                None => match final_decision(&store, &gid, &run.actor).await {
                    Ok(decision) => {
                        decided.insert(text.clone(), decision);
                        decision
                    }
                    // An undecodable record: that gid waits for a human.
                    Err(StoreError::Rejected(why)) => {
                        server.error.get_or_insert(why);
                        remaining.insert(text.clone());
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let sql = match decision {
                Decision::Commit => format!("COMMIT PREPARED {}", gid.literal()),
                Decision::Abort => format!("ROLLBACK PREPARED {}", gid.literal()),
            };
            match tokio::time::timeout(run.server_timeout, client.batch_execute(&sql)).await {
                Ok(Ok(())) => match decision {
                    Decision::Commit => server.committed += 1,
                    Decision::Abort => server.rolled_back += 1,
                },
                // Another recoverer (or the writer itself) finished it first.
                Ok(Err(e)) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                    debug!(server = %name, %gid, "prepared transaction already resolved")
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => format!("{sql} failed: {}", error_chain(&e)),
                        _ => format!("{sql} did not finish within {:?}", run.server_timeout),
                    };
                    server.error.get_or_insert(why);
                    remaining.insert(text.clone());
                }
            }
        }
        report.servers.insert(name.clone(), server);
    }

    if report.errors().is_empty() {
        report.records_deleted = forget_finished(&store, run, &in_scope, &remaining).await?;
    }
    if report.committed() + report.rolled_back() + report.records_deleted > 0 {
        info!(cluster = %run.cluster, scope = ?run.scope, "two-phase recovery: {report}");
    } else {
        debug!(cluster = %run.cluster, scope = ?run.scope, "two-phase recovery: {report}");
    }
    for (server, error) in report.errors() {
        warn!(cluster = %run.cluster, %server, %error, "two-phase recovery could not check this server; it is tried again next time");
    }
    Ok(report)
}

/// The recorded decision of a dead writer's `gid`, or `abort`, recorded now.
async fn final_decision(
    store: &DecisionStore,
    gid: &Gid,
    actor: &str,
) -> Result<Decision, StoreError> {
    match store.decision(gid).await? {
        Some(record) => Ok(record.decision),
        None => store.settle(gid, actor).await,
    }
}

/// Deletes the records of in-scope gids prepared nowhere: `remaining` holds
/// what is still prepared on the servers, all of which were listed before
/// these records were read (a commit record is written only after every
/// PREPARE, so a gid missing from every listing is finished everywhere).
async fn forget_finished(
    store: &DecisionStore,
    run: &Recovery<'_>,
    in_scope: &impl Fn(&Gid) -> bool,
    remaining: &HashSet<String>,
) -> Result<usize, StoreError> {
    let mut deleted = 0;
    for stored in store.list().await? {
        let Some(gid) = &stored.gid else {
            debug!(key = %stored.key, "not a shardline gid: decision record kept");
            continue;
        };
        let participants_known = stored.record.as_ref().is_some_and(|record| {
            record
                .participants
                .iter()
                .all(|server| run.map.servers.contains_key(server))
        });
        if !in_scope(gid) || remaining.contains(gid.as_str()) || !participants_known {
            continue;
        }
        if store.remove(&stored).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Connects to every server at once; each answers with its shardline gids.
async fn list_servers(
    run: &Recovery<'_>,
) -> Vec<(
    String,
    Result<(tokio_postgres::Client, Vec<String>), String>,
)> {
    let mut tasks = JoinSet::new();
    for server in run.map.servers.values() {
        let server = server.clone();
        let password = run
            .credentials
            .password_for_server(&server.name)
            .map(str::to_string);
        let tls = run.credentials.tls_for_server(&server.name);
        let timeout = run.server_timeout;
        tasks.spawn(async move {
            let listed = tokio::time::timeout(timeout, list_one(&server, password, tls, timeout))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer from {} within {timeout:?}",
                        server.primary
                    ))
                });
            (server.name, listed)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(e) => warn!(error = %e, "a two-phase recovery task failed"),
        }
    }
    results
}

async fn list_one(
    server: &Server,
    password: Option<String>,
    tls: Result<settings::BackendTls, String>,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, Vec<String>), String> {
    let tls = tls?;
    let e = &server.primary;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&e.host)
        .port(e.port)
        .user(&e.user)
        .dbname(&e.dbname)
        .application_name("shardline_recovery")
        .connect_timeout(timeout);
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = pgtls::connect(config, &tls)
        .await
        .map_err(|err| format!("cannot connect to {}: {err}", server.primary))?;
    tokio::spawn(async move {
        // Ends when the client is dropped; an error then is of no interest.
        let _ = connection.await;
    });
    // Only this database's: COMMIT PREPARED must run in the transaction's own.
    let rows = client
        .query(
            "SELECT gid FROM pg_prepared_xacts \
             WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared",
            &[&GID_PREFIX],
        )
        .await
        .map_err(|err| format!("cannot list prepared transactions: {}", error_chain(&err)))?;
    let gids = rows
        .iter()
        .map(|row| row.try_get::<_, String>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("cannot read pg_prepared_xacts: {err}"))?;
    Ok((client, gids))
}

/// An error with its causes (tokio-postgres keeps the useful part in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
