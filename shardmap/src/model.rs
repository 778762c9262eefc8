//! The cluster map: partitions, servers, co-location groups, tables, and who
//! owns which partition. Pure data plus validation and key → partition
//! lookup; persistence lives in `store`, caching in `cache`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::embedded::{IdLayout, MAX_EMBEDDED_PARTITIONS};
use crate::keys::{KeyError, KeyType, KeyValue};
use crate::pghash;

/// The largest partition count a cluster may be created with.
pub const MAX_PARTITIONS: u32 = MAX_EMBEDDED_PARTITIONS;

/// The whole map of one cluster, as stored in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Cluster name; also the etcd key prefix component.
    pub cluster: String,
    /// Number of logical partitions P: a power of two fixed at init.
    pub partitions: u32,
    /// Incremented by every change; numbers the history entries.
    pub version: u64,
    pub servers: BTreeMap<String, Server>,
    pub groups: BTreeMap<String, Group>,
    pub tables: BTreeMap<String, Table>,
    /// One entry per logical partition, indexed by partition number.
    pub assignments: Vec<Assignment>,
    /// Column definitions of tables created with `shardctl table create`,
    /// so a server added later gets the same parents.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
}

/// A Postgres server (one primary, optional read replicas).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub name: String,
    pub primary: Endpoint,
    #[serde(default)]
    pub replicas: Vec<Endpoint>,
    #[serde(default)]
    pub region: Option<String>,
    pub state: ServerState,
}

/// Where to reach a Postgres server. It deliberately has no password field:
/// credentials never go to etcd; each daemon reads them from its own local
/// configuration (or a `.pgpass` file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
}

impl Endpoint {
    /// Parses `postgres://user@host:port/dbname` (port defaults to 5432,
    /// user and dbname to `postgres`). A URL with a password is refused.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                format!(
                    "{url:?} is not a postgres:// URL (expected postgres://user@host:port/dbname)"
                )
            })?;
        let (authority, dbname) = match rest.split_once('/') {
            Some((authority, path)) => (authority, path.split('?').next().unwrap_or("")),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                if userinfo.contains(':') {
                    return Err(format!(
                        "the URL for {hostport} contains a password: shardline never stores credentials in etcd; \
                         give the URL without it and put the password in the daemon's local config or ~/.pgpass"
                    ));
                }
                (userinfo, hostport)
            }
            None => ("postgres", authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("invalid port {port:?} in {url:?}"))?;
                (host, port)
            }
            None => (hostport, 5432),
        };
        if host.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            dbname: if dbname.is_empty() {
                "postgres".into()
            } else {
                dbname.to_string()
            },
            user: if user.is_empty() {
                "postgres".into()
            } else {
                user.to_string()
            },
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes partitions.
    Active,
    /// Keeps serving what it owns, but the planner moves everything off it and
    /// never places a partition on it.
    Draining,
    /// Being added by `shardctl server add`: its tables are created and its
    /// reference tables copied. It owns no partitions and serves nothing
    /// (no reads, no reference writes, no DDL) until it turns active, and
    /// while any server is joining, proxies hold reference-table writes and
    /// refuse DDL, so the copy cannot miss a write.
    Joining,
}

impl ServerState {
    /// Holds copies of the reference tables and takes statements (active
    /// or draining, not joining).
    pub fn serves(self) -> bool {
        self != ServerState::Joining
    }
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerState::Active => "active",
            ServerState::Draining => "draining",
            ServerState::Joining => "joining",
        })
    }
}

/// Owner and state of one logical partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub owner: String,
    pub state: PartitionState,
    /// If set, the partition may only live on servers of this region (data residency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum PartitionState {
    /// Normal: statements go to the owner.
    Serving,
    /// A move job is copying it; statements still go to the owner.
    Moving { job: String },
    /// A cutover is in progress: proxies hold statements for it.
    Blocked { job: String },
}

impl fmt::Display for PartitionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionState::Serving => f.write_str("serving"),
            PartitionState::Moving { job } => write!(f, "moving({job})"),
            PartitionState::Blocked { job } => write!(f, "blocked({job})"),
        }
    }
}

/// A co-location group: tables keyed by the same entity (a user id, say),
/// whose rows with equal keys share a partition and so a server, and move together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub key_type: KeyType,
    pub method: Method,
}

