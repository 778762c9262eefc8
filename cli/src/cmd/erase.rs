//! `shardctl erase --group users --key 42`: deletes every row of one key
//! (a user, say, on a GDPR request) in every table of its co-location
//! group, on the server that owns its partition, in one transaction; then
//! records in the map history that an erasure happened — who, when, which
//! group — with the key as a keyed hash, so the history does not name whose
//! data it was. `--dry-run` lists the tables and row counts instead.
//!
//! Tables keyed by the group's key are matched on their key column. A table
//! keyed by embedded ids (photos by photo id) carries its owner in another
//! column: the first of the group's key columns that the table has (by the
//! columns recorded with `shardctl table create`), or `--column TABLE=COLUMN`.
//!
//! A partition that is moving (or has an unfinished move job) is refused:
//! run the erasure after the move. The state is checked again just before
//! COMMIT; a move that starts in between still carries the deletion, since
//! a cutover's DETACH waits for this transaction and the copy replicates it.

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use hmac::{Hmac, KeyInit, Mac};
use rebalancer::pg::{ident, literal, Pg};
use serde::Serialize;
use sha2::Sha256;
use shardmap::{Change, ClusterMap, KeyValue, PartitionState, TableKind};

use crate::cmd::moves::busy_partitions;
use crate::context::Context;
use crate::output::{print_json, table as new_table};

#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The co-location group whose tables hold the key's rows (e.g. users).
    #[arg(long)]
    pub group: String,
    /// The key whose rows are deleted (e.g. a user id).
    #[arg(long)]
    pub key: String,
    /// The owner column of a table keyed by embedded ids, as TABLE=COLUMN
    /// (repeatable; by default the first of the group's key columns the
    /// table has).
    #[arg(long = "column", value_name = "TABLE=COLUMN")]
    pub columns: Vec<String>,
    /// Only show which tables hold how many rows of the key.
    #[arg(long)]
    pub dry_run: bool,
}

/// One table of the group and the column its rows of the key are found by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Target {
    table: String,
    column: String,
}

#[derive(Debug, Serialize)]
struct TableRows {
    table: String,
    column: String,
    rows: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    group: String,
    /// The key's keyed hash, as the history records it.
    key_hash: String,
    partition: u32,
    server: String,
    dry_run: bool,
    tables: Vec<TableRows>,
    /// The map version whose history entry records the erasure.
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded_in_version: Option<u64>,
}

/// The tables of `group` and the column holding its key in each, in name order.
fn targets(map: &ClusterMap, group: &str, overrides: &[String]) -> Result<Vec<Target>> {
    let mut chosen: Vec<(String, String)> = Vec::new();
    for spec in overrides {
        let (table, column) = spec
            .split_once('=')
            .filter(|(t, c)| !t.is_empty() && !c.is_empty())
            .ok_or_else(|| anyhow!("--column {spec:?}: expected TABLE=COLUMN"))?;
        chosen.push((table.to_string(), column.to_string()));
    }
    let members: Vec<(&String, &String, bool)> = map
        .tables
        .values()
        .filter_map(|t| match &t.kind {
            TableKind::Sharded {
                group: g,
                key_column,
                embedded_id,
            } if g == group => Some((&t.name, key_column, *embedded_id)),
            _ => None,
        })
        .collect();
    if members.is_empty() {
        bail!("group {group:?} has no tables: nothing to erase (`shardctl map` lists the tables)");
    }
    if let Some((table, _)) = chosen
        .iter()
        .find(|(t, _)| !members.iter().any(|(name, _, _)| *name == t))
    {
        bail!("--column names {table:?}, which is not a table of group {group:?}");
    }
    // The columns that hold the group's key where it is the table's key.
    let key_columns: Vec<&String> = members
        .iter()
        .filter(|(_, _, embedded)| !embedded)
        .map(|(_, column, _)| *column)
        .collect();
    let mut targets = Vec::new();
    for (table, key_column, embedded) in members {
        let column = if let Some((_, column)) = chosen.iter().find(|(t, _)| t == table) {
            column.clone()
        } else if !embedded {
            key_column.clone()
        } else {
            let recorded = map
                .columns
                .get(table)
                .and_then(|c| shardmap::ddl::column_names(c))
                .unwrap_or_default();
            key_columns
                .iter()
                .find(|c| recorded.contains(c))
                .map(|c| c.to_string())
                .ok_or_else(|| {
                    anyhow!(
                        "table {table:?} is keyed by embedded ids and no column of it is known to hold group {group:?}'s key: name it with --column {table}=COLUMN"
                    )
                })?
        };
        targets.push(Target {
            table: table.clone(),
            column,
        });
    }
    Ok(targets)
}

