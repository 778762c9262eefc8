//! shardctl: the DBA's command line for a shardline cluster.
//!
//! Commands that change the map go through `MapStore::update`: one
//! compare-and-swap transaction per change, recorded in the history.
//!
//! - [`cmd`]: the commands, one module per group;
//! - [`context`]: what every command is given (etcd, credentials, output);
//! - [`config`]: where the settings come from;
//! - [`output`], [`progress`]: tables and JSON; progress bars.

mod cmd;
mod config;
mod context;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cmd::{
    dev, erase, groups, history, init, map, moves, partitions, prune, servers, status, tables,
};

#[derive(Debug, Parser)]
#[command(
    name = "shardctl",
    version,
    about = "Manage a shardline cluster: map, servers, tables, partition moves, history, local dev cluster"
)]
pub struct Cli {
    /// TOML config file (cluster name, etcd endpoints).
    #[arg(long, env = "SHARDLINE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// etcd endpoints, comma-separated, e.g. http://127.0.0.1:2379
    /// (overrides SHARDLINE_ETCD and the config).
    #[arg(long, global = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Cluster name (overrides SHARDLINE_CLUSTER and the config; default: "default").
    #[arg(long, global = true)]
    cluster: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Who to record in the history as making the change (default: user@host).
    #[arg(long, env = "SHARDLINE_ACTOR", global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the cluster map in etcd: partition count and first servers.
    Init(init::InitArgs),
    /// Add, list, drain, activate or remove Postgres servers.
    #[command(subcommand)]
    Server(servers::ServerCommand),
    /// Declare co-location groups: key type and sharding method.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// Declare sharded, reference and unsharded tables.
    #[command(subcommand)]
    Table(tables::TableCommand),
    /// Pin partitions to a region (data residency), or unpin them.
    #[command(subcommand)]
    Partition(partitions::PartitionCommand),
    /// Show who owns what: partitions per server.
    Map(map::MapArgs),
    /// Show which partition and server a key of a table belongs to.
    Lookup(map::LookupArgs),
    /// Show the history of map changes.
    History(history::HistoryArgs),
    /// Delete every row of one key in every table of its group (GDPR
    /// erasure), recorded in the history without the key in clear.
    Erase(erase::EraseArgs),
    /// Move one partition to another server (a job the rebalancer runs).
    Move(moves::MoveArgs),
    /// Plan moves that even out the servers, and submit them (or --dry-run).
    Rebalance(moves::RebalanceArgs),
    /// Mark a server draining and move every partition off it.
    Drain(moves::DrainArgs),
    /// Show move jobs (phase, bytes copied, lag, ETA) and leftover replication objects.
    Status(status::StatusArgs),
    /// Delete the records of finished move jobs (`status --all` lists them).
    Prune(prune::PruneArgs),
    /// Cancel a move that has not switched yet (it is rolled back).
    Cancel(moves::CancelArgs),
    /// Run a local cluster (etcd + Postgres servers) for development.
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging("warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let context = context::Context::new(&cli);
    match cli.command {
        Command::Init(args) => init::init(&context, args).await,
        Command::Server(command) => servers::server(&context, command).await,
        Command::Group(command) => groups::group(&context, command).await,
        Command::Table(command) => tables::table(&context, command).await,
        Command::Partition(command) => partitions::partition(&context, command).await,
        Command::Map(args) => map::map(&context, args).await,
        Command::Lookup(args) => map::lookup(&context, args).await,
        Command::History(args) => history::history(&context, args).await,
        Command::Erase(args) => erase::erase(&context, args).await,
        Command::Move(args) => moves::move_partition(&context, args).await,
        Command::Rebalance(args) => moves::rebalance(&context, args).await,
        Command::Drain(args) => moves::drain(&context, args).await,
        Command::Status(args) => status::status(&context, args).await,
        Command::Prune(args) => prune::prune(&context, args).await,
        Command::Cancel(args) => moves::cancel(&context, args).await,
        Command::Dev(command) => dev::run(&context, command).await,
    }
}
