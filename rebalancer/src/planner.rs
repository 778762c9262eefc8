//! Which partitions to move, and where: empties draining servers, then
//! evens out the load of the active servers (bytes, or partition counts),
//! moving as little as possible. A partition pinned to a region only ever
//! goes to a server of that region. Pure: sizes come in, moves come out.

use std::collections::BTreeMap;

use serde::Serialize;
use shardmap::{ClusterMap, PartitionState, ServerState};

/// What to balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Total bytes of each server's leaves.
    Bytes,
    /// Number of partitions.
    Count,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedMove {
    pub partition: u32,
    pub from: String,
    pub to: String,
    pub bytes: u64,
    /// Why: `drain` (leaving a draining server) or `balance`.
    pub reason: &'static str,
}

/// Plans the moves. `sizes[p]` is partition `p`'s size in bytes (missing: 0).
/// `tolerance` is the accepted spread, as a fraction of the mean load (0.05:
/// servers end within about 5% of each other when partition sizes allow).
pub fn plan(
    map: &ClusterMap,
    sizes: &[u64],
    balance: Balance,
    tolerance: f64,
) -> Result<Vec<PlannedMove>, String> {
    let active: Vec<&str> = map
        .servers
        .values()
        .filter(|s| s.state == ServerState::Active)
        .map(|s| s.name.as_str())
        .collect();
    if active.is_empty() {
        return Err("no active server to place partitions on".into());
    }
    let weight = |p: u32| -> u64 {
        match balance {
            Balance::Count => 1,
            // Empty partitions still count a little, so they spread too.
            Balance::Bytes => sizes.get(p as usize).copied().unwrap_or(0).max(1),
        }
    };
    let bytes = |p: u32| sizes.get(p as usize).copied().unwrap_or(0);
    let region_of = |server: &str| map.servers.get(server).and_then(|s| s.region.clone());
    let fits = |p: u32, server: &str| -> bool {
        match &map.assignments[p as usize].region {
            Some(region) => region_of(server).as_deref() == Some(region.as_str()),
            None => true,
        }
    };

    // Current placement; partitions mid-move stay where they are.
    let mut owner: Vec<String> = map.assignments.iter().map(|a| a.owner.clone()).collect();
    let movable: Vec<bool> = map
        .assignments
        .iter()
        .map(|a| a.state == PartitionState::Serving)
        .collect();
    let mut load: BTreeMap<&str, u64> = active.iter().map(|s| (*s, 0)).collect();
    for (p, server) in owner.iter().enumerate() {
        if let Some(l) = load.get_mut(server.as_str()) {
            *l += weight(p as u32);
        }
    }
    let mut moves: Vec<PlannedMove> = Vec::new();
    let record = |moves: &mut Vec<PlannedMove>, p: u32, from: &str, to: &str, reason| {
        // A partition moved twice in one plan moves once, from its first owner.
        if let Some(existing) = moves.iter_mut().find(|m| m.partition == p) {
            existing.to = to.to_string();
        } else {
            moves.push(PlannedMove {
                partition: p,
                from: from.to_string(),
                to: to.to_string(),
                bytes: bytes(p),
                reason,
            });
        }
    };

    // 1. Everything on servers that are not active (draining) must leave,
    //    biggest first, each to the least loaded server it fits.
    let mut leaving: Vec<u32> = (0..map.partitions)
        .filter(|p| movable[*p as usize] && !load.contains_key(owner[*p as usize].as_str()))
        .collect();
    leaving.sort_by_key(|p| std::cmp::Reverse(weight(*p)));
    for p in leaving {
        let Some(to) = active
            .iter()
            .filter(|s| fits(p, s))
            .min_by_key(|s| load[*s])
            .copied()
        else {
            return Err(format!(
                "partition {p} must leave {} but no active server is in its region {:?}",
                owner[p as usize], map.assignments[p as usize].region
            ));
        };
        let from = owner[p as usize].clone();
        *load.get_mut(to).ok_or("load")? += weight(p);
        record(&mut moves, p, &from, to, "drain");
        owner[p as usize] = to.to_string();
    }

    // 2. Even out: repeatedly move the partition from the most loaded server
    //    to the least loaded one it fits that best closes their gap, while
    //    that strictly lowers the larger of the two.
    let total: u64 = load.values().sum();
    let mean = total as f64 / active.len() as f64;
    let allowed = (mean * tolerance).max(1.0);
    for _ in 0..(map.partitions as usize * 2) {
        let (&heavy, &heavy_load) = load
            .iter()
            .max_by_key(|(s, l)| (**l, std::cmp::Reverse(**s)))
            .ok_or("no servers")?;
        if (heavy_load as f64) <= mean + allowed / 2.0 {
            break;
        }
        let mut best: Option<(u32, &str, u64)> = None; // partition, to, resulting max
        for p in (0..map.partitions).filter(|p| movable[*p as usize] && owner[*p as usize] == heavy)
        {
            let w = weight(p);
            for (&light, &light_load) in &load {
                if light == heavy || !fits(p, light) {
                    continue;
                }
                let after = (heavy_load - w).max(light_load + w);
                if after < heavy_load && best.is_none_or(|(_, _, b)| after < b) {
                    best = Some((p, light, after));
                }
            }
        }
        let Some((p, to, _)) = best else {
            break;
        };
        let w = weight(p);
        *load.get_mut(heavy).ok_or("load")? -= w;
        *load.get_mut(to).ok_or("load")? += w;
        record(&mut moves, p, heavy, to, "balance");
        owner[p as usize] = to.to_string();
    }
    moves.retain(|m| m.from != m.to);
    Ok(moves)
}