/// HMAC-SHA256 of the group and key under the cluster's audit salt, short
/// enough to read and long enough not to collide.
fn key_hash(salt: &[u8], group: &str, key: &KeyValue) -> Result<String> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(salt)
        .map_err(|e| anyhow!("the audit salt cannot key a hash: {e}"))?;
    mac.update(group.as_bytes());
    mac.update(&[0]);
    mac.update(key.to_string().as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("hmac-sha256:{hex}"))
}

/// Refuses a partition that is moving or has an unfinished job.
fn check_still(map: &ClusterMap, partition: u32, owner: &str) -> Result<()> {
    let assignment = map
        .assignments
        .get(partition as usize)
        .ok_or_else(|| anyhow!("partition {partition} is not in the map"))?;
    if assignment.state != PartitionState::Serving {
        bail!(
            "partition {partition} is {}: run the erasure again once its move has finished (`shardctl status`)",
            assignment.state
        );
    }
    if assignment.owner != owner {
        bail!(
            "partition {partition} moved from {owner} to {} meanwhile: run the erasure again",
            assignment.owner
        );
    }
    Ok(())
}

pub async fn erase(context: &Context, args: EraseArgs) -> Result<()> {
    let store = context.store().await?;
    let map = store.load().await?.map;
    let group = map.groups.get(&args.group).ok_or_else(|| {
        anyhow!(
            "no group named {:?}: `shardctl map` lists the groups",
            args.group
        )
    })?;
    let key = group.key_type.parse_value(&args.key).with_context(|| {
        format!(
            "--key {:?} is not a key of group {:?}",
            args.key, args.group
        )
    })?;
    let partition = shardmap::model::group_partition(group, map.partitions, &key)?;
    let targets = targets(&map, &args.group, &args.columns)?;
    let owner = map
        .owner_of(partition)
        .ok_or_else(|| anyhow!("partition {partition} has no owner in the map"))?
        .clone();
    check_still(&map, partition, &owner.name)?;
    let jobs = context.job_store().await?;
    if let Some((_, job)) = busy_partitions(&jobs)
        .await?
        .into_iter()
        .find(|(p, _)| *p == partition)
    {
        bail!(
            "partition {partition} has move job {job}: run the erasure again once it has finished (`shardctl status`)"
        );
    }
    let key_hash = key_hash(&store.audit_salt().await?, &args.group, &key)?;
    let mut pg = Pg::connect(&owner, &context.credentials()?, "shardctl erase").await?;
    let value = literal(&key.to_string());
    let mut tables = Vec::with_capacity(targets.len());
    let transaction = pg
        .client
        .transaction()
        .await
        .with_context(|| format!("cannot begin a transaction on {}", owner.name))?;
    for target in &targets {
        let condition = format!("{} = {value}", ident(&target.column));
        let sql = if args.dry_run {
            format!(
                "SELECT count(*) FROM {} WHERE {condition}",
                ident(&target.table)
            )
        } else {
            format!("DELETE FROM {} WHERE {condition}", ident(&target.table))
        };
        let rows = if args.dry_run {
            let count: i64 = transaction
                .query_one(sql.as_str(), &[])
                .await
                .and_then(|row| row.try_get(0))
                .with_context(|| format!("cannot count the rows of {}", target.table))?;
            u64::try_from(count).unwrap_or(0)
        } else {
            transaction
                .execute(sql.as_str(), &[])
                .await
                .with_context(|| {
                    format!(
                        "cannot delete from {} on {} (nothing was deleted)",
                        target.table, owner.name
                    )
                })?
        };
        tables.push(TableRows {
            table: target.table.clone(),
            column: target.column.clone(),
            rows,
        });
    }
    let mut report = Report {
        group: args.group.clone(),
        key_hash,
        partition,
        server: owner.name.clone(),
        dry_run: args.dry_run,
        tables,
        recorded_in_version: None,
    };
    if args.dry_run {
        transaction.rollback().await.ok();
        return print_report(context, &report);
    }
    // A move may have started while the rows were deleted: commit only on
    // the owner the map still names (see the module doc for the race).
    check_still(&store.load().await?.map, partition, &owner.name)?;
    transaction.commit().await.with_context(|| {
        format!(
            "the erasure did not commit on {}: nothing was deleted",
            owner.name
        )
    })?;
    let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
    let detail = format!(
        "group {}: every row of key {} deleted on {} ({rows} rows in {} tables)",
        report.group,
        report.key_hash,
        report.server,
        report.tables.len()
    );
    let saved = store
        .update(&context.actor, |_| Ok(Change::new("erase", detail.clone())))
        .await
        .context("the rows were deleted, but the history entry was not written: record the erasure by hand")?;
    report.recorded_in_version = Some(saved.map.version);
    print_report(context, &report)
}

