//! `shardctl group ...`: co-location groups, which fix a key type and the
//! method that turns a key into a partition. `GroupSpec` is also how
//! `table add` creates a table's group.

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use shardmap::{Change, Group, KeyType, ListRule, Method, RangeRule, TableKind};

use crate::cmd::partitions::parse_partition;
use crate::context::Context;
use crate::output::{print_json, table as new_table};

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
    pub(crate) fn is_given(&self) -> bool {
        self.key_type.is_some() || self.method.is_some()
    }

    pub(crate) fn build(&self, name: &str) -> Result<Group> {
        let key_type_name = self.key_type.as_deref().unwrap_or("bigint");
        let key_type = KeyType::parse(key_type_name).ok_or_else(|| {
            anyhow!("unknown key type {key_type_name:?}: use smallint, int, bigint, text or uuid")
        })?;
        let method = match self.method.as_deref().unwrap_or("hash") {
            "hash" => Method::Hash,
            "embedded" => Method::Embedded,
            "range" => Method::Range {
                ranges: parse_each(&self.ranges, parse_range)?,
            },
            "list" => Method::List {
                lists: parse_each(&self.lists, parse_list)?,
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

/// Every value of a repeated flag, parsed; the first bad one is the error.
fn parse_each<T>(specs: &[String], parse: fn(&str) -> Result<T>) -> Result<Vec<T>> {
    specs.iter().map(|spec| parse(spec)).collect()
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
}
