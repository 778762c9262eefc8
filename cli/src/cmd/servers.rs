//! `shardctl server ...`: add, list, drain, activate and remove the
//! Postgres servers of the map. Adding one also creates the map's tables
//! there (no leaves: it owns no partitions until a move) and copies the
//! reference tables' rows to it before it serves (see `join`).

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use rebalancer::pg::{Credentials, Pg};
use serde::Serialize;
use shardmap::{Change, Endpoint, Server, ServerState, TableKind};

use crate::cmd::join::join;
use crate::context::Context;
use crate::output::{print_json, table as new_table};

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Add a server: create the tables there and copy the reference tables'
    /// rows to it (it owns no partitions until a move or rebalance). Run it
    /// again to resume an add that was interrupted.
    Add {
        name: String,
        /// postgres://user@host:port/dbname (no password).
        url: String,
        #[arg(long)]
        region: Option<String>,
        /// A read replica URL (repeat).
        #[arg(long = "replica")]
        replicas: Vec<String>,
    },
    /// List servers with their partition counts.
    List,
    /// Mark a server draining: the rebalancer moves its partitions away and places none on it.
    Drain { name: String },
    /// Mark a draining server active again.
    Activate { name: String },
    /// Remove a server that owns no partitions and is no table's home.
    Remove { name: String },
}

#[derive(Serialize)]
struct ServerRow<'a> {
    name: &'a str,
    primary: String,
    replicas: Vec<String>,
    region: Option<&'a str>,
    state: ServerState,
    partitions: usize,
}

