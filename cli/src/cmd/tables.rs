//! `shardctl table ...`: declare sharded, reference and unsharded tables in
//! the map, and create them on the servers (parents and leaves, as the map
//! places them).

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Subcommand;
use rebalancer::pg::{Credentials, Pg};
use serde::Serialize;
use shardmap::{Change, ClusterMap, KeyType, Server, Table, TableKind};

use crate::cmd::groups::GroupSpec;
use crate::context::Context;
use crate::output::{print_json, table as new_table};

#[derive(Debug, Subcommand)]
pub enum TableCommand {
    /// Declare a table: sharded (--key, with --group or a new group's --method/--key-type),
    /// reference (--reference) or unsharded (--home SERVER).
    Add {
        name: String,
        /// Sharding-key column.
        #[arg(long)]
        key: Option<String>,
        /// Co-location group (default: a group named after the table).
        #[arg(long)]
        group: Option<String>,
        /// The key column holds embedded ids made for the group's partitions.
        #[arg(long = "embedded-id")]
        embedded_id: bool,
        /// A small table copied to every server.
        #[arg(long, conflicts_with_all = ["key", "group", "home", "embedded_id"])]
        reference: bool,
        /// An unsharded table living on this server.
        #[arg(long, conflicts_with_all = ["key", "group", "embedded_id"])]
        home: Option<String>,
        #[command(flatten)]
        spec: GroupSpec,
    },
    /// Create a declared table on the servers: for a sharded table, the
    /// partitioned parent on every server with the leaves of the partitions
    /// each owns; a reference table everywhere; an unsharded one on its home.
    Create {
        name: String,
        /// Column definitions, as in CREATE TABLE (the key column included).
        #[arg(long)]
        columns: String,
    },
    /// List tables.
    List,
    /// Remove a table from the map (its data on the servers is not touched).
    Remove { name: String },
}

#[derive(Serialize)]
struct TableRow {
    table: String,
    kind: &'static str,
    group: Option<String>,
    key: Option<String>,
    key_type: Option<String>,
    method: Option<String>,
    home: Option<String>,
}

fn table_row(map: &ClusterMap, table: &Table) -> TableRow {
    let mut row = TableRow {
        table: table.name.clone(),
        kind: "",
        group: None,
        key: None,
        key_type: None,
        method: None,
        home: None,
    };
    match &table.kind {
        TableKind::Reference => row.kind = "reference",
        TableKind::Unsharded { home } => {
            row.kind = "unsharded";
            row.home = Some(home.clone());
        }
        TableKind::Sharded {
            group,
            key_column,
            embedded_id,
        } => {
            row.kind = "sharded";
            row.group = Some(group.clone());
            row.key = Some(key_column.clone());
            let group = map.groups.get(group);
            if *embedded_id {
                row.key_type = Some(KeyType::Bigint.to_string());
                row.method = Some("embedded".into());
            } else {
                row.key_type = group.map(|g| g.key_type.to_string());
                row.method = group.map(|g| g.method.name().to_string());
            }
        }
    }
    row
}

