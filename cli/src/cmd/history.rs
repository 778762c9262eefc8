//! `shardctl history`: the map's append-only change log (who, what, when).

use anyhow::Result;
use clap::Args;

use crate::context::Context;
use crate::output::{print_json, table as new_table};

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Show only the newest N entries.
    #[arg(long)]
    pub limit: Option<usize>,
}

pub async fn history(context: &Context, args: HistoryArgs) -> Result<()> {
    let entries = context.store().await?.history(args.limit).await?;
    if context.json {
        return print_json(&entries);
    }
    let mut out = new_table(&["version", "when (UTC)", "actor", "action", "detail"]);
    for entry in &entries {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(entry.at_unix_ms);
        out.add_row(vec![
            entry.version.to_string(),
            humantime::format_rfc3339_seconds(when).to_string(),
            entry.actor.clone(),
            entry.action.clone(),
            entry.detail.clone(),
        ]);
    }
    println!("{out}");
    Ok(())
}
