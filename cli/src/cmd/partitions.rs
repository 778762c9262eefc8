//! `shardctl partition pin|unpin`: keep partitions in a region (data
//! residency). Also parses partition numbers and sets for other commands.

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use shardmap::Change;

use crate::context::Context;
use crate::output::ranges;

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

/// A partition number written in `spec`.
pub(crate) fn parse_partition(text: &str, spec: &str) -> Result<u32> {
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{spec:?}: partition {text:?} is not a number"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_sets_parse_and_check_bounds() {
        assert_eq!(
            parse_partition_set("0-2,5", 8).expect("parses"),
            vec![0, 1, 2, 5]
        );
        assert!(parse_partition_set("6-9", 8).is_err());
        assert!(parse_partition_set("3-1", 8).is_err());
    }
}