/// How a group turns a key into a partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Postgres's hash-partition function modulo P.
    Hash,
    /// Explicit key ranges, each to one partition.
    Range { ranges: Vec<RangeRule> },
    /// Explicit values, each to one partition; keys not listed go to `default`.
    List {
        lists: Vec<ListRule>,
        #[serde(default)]
        default: Option<u32>,
    },
    /// The key is an embedded id that carries its partition.
    Embedded,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Hash => "hash",
            Method::Range { .. } => "range",
            Method::List { .. } => "list",
            Method::Embedded => "embedded",
        }
    }
}

/// Keys in `[from, to)` go to `partition`; a missing bound is unbounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRule {
    pub from: Option<String>,
    pub to: Option<String>,
    pub partition: u32,
}

/// Keys equal to one of `values` go to `partition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRule {
    pub values: Vec<String>,
    pub partition: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub name: String,
    pub kind: TableKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TableKind {
    /// Rows spread over partitions by `key_column`, with the group's method;
    /// when `embedded_id` is set the column holds embedded ids made for the
    /// group's partitions (photos keyed by photo id, co-located with their user).
    Sharded {
        group: String,
        key_column: String,
        #[serde(default)]
        embedded_id: bool,
    },
    /// Small table copied to every server; writes go everywhere.
    Reference,
    /// Lives whole on one server.
    Unsharded { home: String },
}

/// A map that breaks a rule, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid shard map: {}", .problems.join("; "))]
pub struct InvalidMap {
    pub problems: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 63
}

fn valid_identifier(name: &str) -> bool {
    valid_name(name) && !name.contains('-')
}

impl ClusterMap {
    /// A new map with `partitions` partitions split into contiguous, equal
    /// blocks over `servers` (in the order given). Validated.
    pub fn new(
        cluster: &str,
        partitions: u32,
        servers: Vec<Server>,
    ) -> Result<ClusterMap, InvalidMap> {
        let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
        let assignments = if names.is_empty() {
            Vec::new()
        } else {
            (0..partitions as usize)
                .map(|p| Assignment {
                    owner: names[p * names.len() / partitions as usize].clone(),
                    state: PartitionState::Serving,
                    region: None,
                })
                .collect()
        };
        let mut server_map = BTreeMap::new();
        let mut duplicates = Vec::new();
        for server in servers {
            if let Some(old) = server_map.insert(server.name.clone(), server) {
                duplicates.push(format!("server {:?} is given twice", old.name));
            }
        }
        if !duplicates.is_empty() {
            return Err(InvalidMap {
                problems: duplicates,
            });
        }
        let map = ClusterMap {
            cluster: cluster.to_string(),
            partitions,
            version: 0,
            servers: server_map,
            groups: BTreeMap::new(),
            tables: BTreeMap::new(),
            assignments,
            columns: BTreeMap::new(),
        };
        map.validate()?;
        Ok(map)
    }