pub async fn table(context: &Context, command: TableCommand) -> Result<()> {
    match command {
        TableCommand::Add {
            name,
            key,
            group,
            embedded_id,
            reference,
            home,
            spec,
        } => {
            let kind = if reference {
                if spec.is_given() {
                    bail!("a reference table has no sharding method or key type");
                }
                TableKind::Reference
            } else if let Some(home) = home {
                if spec.is_given() {
                    bail!("an unsharded table has no sharding method or key type");
                }
                TableKind::Unsharded { home }
            } else {
                let key_column = key.ok_or_else(|| {
                    anyhow!(
                        "give --key COLUMN for a sharded table (or --reference, or --home SERVER)"
                    )
                })?;
                TableKind::Sharded {
                    group: group.unwrap_or_else(|| name.clone()),
                    key_column,
                    embedded_id,
                }
            };
            let new_group = match &kind {
                TableKind::Sharded { group, .. } if spec.is_given() => Some(spec.build(group)?),
                _ => None,
            };
            context
                .change(|map| {
                    if map.tables.contains_key(&name) {
                        return Err(format!("table {name:?} already exists"));
                    }
                    if let TableKind::Sharded { group, .. } = &kind {
                        match (map.groups.get(group), &new_group) {
                            (Some(existing), Some(wanted)) if existing != wanted => {
                                return Err(format!(
                                    "group {group:?} exists with {} {}: omit --method/--key-type to join it",
                                    existing.key_type,
                                    existing.method.name()
                                ))
                            }
                            (None, Some(wanted)) => {
                                map.groups.insert(group.clone(), wanted.clone());
                            }
                            (None, None) => {
                                return Err(format!(
                                    "group {group:?} does not exist: give --method and --key-type to create it, \
                                     or --group with an existing group"
                                ))
                            }
                            _ => {}
                        }
                    }
                    map.tables.insert(
                        name.clone(),
                        Table {
                            name: name.clone(),
                            kind: kind.clone(),
                        },
                    );
                    let detail = match &kind {
                        TableKind::Sharded { group, key_column, .. } => {
                            format!("{name}: sharded by {key_column} in group {group}")
                        }
                        TableKind::Reference => format!("{name}: reference"),
                        TableKind::Unsharded { home } => format!("{name}: unsharded on {home}"),
                    };
                    Ok(Change::new("table add", detail))
                })
                .await
        }
        TableCommand::List => {
            let map = context.store().await?.load().await?.map;
            let rows: Vec<TableRow> = map.tables.values().map(|t| table_row(&map, t)).collect();
            if context.json {
                return print_json(&rows);
            }
            let mut out = new_table(&[
                "table", "kind", "group", "key", "key type", "method", "home",
            ]);
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            for row in &rows {
                out.add_row(vec![
                    row.table.clone(),
                    row.kind.to_string(),
                    dash(&row.group),
                    dash(&row.key),
                    dash(&row.key_type),
                    dash(&row.method),
                    dash(&row.home),
                ]);
            }
            println!("{out}");
            Ok(())
        }
        TableCommand::Create { name, columns } => create_table(context, &name, &columns).await,
        TableCommand::Remove { name } => {
            context
                .change(|map| {
                    map.tables.remove(&name).ok_or_else(|| {
                        format!("no table named {name:?}: see `shardctl table list`")
                    })?;
                    Ok(Change::new("table remove", name.clone()))
                })
                .await
        }
    }
}

/// Records a table's columns in the map, then runs its DDL on every server
/// of the map, each in one transaction.
async fn create_table(context: &Context, name: &str, columns: &str) -> Result<()> {
    let store = context.store().await?;
    let saved = store
        .update(&context.actor, |map| {
            if !map.tables.contains_key(name) {
                return Err(format!(
                    "table {name:?} is not declared: run `shardctl table add {name} ...` first"
                ));
            }
            map.columns.insert(name.to_string(), columns.to_string());
            Ok(Change::new("table create", format!("{name} ({columns})")))
        })
        .await?;
    let map = saved.map;
    let mut created = Vec::new();
    for server in map.servers.values() {
        let leaves = run_table_ddl(&map, name, columns, server, &context.credentials()?).await?;
        if let Some(leaves) = leaves {
            created.push((server.name.clone(), leaves));
        }
    }
    if context.json {
        return print_json(&created);
    }
    for (server, leaves) in &created {
        println!("{name} created on {server} ({leaves} leaf tables)");
    }
    Ok(())
}

/// Creates `table` on `server` as the map says; the number of leaves
/// created, or `None` when the table does not live there.
pub(crate) async fn run_table_ddl(
    map: &ClusterMap,
    table: &str,
    columns: &str,
    server: &Server,
    credentials: &Credentials,
) -> Result<Option<usize>> {
    let statements = shardmap::ddl::create_statements(map, table, columns, &server.name)
        .map_err(anyhow::Error::msg)?;
    if statements.is_empty() {
        return Ok(None);
    }
    let pg = Pg::connect(server, credentials, "shardctl").await?;
    let script = format!("BEGIN;\n{};\nCOMMIT;", statements.join(";\n"));
    pg.client
        .batch_execute(&script)
        .await
        .with_context(|| format!("creating {table} on server {}", server.name))?;
    // The leaves: every CREATE TABLE but the parent's.
    let tables = statements
        .iter()
        .filter(|s| s.starts_with("CREATE TABLE"))
        .count();
    Ok(Some(tables.saturating_sub(1)))
}
