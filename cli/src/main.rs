//! shardctl: the DBA's command line for a shardline cluster.
//!
//! Commands that change the map go through `MapStore::update`: one
//! compare-and-swap transaction per change, recorded in the history.

mod commands;
mod config;
mod dev;
mod jobs;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Init(commands::InitArgs),
    /// Add, list, drain, activate or remove Postgres servers.
    #[command(subcommand)]
    Server(commands::ServerCommand),
    /// Declare co-location groups: key type and sharding method.
    #[command(subcommand)]
    Group(commands::GroupCommand),
    /// Declare sharded, reference and unsharded tables.
    #[command(subcommand)]
    Table(commands::TableCommand),
    /// Pin partitions to a region (data residency), or unpin them.
    #[command(subcommand)]
    Partition(commands::PartitionCommand),
    /// Show who owns what: partitions per server.
    Map(commands::MapArgs),
    /// Show which partition and server a key of a table belongs to.
    Lookup(commands::LookupArgs),
    /// Show the history of map changes.
    History(commands::HistoryArgs),
    /// Move one partition to another server (a job the rebalancer runs).
    Move(jobs::MoveArgs),
    /// Plan moves that even out the servers, and submit them (or --dry-run).
    Rebalance(jobs::RebalanceArgs),
    /// Mark a server draining and move every partition off it.
    Drain(jobs::DrainArgs),
    /// Show move jobs (phase, bytes copied, lag, ETA) and leftover replication objects.
    Status(jobs::StatusArgs),
    /// Cancel a move that has not switched yet (it is rolled back).
    Cancel(jobs::CancelArgs),
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
    let context = commands::Context::new(&cli);
    match cli.command {
        Command::Init(args) => commands::init(&context, args).await,
        Command::Server(command) => commands::server(&context, command).await,
        Command::Group(command) => commands::group(&context, command).await,
        Command::Table(command) => commands::table(&context, command).await,
        Command::Partition(command) => commands::partition(&context, command).await,
        Command::Map(args) => commands::map(&context, args).await,
        Command::Lookup(args) => commands::lookup(&context, args).await,
        Command::History(args) => commands::history(&context, args).await,
        Command::Move(args) => jobs::move_partition(&context, args).await,
        Command::Rebalance(args) => jobs::rebalance(&context, args).await,
        Command::Drain(args) => jobs::drain(&context, args).await,
        Command::Status(args) => jobs::status(&context, args).await,
        Command::Cancel(args) => jobs::cancel(&context, args).await,
        Command::Dev(command) => dev::run(&context, command).await,
    }
}