    /// Checks every rule of the map and reports all problems at once.
    pub fn validate(&self) -> Result<(), InvalidMap> {
        let mut problems = Vec::new();
        if !valid_name(&self.cluster) {
            problems.push(format!(
                "cluster name {:?} must be lowercase letters, digits, '_' or '-' (at most 63)",
                self.cluster
            ));
        }
        if !self.partitions.is_power_of_two() || self.partitions > MAX_PARTITIONS {
            problems.push(format!(
                "partition count {} must be a power of two between 1 and {MAX_PARTITIONS}",
                self.partitions
            ));
        }
        if self.servers.is_empty() {
            problems.push("the map has no servers: give at least one".into());
        }
        for (name, server) in &self.servers {
            if name != &server.name {
                problems.push(format!(
                    "server entry {name:?} holds a server named {:?}",
                    server.name
                ));
            }
            if !valid_name(name) {
                problems.push(format!(
                    "server name {name:?} must be lowercase letters, digits, '_' or '-' (at most 63)"
                ));
            }
        }
        if self.assignments.len() != self.partitions as usize {
            problems.push(format!(
                "the map assigns {} partitions but the cluster has {}",
                self.assignments.len(),
                self.partitions
            ));
        }
        for (partition, assignment) in self.assignments.iter().enumerate() {
            if assignment.owner.is_empty() {
                problems.push(format!("partition {partition} has no owner"));
                continue;
            }
            match self.servers.get(&assignment.owner) {
                None => problems.push(format!(
                    "partition {partition} is owned by unknown server {:?}",
                    assignment.owner
                )),
                Some(server) => {
                    if !server.state.serves() {
                        problems.push(format!(
                            "partition {partition} is owned by server {:?}, which is still joining",
                            server.name
                        ));
                    }
                    if let Some(region) = &assignment.region {
                        if server.region.as_ref() != Some(region) {
                            problems.push(format!(
                                "partition {partition} must stay in region {region:?} but its owner {:?} is in {}",
                                server.name,
                                server.region.as_deref().map_or("no region".to_string(), |r| format!("{r:?}"))
                            ));
                        }
                    }
                }
            }
        }
        for (name, group) in &self.groups {
            if name != &group.name || !valid_identifier(name) {
                problems.push(format!(
                    "group name {name:?} must be a lowercase identifier"
                ));
            }
            self.validate_group(group, &mut problems);
        }
        for (name, table) in &self.tables {
            if name != &table.name || !valid_identifier(name) {
                problems.push(format!(
                    "table name {name:?} must be a lowercase SQL identifier (letters, digits, '_')"
                ));
            }
            match &table.kind {
                TableKind::Sharded {
                    group,
                    key_column,
                    embedded_id,
                } => {
                    if !valid_identifier(key_column) {
                        problems.push(format!(
                            "table {name:?}: key column {key_column:?} must be a lowercase SQL identifier"
                        ));
                    }
                    match self.groups.get(group) {
                        None => {
                            problems.push(format!("table {name:?} names unknown group {group:?}"))
                        }
                        Some(_) => {
                            if *embedded_id && IdLayout::new(self.partitions).is_none() {
                                problems.push(format!(
                                    "table {name:?} uses embedded ids, which need at most {MAX_EMBEDDED_PARTITIONS} partitions"
                                ));
                            }
                        }
                    }
                }
                TableKind::Unsharded { home } => {
                    if !self.servers.contains_key(home) {
                        problems.push(format!(
                            "unsharded table {name:?} has unknown home server {home:?}"
                        ));
                    }
                }
                TableKind::Reference => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidMap { problems })
        }
    }

