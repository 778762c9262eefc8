//! The map commands: init, server, group, table, partition, map, lookup, history.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use shardmap::{
    Change, ClusterMap, Endpoint, Group, KeyType, ListRule, MapStore, Method, RangeRule, Server,
    ServerState, Table, TableKind,
};

use rebalancer::pg::{Credentials, Pg};
use settings::Overrides;

use crate::config::{self, Settings};
use crate::output::{print_json, ranges, ranges_short, table as new_table};
use crate::Cli;

/// What every command needs: where etcd is, how to log in to the servers,
/// how to print, who acts.
pub struct Context {
    /// `--config` / `SHARDLINE_CONFIG`.
    config: Option<PathBuf>,
    /// The environment and flags over the config file's etcd and cluster.
    overrides: Overrides,
    /// Passwords for the servers: from the environment only (shardctl's
    /// config file has none, and etcd never holds them).
    pub credentials: Credentials,
    pub json: bool,
    pub actor: String,
}

impl Context {
    pub fn new(cli: &Cli) -> Context {
        Context {
            config: cli.config.clone(),
            overrides: Overrides::env_then_flags(&cli.etcd, cli.cluster.as_deref()),
            credentials: Credentials::from_env(),
            json: cli.json,
            actor: cli.actor.clone().unwrap_or_else(config::default_actor),
        }
    }

    pub fn settings(&self) -> Result<Settings> {
        config::resolve(&self.overrides, self.config.as_deref())
    }

    /// The cluster named by the environment or `--cluster`, before any
    /// config file exists (for `dev up`, which writes that file).
    pub fn cluster_name(&self) -> String {
        self.overrides
            .cluster()
            .unwrap_or(settings::DEFAULT_CLUSTER)
            .to_string()
    }

    pub async fn store(&self) -> Result<MapStore> {
        let settings = self.settings()?;
        MapStore::connect(&settings.endpoints, &settings.cluster)
            .await
            .with_context(|| format!("cannot connect to etcd at {}", settings.endpoints.join(",")))
    }

