//! `shardctl server add`, the part after the map: a new server joins with
//! its tables created and every reference table's rows copied from a
//! serving server, before it takes any statement.
//!
//! Why the copy cannot miss a reference-table write:
//! 1. The server is recorded as `joining`. Proxies send it nothing, and
//!    they *hold* reference-table writes while any server is joining.
//! 2. Its tables are created (parents with no leaves; reference tables).
//! 3. Every registered proxy acknowledges that map version (or its lease
//!    goes): no reference write routed under the older map — to the old
//!    servers only — is still being sent.
//! 4. On the source server, one transaction locks every reference table
//!    `IN SHARE MODE`. The lock waits for transactions that already wrote
//!    a reference table (routed before step 1 and still open, or prepared
//!    by two-phase commit) and keeps anyone from writing one until it is
//!    released. Its snapshot, taken after the lock, sees all of their rows;
//!    the rows go to the new server by binary COPY, in one transaction
//!    there (TRUNCATE first, so a resumed add starts clean).
//! 5. The server turns `active` in the map, and only then is the lock
//!    released: held writes now route to every server, the new one too.
//!    Had the lock been released before, a write from a transaction that
//!    began before step 1 could still have committed on the old servers only.
//!
//! Any failure before step 5 takes the server out of the map again (its
//! tables stay, and a second `server add` reuses them); a crash leaves it
//! `joining`, and running the same `server add` again resumes.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rebalancer::pg::{ident, literal, Pg};
use shardmap::{Change, ClusterMap, ServerState, TableKind};

use crate::cmd::tables::run_table_ddl;
use crate::context::Context;

/// How long the proxies get to acknowledge the joining map (longer than a
/// proxy's 10 s lease, so a proxy that is gone drops out by then).
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the source's reference tables may take to lock (a transaction
/// that wrote one must end first).
const LOCK_TIMEOUT: &str = "10s";

/// What a finished join did.
pub struct Joined {
    pub tables_created: usize,
    /// (reference table, rows copied).
    pub copied: Vec<(String, u64)>,
    /// The server the rows came from (none when there was nothing to copy).
    pub source: Option<String>,
    /// The map once the server is active.
    pub map: ClusterMap,
    pub revision: i64,
}

/// Steps 2–5 for server `name`, which `map` records as joining.
pub async fn join(context: &Context, map: &ClusterMap, name: &str) -> Result<Joined> {
    match join_steps(context, map, name).await {
        Ok(joined) => Ok(joined),
        Err(e) => {
            let removed = context
                .store()
                .await?
                .update(&context.actor, |map| match map.servers.get(name) {
                    Some(s) if s.state == ServerState::Joining => {
                        map.servers.remove(name);
                        Ok(Change::new(
                            "server add failed",
                            format!("{name} removed again: {e:#}"),
                        ))
                    }
                    _ => Err(format!("server {name} is no longer joining")),
                })
                .await;
            let what = match removed {
                Ok(_) => "it was taken out of the map again (tables created there stay; `shardctl server add` reuses them)".to_string(),
                Err(r) => format!("it could not be taken out of the map ({r}): run `shardctl server add` again to resume, or `shardctl server remove {name}`"),
            };
            Err(e.context(format!("adding server {name} failed; {what}")))
        }
    }
}

async fn join_steps(context: &Context, map: &ClusterMap, name: &str) -> Result<Joined> {
    let credentials = &context.credentials()?;
    let server = map
        .servers
        .get(name)
        .ok_or_else(|| anyhow!("server {name} is not in the map"))?;
    // 2. Tables (those already there from an earlier, interrupted add stay).
    let target = Pg::connect(server, credentials, "shardctl").await?;
    let mut tables_created = 0;
    for (table, columns) in &map.columns {
        if !map.tables.contains_key(table) || exists(&target, table).await? {
            continue;
        }
        if run_table_ddl(map, table, columns, server, credentials)
            .await?
            .is_some()
        {
            tables_created += 1;
        }
    }
    // 2b. Indexes made after the tables (CREATE INDEX through the proxy
    // reaches the servers but not the map's column list): copied from a
    // serving server's parents, so the leaves the new server gets later
    // inherit them — a unique index missing there would let duplicates in.
    let indexes_from = map.serving_servers().find(|s| s.name != name);
    if let Some(source) = indexes_from {
        let source_pg = Pg::connect(source, credentials, "shardctl").await?;
        for table in map.tables.keys() {
            if exists(&target, table).await? {
                copy_indexes(&source_pg, &target, table)
                    .await
                    .with_context(|| {
                        format!("copying the indexes of {table} from server {}", source.name)
                    })?;
            }
        }
    }
    // 3. Every proxy routes with the map that says "joining".
    wait_for_acknowledgements(context, map.version).await?;
    // 4. Copy the reference tables under a share lock on the source.
    let references: Vec<&str> = map
        .tables
        .values()
        .filter(|t| matches!(t.kind, TableKind::Reference))
        .map(|t| t.name.as_str())
        .collect();
    let mut skipped = Vec::new();
    let mut to_copy = Vec::new();
    for table in references {
        if exists(&target, table).await? {
            to_copy.push(table);
        } else {
            skipped.push(table);
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "warning: reference tables {} have no recorded columns (not made with `shardctl table create`), so they were not created on {name}: create and fill them there yourself",
            skipped.join(", ")
        );
    }
    let source = map
        .serving_servers()
        .find(|s| s.name != name)
        .ok_or_else(|| {
            anyhow!("there is no other serving server to copy the reference tables from")
        })?;
    let mut copied = Vec::new();
    let source_pg = Pg::connect(source, credentials, "shardctl").await?;
    if !to_copy.is_empty() {
        let list = to_copy
            .iter()
            .map(|t| ident(t))
            .collect::<Vec<_>>()
            .join(", ");
        source_pg
            .client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL lock_timeout = {}; LOCK TABLE {list} IN SHARE MODE",
                literal(LOCK_TIMEOUT)
            ))
            .await
            .with_context(|| format!("locking the reference tables on server {}", source.name))?;
        target
            .client
            .batch_execute(&format!("BEGIN; TRUNCATE {list}"))
            .await
            .with_context(|| format!("emptying the reference tables on {name}"))?;
        for table in &to_copy {
            let rows = copy_table(&source_pg, &target, table).await?;
            copied.push((table.to_string(), rows));
        }
        target
            .client
            .batch_execute("COMMIT")
            .await
            .with_context(|| format!("committing the copied rows on {name}"))?;
    }
    // 5. Active, then release the lock.
    let saved = context
        .store()
        .await?
        .update(&context.actor, |map| {
            let server = map
                .servers
                .get_mut(name)
                .ok_or_else(|| format!("server {name} disappeared from the map"))?;
            if server.state != ServerState::Joining {
                return Err(format!("server {name} is {}, not joining", server.state));
            }
            server.state = ServerState::Active;
            Ok(Change::new(
                "server active",
                format!("{name} joined with its reference tables copied"),
            ))
        })
        .await?;
    if !to_copy.is_empty() {
        // Ending the transaction releases the lock; its outcome changes nothing.
        let _ = source_pg.client.batch_execute("COMMIT").await;
    }
    Ok(Joined {
        tables_created,
        copied,
        source: (!to_copy.is_empty()).then(|| source.name.clone()),
        map: saved.map,
        revision: saved.revision,
    })
}