    fn validate_group(&self, group: &Group, problems: &mut Vec<String>) {
        let name = &group.name;
        let check_partition = |partition: u32, problems: &mut Vec<String>| {
            if partition >= self.partitions {
                problems.push(format!(
                    "group {name:?} sends keys to partition {partition}, but partitions are 0..{}",
                    self.partitions.saturating_sub(1)
                ));
            }
        };
        match &group.method {
            Method::Hash => {}
            Method::Embedded => {
                if group.key_type != KeyType::Bigint {
                    problems.push(format!(
                        "group {name:?}: the embedded method needs bigint keys"
                    ));
                }
                if IdLayout::new(self.partitions).is_none() {
                    problems.push(format!(
                        "group {name:?}: embedded ids need at most {MAX_EMBEDDED_PARTITIONS} partitions"
                    ));
                }
            }
            Method::Range { ranges } => {
                let mut parsed = Vec::new();
                for rule in ranges {
                    check_partition(rule.partition, problems);
                    let parse = |bound: &Option<String>,
                                 problems: &mut Vec<String>|
                     -> Option<Option<KeyValue>> {
                        match bound {
                            None => Some(None),
                            Some(text) => match group.key_type.parse_value(text) {
                                Ok(v) => Some(Some(v)),
                                Err(e) => {
                                    problems.push(format!("group {name:?}: range bound: {e}"));
                                    None
                                }
                            },
                        }
                    };
                    let (Some(from), Some(to)) =
                        (parse(&rule.from, problems), parse(&rule.to, problems))
                    else {
                        continue;
                    };
                    if let (Some(f), Some(t)) = (&from, &to) {
                        if f.compare(t) != Some(std::cmp::Ordering::Less) {
                            problems.push(format!("group {name:?}: range [{f}, {t}) is empty: 'from' must be below 'to'"));
                            continue;
                        }
                    }
                    parsed.push((from, to, rule.partition));
                }
                // Unbounded-below sorts first.
                parsed.sort_by(|a, b| match (&a.0, &b.0) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, _) => std::cmp::Ordering::Less,
                    (_, None) => std::cmp::Ordering::Greater,
                    (Some(x), Some(y)) => x.compare(y).unwrap_or(std::cmp::Ordering::Equal),
                });
                for pair in parsed.windows(2) {
                    let (prev, next) = (&pair[0], &pair[1]);
                    let overlaps = match (&prev.1, &next.0) {
                        (None, _) | (_, None) => true,
                        (Some(prev_to), Some(next_from)) => {
                            prev_to.compare(next_from) == Some(std::cmp::Ordering::Greater)
                        }
                    };
                    if overlaps {
                        let show = |v: &Option<KeyValue>, unbounded: &str| {
                            v.as_ref().map_or(unbounded.to_string(), |v| v.to_string())
                        };
                        problems.push(format!(
                            "group {name:?}: ranges [{}, {}) and [{}, {}) overlap",
                            show(&prev.0, "MINVALUE"),
                            show(&prev.1, "MAXVALUE"),
                            show(&next.0, "MINVALUE"),
                            show(&next.1, "MAXVALUE")
                        ));
                    }
                }
            }
            Method::List { lists, default } => {
                let mut seen = BTreeSet::new();
                for rule in lists {
                    check_partition(rule.partition, problems);
                    for value in &rule.values {
                        match group.key_type.parse_value(value) {
                            Err(e) => problems.push(format!("group {name:?}: list value: {e}")),
                            Ok(v) => {
                                if !seen.insert(v.to_string()) {
                                    problems
                                        .push(format!("group {name:?}: value {v} is listed twice"));
                                }
                            }
                        }
                    }
                }
                if let Some(default) = default {
                    check_partition(*default, problems);
                }
            }
        }
    }

    /// The partition that `key` of `table` belongs to.
    pub fn partition_of(&self, table: &str, key: &KeyValue) -> Result<u32, LookupError> {
        let table_def = self
            .tables
            .get(table)
            .ok_or_else(|| LookupError::UnknownTable(table.to_string()))?;
        let TableKind::Sharded {
            group, embedded_id, ..
        } = &table_def.kind
        else {
            return Err(LookupError::NotSharded(table.to_string()));
        };
        let group = self
            .groups
            .get(group)
            .ok_or_else(|| LookupError::UnknownGroup(group.clone()))?;
        if *embedded_id {
            return self.embedded_partition(key).map_err(LookupError::Key);
        }
        group_partition(group, self.partitions, key).map_err(LookupError::Key)
    }

    fn embedded_partition(&self, key: &KeyValue) -> Result<u32, KeyError> {
        let KeyValue::Int(id) = key else {
            return Err(KeyError::WrongType {
                key: key.clone(),
                expected: KeyType::Bigint,
            });
        };
        let layout = IdLayout::new(self.partitions).ok_or(KeyError::NotEmbeddedId { id: *id })?;
        let partition = layout.partition_of(*id)?;
        if partition >= self.partitions {
            return Err(KeyError::NotEmbeddedId { id: *id });
        }
        Ok(partition)
    }

    /// The servers that hold the reference tables and take statements
    /// (every server but a joining one), in name order: where
    /// reference-table writes and DDL run.
    pub fn serving_servers(&self) -> impl Iterator<Item = &Server> {
        self.servers.values().filter(|s| s.state.serves())
    }

    /// A server being added (`shardctl server add` has not finished), if any.
    pub fn joining_server(&self) -> Option<&Server> {
        self.servers
            .values()
            .find(|s| s.state == ServerState::Joining)
    }

    /// The server that owns `partition`.
    pub fn owner_of(&self, partition: u32) -> Option<&Server> {
        self.assignments
            .get(partition as usize)
            .and_then(|a| self.servers.get(&a.owner))
    }

    /// Partitions owned by each server (servers owning none included).
    pub fn partitions_by_server(&self) -> BTreeMap<&str, Vec<u32>> {
        let mut by_server: BTreeMap<&str, Vec<u32>> = self
            .servers
            .keys()
            .map(|name| (name.as_str(), Vec::new()))
            .collect();
        for (partition, assignment) in self.assignments.iter().enumerate() {
            by_server
                .entry(assignment.owner.as_str())
                .or_default()
                .push(partition as u32);
        }
        by_server
    }
}

