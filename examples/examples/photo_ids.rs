//! Photo-sharing ids: a user's photos get embedded ids that carry the user's
//! partition, so `photos` (keyed by photo id) co-locates with `users` (keyed
//! by user id) and a photo id routes without any lookup.
//!
//! Run: `cargo run -p shardline-examples --example photo_ids`

use shardmap::embedded::{IdGenerator, IdLayout};
use shardmap::{
    ClusterMap, Endpoint, Group, KeyType, KeyValue, Method, Server, ServerState, Table, TableKind,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let servers = ["pg1", "pg2", "pg3"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            Ok(Server {
                name: name.to_string(),
                primary: Endpoint::parse(&format!("postgres://app@10.0.0.{}:5432/photos", i + 1))?,
                replicas: Vec::new(),
                region: None,
                state: ServerState::Active,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut map = ClusterMap::new("photos-demo", 1024, servers)?;
    map.groups.insert(
        "users".into(),
        Group {
            name: "users".into(),
            key_type: KeyType::Bigint,
            method: Method::Hash,
        },
    );
    for (table, column, embedded_id) in [("users", "user_id", false), ("photos", "photo_id", true)]
    {
        map.tables.insert(
            table.into(),
            Table {
                name: table.into(),
                kind: TableKind::Sharded {
                    group: "users".into(),
                    key_column: column.into(),
                    embedded_id,
                },
            },
        );
    }
    map.validate()?;

    let layout =
        IdLayout::new(map.partitions).ok_or("partition count too large for embedded ids")?;
    let generator = IdGenerator::new(layout);
    println!("embedded id layout for {} partitions: partition bits start at bit {}, {} low bits per millisecond",
        map.partitions, layout.partition_shift(), layout.low_bits());
    for user_id in [1_i64, 42, 31337] {
        let partition = map.partition_of("users", &KeyValue::Int(user_id))?;
        let owner = map.owner_of(partition).ok_or("partition without owner")?;
        let photo_id = generator
            .next_id(partition)
            .ok_or("partition outside the layout")?;
        let photo_partition = map.partition_of("photos", &KeyValue::Int(photo_id))?;
        let (from, to) = layout
            .partition_bounds(partition)
            .ok_or("partition outside the layout")?;
        println!(
            "user {user_id:>6} -> partition {partition:>4} on {}; new photo id {photo_id} -> partition {photo_partition} \
             (leaf range FROM ({from}) TO ({}))",
            owner.name,
            to.map_or("MAXVALUE".to_string(), |t| t.to_string())
        );
        assert_eq!(partition, photo_partition);
    }
    Ok(())
}