    /// Applies `edit` to the stored map and reports the new version.
    async fn change<F>(&self, edit: F) -> Result<()>
    where
        F: FnMut(&mut ClusterMap) -> Result<Change, String>,
    {
        let store = self.store().await?;
        let saved = store.update(&self.actor, edit).await?;
        if self.json {
            print_json(
                &serde_json::json!({ "version": saved.map.version, "revision": saved.revision }),
            )
        } else {
            println!("map version {} saved", saved.map.version);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- init

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Number of logical partitions: a power of two, fixed for the cluster's life.
    #[arg(long, default_value_t = 1024)]
    pub partitions: u32,
    /// A server as NAME=postgres://user@host:port/dbname (repeat; no password in the URL).
    #[arg(long = "server", value_name = "NAME=URL", required = true)]
    pub servers: Vec<String>,
    /// A server's region as NAME=REGION (repeat).
    #[arg(long = "region", value_name = "NAME=REGION")]
    pub regions: Vec<String>,
}

pub fn parse_server(spec: &str, regions: &[String]) -> Result<Server> {
    let (name, url) = spec.split_once('=').ok_or_else(|| {
        anyhow!("--server {spec:?}: expected NAME=postgres://user@host:port/dbname")
    })?;
    let mut region = None;
    for entry in regions {
        let (server, value) = entry
            .split_once('=')
            .ok_or_else(|| anyhow!("--region {entry:?}: expected NAME=REGION"))?;
        if server == name {
            region = Some(value.to_string());
        }
    }
    Ok(Server {
        name: name.to_string(),
        primary: Endpoint::parse(url).map_err(|e| anyhow!("server {name}: {e}"))?,
        replicas: Vec::new(),
        region,
        state: ServerState::Active,
    })
}

pub async fn init(context: &Context, args: InitArgs) -> Result<()> {
    let settings = context.settings()?;
    let servers = args
        .servers
        .iter()
        .map(|spec| parse_server(spec, &args.regions))
        .collect::<Result<Vec<_>>>()?;
    let map = ClusterMap::new(&settings.cluster, args.partitions, servers)?;
    let store = context.store().await?;
    let saved = store.initialize(map, &context.actor).await?;
    if context.json {
        print_json(&saved.map)
    } else {
        println!(
            "cluster {:?} initialised: {} partitions over {} servers (map version {})",
            saved.map.cluster,
            saved.map.partitions,
            saved.map.servers.len(),
            saved.map.version
        );
        Ok(())
    }
}

// ---------------------------------------------------------------- server

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Add a server (it owns no partitions until a move or rebalance).
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
            let saved = store
                .update(&context.actor, |map| {
                    if map.servers.contains_key(&name) {
                        return Err(format!("server {name:?} already exists"));
                    }
                    map.servers.insert(
                        name.clone(),
                        Server {
                            name: name.clone(),
                            primary: primary.clone(),
                            replicas: replicas.clone(),
                            region: region.clone(),
                            state: ServerState::Active,
                        },
                    );
                    Ok(Change::new("server add", format!("{name} at {primary}")))
                })
                .await?;
            let tables = prepare_new_server(&saved.map, &name, &context.credentials).await.with_context(|| {
                format!(
                    "server {name} was added to the map (version {}), but creating the tables there failed; \
                     fix the server and run `shardctl table create` for each table again",
                    saved.map.version
                )
            })?;
            if context.json {
                return print_json(&serde_json::json!({
                    "version": saved.map.version,
                    "revision": saved.revision,
                    "tables_created": tables,
                }));
            }
            println!(
                "map version {} saved; {tables} tables created on {name} (no leaves: it owns no partitions yet)",
                saved.map.version
            );
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

// ---------------------------------------------------------------- group

#[derive(Debug, Args)]
pub struct GroupSpec {
    /// Key type: smallint, int, bigint, text or uuid.
    #[arg(long = "key-type", value_name = "TYPE")]
    pub key_type: Option<String>,
    /// Sharding method: hash, range, list or embedded.
    #[arg(long)]
    pub method: Option<String>,
    /// For range: FROM..TO=PARTITION, FROM inclusive, TO exclusive, either may be empty (unbounded). Repeat.
    #[arg(long = "range", value_name = "FROM..TO=P")]
    pub ranges: Vec<String>,
    /// For list: V1,V2,...=PARTITION. Repeat.
    #[arg(long = "list", value_name = "VALUES=P")]
    pub lists: Vec<String>,
    /// For list: partition of keys no rule lists.
    #[arg(long = "default-partition")]
    pub default_partition: Option<u32>,
}

impl GroupSpec {
    fn is_given(&self) -> bool {
        self.key_type.is_some() || self.method.is_some()
    }

    fn build(&self, name: &str) -> Result<Group> {
        let key_type_name = self.key_type.as_deref().unwrap_or("bigint");
        let key_type = KeyType::parse(key_type_name).ok_or_else(|| {
            anyhow!("unknown key type {key_type_name:?}: use smallint, int, bigint, text or uuid")
        })?;
        let method = match self.method.as_deref().unwrap_or("hash") {
            "hash" => Method::Hash,
            "embedded" => Method::Embedded,
            "range" => Method::Range {
                ranges: self
                    .ranges
                    .iter()
                    .map(|r| parse_range(r))
                    .collect::<Result<_>>()?,
            },
            "list" => Method::List {
                lists: self
                    .lists
                    .iter()
                    .map(|l| parse_list(l))
                    .collect::<Result<_>>()?,
                default: self.default_partition,
            },
            other => bail!("unknown method {other:?}: use hash, range, list or embedded"),
        };
        if !self.ranges.is_empty() && !matches!(method, Method::Range { .. }) {
            bail!("--range is only for --method range");
        }
        if (!self.lists.is_empty() || self.default_partition.is_some())
            && !matches!(method, Method::List { .. })
        {
            bail!("--list and --default-partition are only for --method list");
        }
        Ok(Group {
            name: name.to_string(),
            key_type,
            method,
        })
    }
}

fn parse_partition(text: &str, spec: &str) -> Result<u32> {
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{spec:?}: partition {text:?} is not a number"))
}

fn parse_range(spec: &str) -> Result<RangeRule> {
    let (range, partition) = spec
        .rsplit_once('=')
        .ok_or_else(|| anyhow!("--range {spec:?}: expected FROM..TO=PARTITION"))?;
    let (from, to) = range
        .split_once("..")
        .ok_or_else(|| anyhow!("--range {spec:?}: expected FROM..TO=PARTITION"))?;
    let bound = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Ok(RangeRule {
        from: bound(from),
        to: bound(to),
        partition: parse_partition(partition, spec)?,
    })
}

fn parse_list(spec: &str) -> Result<ListRule> {
    let (values, partition) = spec
        .rsplit_once('=')
        .ok_or_else(|| anyhow!("--list {spec:?}: expected V1,V2=PARTITION"))?;
    Ok(ListRule {
        values: values.split(',').map(str::to_string).collect(),
        partition: parse_partition(partition, spec)?,
    })
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Add a co-location group.
    Add {
        name: String,
        #[command(flatten)]
        spec: GroupSpec,
    },
    /// List groups.
    List,
}

pub async fn group(context: &Context, command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Add { name, spec } => {
            let group = spec.build(&name)?;
            context
                .change(|map| {
                    if map.groups.contains_key(&name) {
                        return Err(format!("group {name:?} already exists"));
                    }
                    map.groups.insert(name.clone(), group.clone());
                    Ok(Change::new(
                        "group add",
                        format!("{name}: {} {}", group.key_type, group.method.name()),
                    ))
                })
                .await
        }
        GroupCommand::List => {
            let map = context.store().await?.load().await?.map;
            if context.json {
                return print_json(&map.groups);
            }
            let mut out = new_table(&["group", "key type", "method", "rules", "tables"]);
            for group in map.groups.values() {
                let rules = match &group.method {
                    Method::Range { ranges } => ranges
                        .iter()
                        .map(|r| {
                            format!(
                                "[{}, {})→{}",
                                r.from.as_deref().unwrap_or("MIN"),
                                r.to.as_deref().unwrap_or("MAX"),
                                r.partition
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                    Method::List { lists, default } => {
                        let mut parts: Vec<String> = lists
                            .iter()
                            .map(|l| format!("{}→{}", l.values.join(","), l.partition))
                            .collect();
                        if let Some(d) = default {
                            parts.push(format!("default→{d}"));
                        }
                        parts.join(" ")
                    }
                    _ => "-".into(),
                };
                let tables: Vec<&str> = map
                    .tables
                    .values()
                    .filter(|t| matches!(&t.kind, TableKind::Sharded { group: g, .. } if *g == group.name))
                    .map(|t| t.name.as_str())
                    .collect();
                out.add_row(vec![
                    group.name.clone(),
                    group.key_type.to_string(),
                    group.method.name().to_string(),
                    rules,
                    if tables.is_empty() {
                        "-".into()
                    } else {
                        tables.join(", ")
                    },
                ]);
            }
            println!("{out}");
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- table

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
        TableKind::Reference => row.kind = "reference",
        TableKind::Unsharded { home } => {
            row.kind = "unsharded";
            row.home = Some(home.clone());
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
        let leaves = run_table_ddl(&map, name, columns, server, &context.credentials).await?;
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
async fn run_table_ddl(
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
    Ok(Some(statements.len().saturating_sub(1)))
}

/// Creates every table made with `table create` on a newly added server
/// (partitioned parents with no leaves: it owns no partitions yet).
async fn prepare_new_server(
    map: &ClusterMap,
    name: &str,
    credentials: &Credentials,
) -> Result<usize> {
    let server = map
        .servers
        .get(name)
        .ok_or_else(|| anyhow!("server {name} is not in the map"))?;
    let mut tables = 0;
    for (table, columns) in &map.columns {
        if !map.tables.contains_key(table) {
            continue;
        }
        if run_table_ddl(map, table, columns, server, credentials)
            .await?
            .is_some()
        {
            tables += 1;
        }
    }
    Ok(tables)
}

// ---------------------------------------------------------------- partition

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Require partitions to live in a region (e.g. `pin 0-63 --region eu`).
    Pin {
        /// Partitions: N, N-M, or a comma-separated list of those.
        partitions: String,
        #[arg(long)]
        region: String,
    },
    /// Remove the region requirement from partitions.
    Unpin { partitions: String },
}

fn parse_partition_set(spec: &str, partitions: u32) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (parse_partition(a, spec)?, parse_partition(b, spec)?),
            None => {
                let p = parse_partition(part, spec)?;
                (p, p)
            }
        };
        if from > to || to >= partitions {
            bail!("partitions {part:?} are not within 0-{}", partitions - 1);
        }
        out.extend(from..=to);
    }
    Ok(out)
}

pub async fn partition(context: &Context, command: PartitionCommand) -> Result<()> {
    let (spec, region) = match command {
        PartitionCommand::Pin { partitions, region } => (partitions, Some(region)),
        PartitionCommand::Unpin { partitions } => (partitions, None),
    };
    context
        .change(|map| {
            let set = parse_partition_set(&spec, map.partitions).map_err(|e| e.to_string())?;
            for p in &set {
                map.assignments[*p as usize].region = region.clone();
            }
            let action = if region.is_some() {
                "partition pin"
            } else {
                "partition unpin"
            };
            Ok(Change::new(
                action,
                format!(
                    "{} → {}",
                    ranges(&set),
                    region.as_deref().unwrap_or("any region")
                ),
            ))
        })
        .await
}

// ---------------------------------------------------------------- map, lookup, history

#[derive(Debug, Args)]
pub struct MapArgs {
    /// One row per partition instead of one per server.
    #[arg(long)]
    pub partitions: bool,
}

pub async fn map(context: &Context, args: MapArgs) -> Result<()> {
    let saved = context.store().await?.load().await?;
    let map = &saved.map;
    if context.json {
        return print_json(map);
    }
    println!(
        "cluster {:?}: {} partitions, {} servers, {} tables, map version {} (etcd revision {})",
        map.cluster,
        map.partitions,
        map.servers.len(),
        map.tables.len(),
        map.version,
        saved.revision
    );
    if args.partitions {
        let mut out = new_table(&["partition", "owner", "state", "region pin"]);
        for (p, a) in map.assignments.iter().enumerate() {
            out.add_row(vec![
                p.to_string(),
                a.owner.clone(),
                a.state.to_string(),
                a.region.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        println!("{out}");
        return Ok(());
    }
    let mut out = new_table(&["server", "region", "state", "partitions", "share", "owns"]);
    for (name, partitions) in map.partitions_by_server() {
        let server = map.servers.get(name);
        out.add_row(vec![
            name.to_string(),
            server
                .and_then(|s| s.region.clone())
                .unwrap_or_else(|| "-".into()),
            server.map_or("unknown".into(), |s| s.state.to_string()),
            partitions.len().to_string(),
            format!(
                "{:.1}%",
                100.0 * partitions.len() as f64 / f64::from(map.partitions.max(1))
            ),
            ranges_short(&partitions, 60),
        ]);
    }
    println!("{out}");
    let busy: Vec<String> = map
        .assignments
        .iter()
        .enumerate()
        .filter(|(_, a)| a.state != shardmap::PartitionState::Serving)
        .map(|(p, a)| format!("{p}: {}", a.state))
        .collect();
    if !busy.is_empty() {
        println!("partitions not serving normally: {}", busy.join(", "));
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    pub table: String,
    pub key: String,
}

pub async fn lookup(context: &Context, args: LookupArgs) -> Result<()> {
    let map = context.store().await?.load().await?.map;
    let table = map.tables.get(&args.table).ok_or_else(|| {
        anyhow!(
            "table {:?} is not in the shard map: see `shardctl table list`",
            args.table
        )
    })?;
    let TableKind::Sharded {
        group, embedded_id, ..
    } = &table.kind
    else {
        bail!("table {:?} is not sharded", args.table);
    };
    let group_def = map
        .groups
        .get(group)
        .ok_or_else(|| anyhow!("group {group:?} is missing from the map"))?;
    let key_type = if *embedded_id {
        KeyType::Bigint
    } else {
        group_def.key_type
    };
    let key = key_type.parse_value(&args.key)?;
    let partition = map.partition_of(&args.table, &key)?;
    let owner = map
        .owner_of(partition)
        .ok_or_else(|| anyhow!("partition {partition} has no owner"))?;
    if context.json {
        return print_json(&serde_json::json!({
            "table": args.table, "key": args.key, "partition": partition,
            "server": owner.name, "primary": owner.primary.to_string(),
        }));
    }
    println!(
        "{}.{} = {} → partition {partition} on server {} ({})",
        args.table,
        match &table.kind {
            TableKind::Sharded { key_column, .. } => key_column.as_str(),
            _ => "?",
        },
        args.key,
        owner.name,
        owner.primary
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Show only the newest N entries.
    #[arg(long)]
    pub limit: Option<usize>,
}

pub async fn history(context: &Context, args: HistoryArgs) -> Result<()> {
    let entries = context.store().await?.history(args.limit).await?;
    if context.json {
        return print_json(&entries);
    }
    let mut out = new_table(&["version", "when (UTC)", "actor", "action", "detail"]);
    for entry in &entries {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.at_unix_ms);
        out.add_row(vec![
            entry.version.to_string(),
            humantime::format_rfc3339_seconds(when).to_string(),
            entry.actor.clone(),
            entry.action.clone(),
            entry.detail.clone(),
        ]);
    }
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_and_list_specs_parse() {
        let r = parse_range("..100=3").expect("parses");
        assert_eq!(
            (r.from, r.to.as_deref(), r.partition),
            (None, Some("100"), 3)
        );
        let l = parse_list("DE,FR=2").expect("parses");
        assert_eq!(l.values, vec!["DE", "FR"]);
        assert!(parse_range("0-100=1").is_err());
        assert!(parse_list("DE=x").is_err());
    }

    #[test]
    fn partition_sets_parse_and_check_bounds() {
        assert_eq!(
            parse_partition_set("0-2,5", 8).expect("parses"),
            vec![0, 1, 2, 5]
        );
        assert!(parse_partition_set("6-9", 8).is_err());
        assert!(parse_partition_set("3-1", 8).is_err());
    }

    #[test]
    fn server_specs_parse_with_region() {
        let s = parse_server(
            "eu1=postgres://app@10.0.0.5:5433/photos",
            &["eu1=eu".into()],
        )
        .expect("parses");
        assert_eq!((s.primary.port, s.region.as_deref()), (5433, Some("eu")));
        assert!(parse_server("noequals", &[]).is_err());
    }
}