/// The partition of `key` in a group with `partitions` partitions.
pub fn group_partition(group: &Group, partitions: u32, key: &KeyValue) -> Result<u32, KeyError> {
    if !group.key_type.accepts(key) {
        return Err(KeyError::WrongType {
            key: key.clone(),
            expected: group.key_type,
        });
    }
    match &group.method {
        Method::Hash => {
            let row_hash = match (group.key_type, key) {
                (KeyType::Smallint, KeyValue::Int(v)) => pghash::row_hash_int2(*v as i16),
                (KeyType::Int, KeyValue::Int(v)) => pghash::row_hash_int4(*v as i32),
                (KeyType::Bigint, KeyValue::Int(v)) => pghash::row_hash_int8(*v),
                (KeyType::Text, KeyValue::Text(v)) => pghash::row_hash_text(v),
                (KeyType::Uuid, KeyValue::Uuid(v)) => pghash::row_hash_uuid(v),
                _ => {
                    return Err(KeyError::WrongType {
                        key: key.clone(),
                        expected: group.key_type,
                    })
                }
            };
            Ok((row_hash % u64::from(partitions)) as u32)
        }
        Method::Embedded => {
            let KeyValue::Int(id) = key else {
                return Err(KeyError::WrongType {
                    key: key.clone(),
                    expected: KeyType::Bigint,
                });
            };
            let layout = IdLayout::new(partitions).ok_or(KeyError::NotEmbeddedId { id: *id })?;
            layout.partition_of(*id)
        }
        Method::Range { ranges } => {
            for rule in ranges {
                let above_from = match &rule.from {
                    None => true,
                    Some(from) => group
                        .key_type
                        .parse_value(from)
                        .ok()
                        .and_then(|from| key.compare(&from))
                        .is_some_and(|o| o != std::cmp::Ordering::Less),
                };
                let below_to = match &rule.to {
                    None => true,
                    Some(to) => group
                        .key_type
                        .parse_value(to)
                        .ok()
                        .and_then(|to| key.compare(&to))
                        .is_some_and(|o| o == std::cmp::Ordering::Less),
                };
                if above_from && below_to {
                    return Ok(rule.partition);
                }
            }
            Err(KeyError::NoRange {
                group: group.name.clone(),
                key: key.clone(),
            })
        }
        Method::List { lists, default } => {
            for rule in lists {
                if rule
                    .values
                    .iter()
                    .any(|v| group.key_type.parse_value(v).ok().as_ref() == Some(key))
                {
                    return Ok(rule.partition);
                }
            }
            default.ok_or_else(|| KeyError::NotListed {
                group: group.name.clone(),
                key: key.clone(),
            })
        }
    }
}

