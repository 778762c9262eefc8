//! Photo-sharing ids: a user's photos get embedded ids that carry the user's
//! partition, so `photos` (keyed by photo id) co-locates with `users` (keyed
//! by user id) and a photo id routes without any lookup.
//!
//! Run: `cargo run -p shardline-examples --example photo_ids`

use shardmap::embedded::{IdGenerator, IdLayout};
use shardmap::{ClusterMap, Endpoint, Group, KeyType, KeyValue, Server};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let servers = ["pg1", "pg2", "pg3"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let url = format!("postgres://app@10.0.0.{}:5432/photos", i + 1);
            Ok(Server::active(name, Endpoint::parse(&url)?))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut map = ClusterMap::new("photos-demo", 1024, servers)?;
    map.declare(
        Group::hash("users", KeyType::Bigint)
            .table("users", "user_id")
            .embedded_table("photos", "photo_id"),
    );
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
