//! `shardctl map` and `shardctl lookup`: who owns what, and where one key
//! lives. Read-only.

use anyhow::{anyhow, bail, Result};
use clap::Args;
use shardmap::{KeyType, TableKind};

use crate::context::Context;
use crate::output::{print_json, ranges_short, table as new_table};

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
