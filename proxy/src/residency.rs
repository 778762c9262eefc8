//! Region residency: a proxy started with `region = "eu"` and
//! `residency = "strict"` serves only the data of partitions that are not
//! pinned (`shardctl partitions pin`) or are pinned to its own region. A
//! statement that would read or write a partition pinned elsewhere — a
//! single-key statement, a write across servers, a scatter read, a COPY row
//! — is refused before anything is sent, so data that must stay in a region
//! never passes through a proxy outside it.
//!
//! The planner and `shardctl move` already keep a pinned partition on
//! servers of its region; this is the other half: the path to it.

use serde::Deserialize;
use shardmap::ClusterMap;

use crate::route::RouteError;

/// How a proxy treats partitions pinned to another region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residency {
    /// The region only guides where statements any server can answer go.
    #[default]
    Off,
    /// Statements on partitions pinned to another region are refused (42501).
    Strict,
}

impl std::str::FromStr for Residency {
    type Err = String;

    fn from_str(text: &str) -> Result<Residency, String> {
        match text {
            "off" => Ok(Residency::Off),
            "strict" => Ok(Residency::Strict),
            other => Err(format!(
                "unknown residency {other:?}: use \"strict\" or \"off\""
            )),
        }
    }
}

/// The region whose partitions a proxy may serve alone, when it enforces one.
pub fn enforced(region: Option<&str>, residency: Residency) -> Option<&str> {
    match residency {
        Residency::Strict => region,
        Residency::Off => None,
    }
}

/// Refuses `partitions` when one is pinned to a region other than `region`
/// (the proxy's, when it enforces residency; `None` allows everything).
pub fn check(region: Option<&str>, map: &ClusterMap, partitions: &[u32]) -> Result<(), RouteError> {
    let Some(region) = region else {
        return Ok(());
    };
    let foreign = partitions.iter().find_map(|p| {
        let pinned = map.assignments.get(*p as usize)?.region.as_deref()?;
        (pinned != region).then_some((*p, pinned))
    });
    match foreign {
        None => Ok(()),
        Some((partition, pinned)) => Err(refusal(region, partition, pinned)),
    }
}

/// The error for a partition pinned to `pinned`, met by a proxy of `region`.
pub fn refusal(region: &str, partition: u32, pinned: &str) -> RouteError {
    RouteError::new(
        "42501",
        format!(
            "partition {partition} is pinned to region \"{pinned}\", and this proxy serves only region \"{region}\" (residency = \"strict\")"
        ),
        format!(
            "connect to a shardline proxy in region \"{pinned}\" for this data; a read across partitions must name keys of region \"{region}\" only"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmap::{Endpoint, Server};

    fn map() -> ClusterMap {
        let server = |name: &str, port: u16| {
            let url = format!("postgres://app@127.0.0.1:{port}/app");
            Server::active(name, Endpoint::parse(&url).expect("endpoint"))
        };
        let mut map =
            ClusterMap::new("test", 4, vec![server("eu1", 1), server("us1", 2)]).expect("map");
        map.assignments[1].region = Some("eu".into());
        map.assignments[2].region = Some("us".into());
        map
    }

    #[test]
    fn only_partitions_pinned_elsewhere_are_refused() {
        let map = map();
        let eu = enforced(Some("eu"), Residency::Strict);
        assert_eq!(check(eu, &map, &[0, 1, 3]), Ok(()));
        let refused = check(eu, &map, &[0, 2]).expect_err("pinned to us");
        assert_eq!(refused.code, "42501");
        assert!(
            refused.message.contains("pinned to region \"us\"")
                && refused.message.contains("region \"eu\""),
            "{}",
            refused.message
        );
        // Off, or strict without a region: nothing is refused.
        assert_eq!(
            check(enforced(Some("eu"), Residency::Off), &map, &[2]),
            Ok(())
        );
        assert_eq!(check(enforced(None, Residency::Strict), &map, &[2]), Ok(()));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("strict".parse(), Ok(Residency::Strict));
        assert_eq!("off".parse(), Ok(Residency::Off));
        assert!("lax".parse::<Residency>().is_err());
    }
}