pub async fn server(context: &Context, command: ServerCommand) -> Result<()> {
    match command {
        ServerCommand::Add {
            name,
            url,
            region,
            replicas,
        } => {
            let primary = Endpoint::parse(&url).map_err(|e| anyhow!("server {name}: {e}"))?;
            let replicas = replicas
                .iter()
                .map(|r| Endpoint::parse(r).map_err(|e| anyhow!("replica of {name}: {e}")))
                .collect::<Result<Vec<_>>>()?;
            let store = context.store().await?;
            let current = store.load().await?;
            let map = match current.map.servers.get(&name) {
                // An add that did not finish: resume it.
                Some(server) if server.state == ServerState::Joining && server.primary == primary => {
                    current.map
                }
                Some(server) if server.state == ServerState::Joining => bail!(
                    "server {name:?} is joining at {}, not {primary}: finish that add, or `shardctl server remove {name}` first",
                    server.primary
                ),
                Some(_) => bail!("server {name:?} already exists"),
                None => {
                    store
                        .update(&context.actor, |map| {
                            if map.servers.contains_key(&name) {
                                return Err(format!("server {name:?} already exists"));
                            }
                            if let Some(other) = map.joining_server() {
                                return Err(format!(
                                    "server {:?} is still joining: finish its `shardctl server add` first (or remove it)",
                                    other.name
                                ));
                            }
                            map.servers.insert(
                                name.clone(),
                                Server {
                                    name: name.clone(),
                                    primary: primary.clone(),
                                    replicas: replicas.clone(),
                                    region: region.clone(),
                                    state: ServerState::Joining,
                                },
                            );
                            Ok(Change::new("server add", format!("{name} at {primary} (joining)")))
                        })
                        .await?
                        .map
                }
            };
            let joined = join(context, &map, &name).await?;
            let saved = &joined;
            let tables = joined.tables_created;
            let prepared_max = match saved.map.servers.get(&name) {
                Some(server) => max_prepared_transactions(server, &context.credentials()?).await,
                None => None,
            };
            if prepared_max == Some(0) {
                eprintln!("{}", two_phase_warning(&name));
            }
            if context.json {
                return print_json(&serde_json::json!({
                    "version": saved.map.version,
                    "revision": saved.revision,
                    "tables_created": tables,
                    "reference_rows_copied": saved.copied.iter().map(|(t, n)| (t.clone(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
                    "copied_from": saved.source,
                    "max_prepared_transactions": prepared_max,
                }));
            }
            println!(
                "map version {} saved; {tables} tables created on {name} (no leaves: it owns no partitions yet)",
                saved.map.version
            );
            if let Some(source) = &saved.source {
                let copied: Vec<String> = saved.copied.iter().map(|(t, n)| format!("{t} ({n} rows)")).collect();
                println!("reference tables copied from {source}: {}", copied.join(", "));
            }
            Ok(())
        }
        ServerCommand::List => {
            let map = context.store().await?.load().await?.map;
            let by_server = map.partitions_by_server();
            let rows: Vec<ServerRow> = map
                .servers
                .values()
                .map(|s| ServerRow {
                    name: &s.name,
                    primary: s.primary.to_string(),
                    replicas: s.replicas.iter().map(ToString::to_string).collect(),
                    region: s.region.as_deref(),
                    state: s.state,
                    partitions: by_server.get(s.name.as_str()).map_or(0, Vec::len),
                })
                .collect();
            if context.json {
                return print_json(&rows);
            }
            let mut out = new_table(&["server", "primary", "replicas", "region", "state", "partitions"]);
            for row in &rows {
                out.add_row(vec![
                    row.name.to_string(),
                    row.primary.clone(),
                    if row.replicas.is_empty() { "-".into() } else { row.replicas.join(", ") },
                    row.region.unwrap_or("-").to_string(),
                    row.state.to_string(),
                    row.partitions.to_string(),
                ]);
            }
            println!("{out}");
            Ok(())
        }
        ServerCommand::Drain { name } => set_server_state(context, name, ServerState::Draining).await,
        ServerCommand::Activate { name } => set_server_state(context, name, ServerState::Active).await,
        ServerCommand::Remove { name } => {
            context
                .change(|map| {
                    if !map.servers.contains_key(&name) {
                        return Err(format!("no server named {name:?}"));
                    }
                    let owned = map.assignments.iter().filter(|a| a.owner == name).count();
                    if owned > 0 {
                        return Err(format!(
                            "server {name:?} still owns {owned} partitions: drain it and let the rebalancer move them first"
                        ));
                    }
                    if let Some(table) = map
                        .tables
                        .values()
                        .find(|t| matches!(&t.kind, TableKind::Unsharded { home } if *home == name))
                    {
                        return Err(format!("server {name:?} is the home of unsharded table {:?}", table.name));
                    }
                    map.servers.remove(&name);
                    Ok(Change::new("server remove", name.clone()))
                })
                .await
        }
    }
}

async fn set_server_state(context: &Context, name: String, state: ServerState) -> Result<()> {
    context
        .change(|map| {
            let server = map
                .servers
                .get_mut(&name)
                .ok_or_else(|| format!("no server named {name:?}: see `shardctl server list`"))?;
            if server.state == state {
                return Err(format!("server {name:?} is already {state}"));
            }
            if server.state == ServerState::Joining {
                return Err(format!(
                    "server {name:?} is still joining: run its `shardctl server add` again to finish, or `shardctl server remove {name}`"
                ));
            }
            server.state = state;
            let action = if state == ServerState::Draining {
                "server drain"
            } else {
                "server activate"
            };
            Ok(Change::new(action, name.clone()))
        })
        .await
}

/// The server's `max_prepared_transactions`, or `None` if it cannot be read
/// (the caller reports unreachable servers its own way).
async fn max_prepared_transactions(server: &Server, credentials: &Credentials) -> Option<i64> {
    let pg = Pg::connect(server, credentials, "shardctl").await.ok()?;
    pg.max_prepared_transactions().await.ok()
}

/// What to tell a DBA whose server refuses two-phase commit.
pub(crate) fn two_phase_warning(server: &str) -> String {
    format!(
        "warning: server {server} has max_prepared_transactions = 0, so transactions that write on several \
         servers (two-phase commit) cannot include it: set it in its postgresql.conf (e.g. 64, at least as many \
         as the proxies' connections that may commit at once) and restart it"
    )
}