/// The indexes of `table` on `source` that `target` lacks (by name), made
/// there. A partitioned parent's index is defined `ON ONLY` the parent; on
/// the target it is made on the whole table, so that its leaves get it.
async fn copy_indexes(source: &Pg, target: &Pg, table: &str) -> Result<()> {
    const INDEXES: &str = "SELECT indexname, indexdef FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename = $1";
    let have: Vec<String> = target
        .client
        .query(INDEXES, &[&table])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for row in source.client.query(INDEXES, &[&table]).await? {
        let (index, definition): (String, String) = (row.get(0), row.get(1));
        if have.contains(&index) {
            continue;
        }
        let definition = definition.replacen(" ON ONLY ", " ON ", 1);
        target
            .client
            .batch_execute(&definition)
            .await
            .with_context(|| format!("creating index {index}"))?;
    }
    Ok(())
}

async fn exists(pg: &Pg, table: &str) -> Result<bool> {
    let row = pg
        .client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("public.{}", ident(table))],
        )
        .await
        .with_context(|| format!("looking for table {table} on server {}", pg.server))?;
    Ok(row.get(0))
}

/// Waits until every registered proxy acknowledges map `version`.
async fn wait_for_acknowledgements(context: &Context, version: u64) -> Result<()> {
    let (etcd, settings) = context.etcd().await?;
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        let proxies = shardmap::proxies::list(&etcd, &settings.cluster).await?;
        let waiting: Vec<String> = proxies
            .iter()
            .filter(|p| p.record.acked_map_version < version)
            .map(|p| p.record.id.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "proxies {} did not acknowledge map version {version} within {ACK_TIMEOUT:?}",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Streams `table`'s rows from `source` to `target` (both inside their
/// transactions) as binary COPY, with a progress bar; the rows copied.
async fn copy_table(source: &Pg, target: &Pg, table: &str) -> Result<u64> {
    // The columns COPY can write (not generated ones), named on both sides
    // so the order cannot differ.
    let columns: Vec<String> = target
        .client
        .query(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 \
             AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&format!("public.{}", ident(table))],
        )
        .await
        .with_context(|| format!("reading the columns of {table} on server {}", target.server))?
        .iter()
        .map(|row| ident(row.get::<_, &str>(0)))
        .collect();
    let list = columns.join(", ");
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>24} {bytes} ({bytes_per_sec}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(table.to_string());
    bar.set_message(format!("{} -> {}", source.server, target.server));
    bar.enable_steady_tick(Duration::from_millis(100));
    let out = source
        .client
        .copy_out(&format!(
            "COPY {} ({list}) TO STDOUT (FORMAT binary)",
            ident(table)
        ))
        .await
        .with_context(|| format!("reading {table} on server {}", source.server))?;
    let sink = target
        .client
        .copy_in::<_, Bytes>(&format!(
            "COPY {} ({list}) FROM STDIN (FORMAT binary)",
            ident(table)
        ))
        .await
        .with_context(|| format!("writing {table} on server {}", target.server))?;
    pin_mut!(out);
    pin_mut!(sink);
    while let Some(chunk) = out.next().await {
        let chunk =
            chunk.with_context(|| format!("reading {table} on server {}", source.server))?;
        bar.inc(chunk.len() as u64);
        sink.send(chunk)
            .await
            .with_context(|| format!("writing {table} on server {}", target.server))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .with_context(|| format!("writing {table} on server {}", target.server))?;
    bar.finish_with_message(format!(
        "{rows} rows {} -> {}",
        source.server, target.server
    ));
    Ok(rows)
}