/// Why a table's key could not be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("table {0:?} is not in the shard map: add it with `shardctl table add`")]
    UnknownTable(String),
    #[error("table {0:?} is not sharded: it has no partitions")]
    NotSharded(String),
    #[error("group {0:?} is not in the shard map")]
    UnknownGroup(String),
    #[error(transparent)]
    Key(#[from] KeyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, region: Option<&str>) -> Server {
        let primary =
            Endpoint::parse(&format!("postgres://postgres@127.0.0.1:1/{name}")).expect("valid url");
        Server {
            region: region.map(Into::into),
            ..Server::active(name, primary)
        }
    }

    fn two_server_map() -> ClusterMap {
        ClusterMap::new(
            "test",
            8,
            vec![server("a", Some("eu")), server("b", Some("us"))],
        )
        .expect("valid map")
    }

    #[test]
    fn new_map_splits_partitions_into_blocks() {
        let map = two_server_map();
        let by_server = map.partitions_by_server();
        assert_eq!(by_server["a"], vec![0, 1, 2, 3]);
        assert_eq!(by_server["b"], vec![4, 5, 6, 7]);
        let three = ClusterMap::new(
            "t",
            64,
            vec![server("a", None), server("b", None), server("c", None)],
        )
        .expect("valid");
        let counts: Vec<usize> = three
            .partitions_by_server()
            .values()
            .map(Vec::len)
            .collect();
        assert_eq!(counts, vec![22, 21, 21]);
    }

    #[test]
    fn partition_count_must_be_power_of_two() {
        let err = ClusterMap::new("test", 12, vec![server("a", None)]).expect_err("12 is refused");
        assert!(err.to_string().contains("power of two"), "{err}");
    }

    #[test]
    fn unknown_and_missing_owners_are_named() {
        let mut map = two_server_map();
        map.assignments[3].owner = "zzz".into();
        map.assignments[5].owner = String::new();
        let err = map.validate().expect_err("invalid");
        assert!(
            err.to_string()
                .contains("partition 3 is owned by unknown server \"zzz\""),
            "{err}"
        );
        assert!(
            err.to_string().contains("partition 5 has no owner"),
            "{err}"
        );
    }

    #[test]
    fn region_pins_are_enforced() {
        let mut map = two_server_map();
        map.assignments[5].region = Some("eu".into()); // owned by b, in us
        let err = map.validate().expect_err("invalid");
        assert!(
            err.to_string()
                .contains("partition 5 must stay in region \"eu\""),
            "{err}"
        );
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut map = two_server_map();
        map.declare(Group::range(
            "users",
            KeyType::Bigint,
            vec![
                RangeRule::new(Some("0"), Some("100"), 0),
                RangeRule::new(Some("50"), Some("200"), 1),
            ],
        ));
        let err = map.validate().expect_err("overlap");
        assert!(
            err.to_string()
                .contains("ranges [0, 100) and [50, 200) overlap"),
            "{err}"
        );
    }

    #[test]
    fn range_and_list_lookup() {
        let mut map = two_server_map();
        let ranges = vec![
            RangeRule::new(None, Some("100"), 2),
            RangeRule::new(Some("100"), None, 5),
        ];
        map.declare(Group::range("users", KeyType::Bigint, ranges).table("accounts", "k"));
        let lists = vec![ListRule::new(&["DE", "FR"], 4)];
        map.declare(Group::list("geo", KeyType::Text, lists, None).table("votes", "k"));
        map.validate().expect("valid");
        assert_eq!(map.partition_of("accounts", &KeyValue::Int(-7)), Ok(2));
        assert_eq!(map.partition_of("accounts", &KeyValue::Int(100)), Ok(5));
        assert_eq!(
            map.partition_of("votes", &KeyValue::Text("FR".into())),
            Ok(4)
        );
        assert!(matches!(
            map.partition_of("votes", &KeyValue::Text("US".into())),
            Err(LookupError::Key(KeyError::NotListed { .. }))
        ));
        assert!(matches!(
            map.partition_of("accounts", &KeyValue::Text("x".into())),
            Err(LookupError::Key(KeyError::WrongType { .. }))
        ));
        assert!(matches!(
            map.partition_of("nope", &KeyValue::Int(1)),
            Err(LookupError::UnknownTable(_))
        ));
    }

    #[test]
    fn embedded_id_tables_route_to_the_id_partition() {
        let mut map = two_server_map();
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .embedded_table("photos", "photo_id")
                .table("users", "user_id"),
        );
        map.validate().expect("valid");
        let user_partition = map.partition_of("users", &KeyValue::Int(42)).expect("hash");
        let layout = IdLayout::new(8).expect("layout");
        let photo_id = crate::embedded::IdGenerator::new(layout)
            .next_id(user_partition)
            .expect("valid partition");
        assert_eq!(
            map.partition_of("photos", &KeyValue::Int(photo_id)),
            Ok(user_partition)
        );
    }

    #[test]
    fn urls_with_passwords_are_refused() {
        assert!(Endpoint::parse("postgres://u:secret@h:5/db")
            .expect_err("password")
            .contains("password"));
        let e = Endpoint::parse("postgresql://h").expect("defaults");
        assert_eq!(
            (e.port, e.user.as_str(), e.dbname.as_str()),
            (5432, "postgres", "postgres")
        );
        assert!(Endpoint::parse("mysql://h").is_err());
        assert!(Endpoint::parse("postgres://h:99999/db").is_err());
    }

    #[test]
    fn map_round_trips_through_json() {
        let map = two_server_map();
        let json = serde_json::to_string(&map).expect("serialize");
        let back: ClusterMap = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, map);
    }
}