fn print_report(context: &Context, report: &Report) -> Result<()> {
    if context.json {
        return print_json(report);
    }
    let mut out = new_table(&[
        "table",
        "column",
        if report.dry_run { "rows" } else { "deleted" },
    ]);
    for t in &report.tables {
        out.add_row(vec![t.table.clone(), t.column.clone(), t.rows.to_string()]);
    }
    println!("{out}");
    match report.recorded_in_version {
        Some(version) => println!(
            "erased on {} (partition {}); recorded as {} in map history version {version}",
            report.server, report.partition, report.key_hash
        ),
        None => println!(
            "dry run on {} (partition {}): nothing deleted; run without --dry-run to erase",
            report.server, report.partition
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmap::{Endpoint, Group, KeyType, Server};

    fn map() -> ClusterMap {
        let url = "postgres://app@127.0.0.1:1/app";
        let server = Server::active("pg1", Endpoint::parse(url).expect("endpoint"));
        let mut map = ClusterMap::new("test", 4, vec![server]).expect("map");
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .table("users", "user_id")
                .table("user_follow", "follower_id")
                .embedded_table("photos", "photo_id"),
        );
        map
    }

    #[test]
    fn embedded_tables_use_a_recorded_key_column_or_the_given_one() {
        let mut map = map();
        let missing = targets(&map, "users", &[]).expect_err("photos has no known owner column");
        assert!(
            missing.to_string().contains("--column photos=COLUMN"),
            "{missing}"
        );
        map.columns.insert(
            "photos".into(),
            "photo_id bigint PRIMARY KEY, user_id bigint NOT NULL, caption text".into(),
        );
        let found = targets(&map, "users", &[]).expect("targets");
        let pairs: Vec<(&str, &str)> = found
            .iter()
            .map(|t| (t.table.as_str(), t.column.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("photos", "user_id"),
                ("user_follow", "follower_id"),
                ("users", "user_id")
            ]
        );
        let given = targets(&map, "users", &["photos=owner".into()]).expect("targets");
        assert_eq!(given[0].column, "owner");
        assert!(targets(&map, "users", &["nope=x".into()]).is_err());
        assert!(targets(&map, "users", &["photos".into()]).is_err());
        assert!(targets(&map, "orders", &[]).is_err());
    }

    #[test]
    fn the_hash_depends_on_salt_group_and_key_and_hides_the_key() {
        let key = KeyValue::Int(7_000_123);
        let a = key_hash(&[1; 32], "users", &key).expect("hash");
        assert!(
            a.starts_with("hmac-sha256:") && !a.contains("7000123"),
            "{a}"
        );
        assert_eq!(a, key_hash(&[1; 32], "users", &key).expect("hash"));
        assert_ne!(a, key_hash(&[2; 32], "users", &key).expect("hash"));
        assert_ne!(a, key_hash(&[1; 32], "orders", &key).expect("hash"));
        assert_ne!(
            a,
            key_hash(&[1; 32], "users", &KeyValue::Int(7_000_124)).expect("hash")
        );
    }
}