/// Loads per active server after applying `moves` (for reports and tests).
pub fn loads_after(
    map: &ClusterMap,
    sizes: &[u64],
    moves: &[PlannedMove],
) -> BTreeMap<String, u64> {
    let mut owner: Vec<String> = map.assignments.iter().map(|a| a.owner.clone()).collect();
    for m in moves {
        owner[m.partition as usize] = m.to.clone();
    }
    let mut load: BTreeMap<String, u64> = map
        .servers
        .values()
        .filter(|s| s.state == ServerState::Active)
        .map(|s| (s.name.clone(), 0))
        .collect();
    for (p, server) in owner.iter().enumerate() {
        if let Some(l) = load.get_mut(server) {
            *l += sizes.get(p).copied().unwrap_or(0);
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmap::{Endpoint, Server};

    fn server(name: &str, region: Option<&str>) -> Server {
        Server {
            name: name.into(),
            primary: Endpoint::parse(&format!("postgres://{name}:5432/db")).expect("url"),
            replicas: vec![],
            region: region.map(String::from),
            state: ServerState::Active,
        }
    }

    fn spread(map: &ClusterMap, sizes: &[u64], moves: &[PlannedMove]) -> f64 {
        let loads = loads_after(map, sizes, moves);
        let max = *loads.values().max().expect("loads") as f64;
        let min = *loads.values().min().expect("loads") as f64;
        (max - min) / max
    }

    #[test]
    fn a_fourth_server_takes_about_a_quarter() {
        let servers = vec![server("a", None), server("b", None), server("c", None)];
        let mut map = ClusterMap::new("t", 64, servers).expect("map");
        map.servers.insert("d".into(), server("d", None));
        let sizes: Vec<u64> = (0..64)
            .map(|p| 1_000_000 + (p as u64 * 7919) % 200_000)
            .collect();
        let moves = plan(&map, &sizes, Balance::Bytes, 0.05).expect("plan");
        assert!((14..=18).contains(&moves.len()), "moved {}", moves.len());
        assert!(moves.iter().all(|m| m.to == "d"), "{moves:?}");
        assert!(
            spread(&map, &sizes, &moves) < 0.10,
            "spread {}",
            spread(&map, &sizes, &moves)
        );
    }

    #[test]
    fn balanced_cluster_moves_nothing() {
        let servers = vec![server("a", None), server("b", None)];
        let map = ClusterMap::new("t", 16, servers).expect("map");
        let sizes = vec![100; 16];
        assert!(plan(&map, &sizes, Balance::Bytes, 0.05)
            .expect("plan")
            .is_empty());
        assert!(plan(&map, &sizes, Balance::Count, 0.05)
            .expect("plan")
            .is_empty());
    }

    #[test]
    fn draining_empties_the_server_and_regions_are_respected() {
        let servers = vec![
            server("eu1", Some("eu")),
            server("eu2", Some("eu")),
            server("us1", Some("us")),
        ];
        let mut map = ClusterMap::new("t", 16, servers).expect("map");
        for a in map.assignments.iter_mut().filter(|a| a.owner == "eu1") {
            a.region = Some("eu".into());
        }
        let on_eu1 = map.assignments.iter().filter(|a| a.owner == "eu1").count();
        map.servers.get_mut("eu1").expect("eu1").state = ServerState::Draining;
        let sizes = vec![10; 16];
        let moves = plan(&map, &sizes, Balance::Count, 0.05).expect("plan");
        let from_eu1: Vec<_> = moves.iter().filter(|m| m.from == "eu1").collect();
        assert_eq!(from_eu1.len(), on_eu1, "{moves:?}");
        assert!(
            from_eu1.iter().all(|m| m.to == "eu2"),
            "pinned partitions stay in the EU: {moves:?}"
        );
        assert!(moves.iter().all(|m| m.to != "eu1"));
    }

    #[test]
    fn a_pinned_partition_with_no_server_in_its_region_is_an_error() {
        let servers = vec![server("eu1", Some("eu")), server("us1", Some("us"))];
        let mut map = ClusterMap::new("t", 4, servers).expect("map");
        for a in map.assignments.iter_mut().filter(|a| a.owner == "eu1") {
            a.region = Some("eu".into());
        }
        map.servers.get_mut("eu1").expect("eu1").state = ServerState::Draining;
        let error = plan(&map, &[1; 4], Balance::Count, 0.05).expect_err("no EU server left");
        assert!(error.contains("region"), "{error}");
    }

    #[test]
    fn moving_partitions_are_left_alone() {
        let servers = vec![server("a", None), server("b", None)];
        let mut map = ClusterMap::new("t", 8, servers).expect("map");
        for a in map.assignments.iter_mut() {
            a.owner = "a".into();
        }
        map.assignments[0].state = PartitionState::Moving { job: "j".into() };
        let moves = plan(&map, &[1; 8], Balance::Count, 0.05).expect("plan");
        assert_eq!(moves.len(), 4);
        assert!(moves.iter().all(|m| m.partition != 0));
    }
}
