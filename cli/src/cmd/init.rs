//! `shardctl init`: creates the cluster map in etcd, with its partition
//! count (fixed for the cluster's life) and first servers.

use anyhow::{anyhow, Result};
use clap::Args;
use shardmap::{ClusterMap, Endpoint, Server, ServerState};

use crate::context::Context;
use crate::output::print_json;

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

#[cfg(test)]
mod tests {
    use super::*;

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
