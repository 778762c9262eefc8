//! A photo feed through the proxy: whom a user follows (one server), then the
//! photos of those users newest first, 20 per page, and the next page by
//! keyset (a scatter over every server, merged by the proxy).
//!
//! Against a running dev cluster and proxy — `scripts/quickstart` starts both
//! and prints the proxy's `psql` line; pass that connection string:
//!
//! ```sh
//! cargo run -p shardline-examples --example photo_feed -- "host=127.0.0.1 port=PORT user=postgres dbname=app" [USER_ID]
//! ```
//!
//! It declares and creates `users`, `user_follow` and `photos` (embedded ids)
//! when the map does not have them yet, loads demo users, follows and photos
//! through the proxy (idempotent: rerunning keeps what is there), and prints
//! the first two pages of USER_ID's feed (default 42). The dev cluster is found
//! in `SHARDLINE_DEV_DIR` (default `$TMPDIR/shardline-dev`), the map's cluster
//! name in `SHARDLINE_CLUSTER` (default `default`); `SHARDLINE_PROXY` may
//! replace the first argument.

use std::error::Error;
use std::path::PathBuf;

use shardline_examples::feed::{
    self, describe_error, utc_text, DemoData, FeedStatements, Photo, PAGE_SIZE, TABLES,
};
use shardmap::{Change, ClusterMap, MapStore, Server};
use tokio_postgres::{Client, NoTls};

/// Demo users 1..=DEMO_USERS (named like the quickstart's users 1..=1000, so
/// running after it keeps its rows as they are).
const DEMO_USERS: i64 = 300;
const FOLLOWS_PER_USER: i64 = 24;
const DEFAULT_VIEWER: i64 = 42;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let proxy = match args.next().or_else(|| std::env::var("SHARDLINE_PROXY").ok()) {
        Some(conninfo) => conninfo,
        None => {
            return Err("give the proxy's connection string, e.g. \
                 \"host=127.0.0.1 port=6432 user=postgres dbname=app\" (scripts/quickstart prints it), \
                 as the first argument or in SHARDLINE_PROXY"
                .into())
        }
    };
    let viewer: i64 = match args.next() {
        Some(text) => text
            .parse()
            .map_err(|e| format!("USER_ID {text:?} is not a user id (a bigint): {e}"))?,
        None => DEFAULT_VIEWER,
    };

    let dir = std::env::var_os("SHARDLINE_DEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("shardline-dev"));
    let state = devcluster::read_state(&dir)?;
    let cluster = std::env::var("SHARDLINE_CLUSTER")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| settings::DEFAULT_CLUSTER.to_string());
    let store = MapStore::connect(&state.etcd_settings(), &cluster)
        .await
        .map_err(|e| format!("cannot read the map of cluster {cluster:?} from etcd: {e}"))?;
    let map = ensure_tables(&store).await?;

    let client = connect(&proxy, "the proxy").await?;
    let data = DemoData::generate(&map, 1..=DEMO_USERS, FOLLOWS_PER_USER)?;
    println!(
        "loading {} users, {} follows and {} photos through the proxy (rows already there are kept)",
        data.users.len(),
        data.follows.len(),
        data.photos.len()
    );
    data.insert(&client)
        .await
        .map_err(|e| format!("loading the demo data: {}", describe_error(&e)))?;

    let followees = feed::followees(&client, viewer)
        .await
        .map_err(|e| format!("{}: {}", feed::FOLLOWEES, describe_error(&e)))?;
    println!(
        "\nuser {viewer} follows {} users on {} servers",
        followees.len(),
        servers_of(&map, &followees)?.len()
    );
    let statements = FeedStatements::prepare(&client)
        .await
        .map_err(|e| format!("preparing the feed: {}", describe_error(&e)))?;
    let first = statements
        .page(&client, &followees, None)
        .await
        .map_err(|e| format!("{}: {}", feed::FIRST_PAGE, describe_error(&e)))?;
    print_page(&map, 1, &first)?;
    match first.last() {
        Some(last) if first.len() == PAGE_SIZE => {
            let second = statements
                .page(&client, &followees, Some(last.cursor()))
                .await
                .map_err(|e| format!("{}: {}", feed::NEXT_PAGE, describe_error(&e)))?;
            print_page(&map, 2, &second)?;
        }
        _ => println!("(the feed fits on one page)"),
    }
    Ok(())
}

/// Declares and creates the feed's tables that the map does not have yet;
/// the map afterwards.
async fn ensure_tables(store: &MapStore) -> Result<ClusterMap> {
    let current = store.load().await?.map;
    if let Some(columns) = current.columns.get("photos") {
        if !columns.contains("created") {
            return Err(format!(
                "table photos exists without the `created` column the feed sorts by (its columns: {columns}); \
                 start a fresh dev cluster (`shardctl dev down`, then `shardctl dev up`) or add it on every \
                 server: ALTER TABLE photos ADD COLUMN created timestamptz NOT NULL DEFAULT now()"
            )
            .into());
        }
    }
    let missing: Vec<(&str, &str)> = TABLES
        .into_iter()
        .filter(|(table, _)| !current.columns.contains_key(*table))
        .collect();
    if missing.is_empty() {
        return Ok(current);
    }
    let names: Vec<&str> = missing.iter().map(|(table, _)| *table).collect();
    let saved = store
        .update("photo_feed example", |map| {
            feed::declare_tables(map);
            for (table, columns) in &missing {
                map.columns.insert(table.to_string(), columns.to_string());
            }
            Ok(Change::new(
                "table create",
                format!("photo feed tables: {}", names.join(", ")),
            ))
        })
        .await?;
    let map = saved.map;
    for server in map.servers.values() {
        let mut statements = Vec::new();
        for (table, columns) in &missing {
            statements.extend(shardmap::ddl::create_statements(
                &map,
                table,
                columns,
                &server.name,
            )?);
        }
        let client = connect(&conninfo(server), &format!("server {}", server.name)).await?;
        client
            .batch_execute(&format!("BEGIN;\n{};\nCOMMIT;", statements.join(";\n")))
            .await
            .map_err(|e| {
                format!(
                    "creating {} on server {}: {}",
                    names.join(", "),
                    server.name,
                    describe_error(&e)
                )
            })?;
    }
    println!("created {} on every server", names.join(", "));
    Ok(map)
}

fn conninfo(server: &Server) -> String {
    let endpoint = &server.primary;
    format!(
        "host={} port={} user={} dbname={}",
        endpoint.host, endpoint.port, endpoint.user, endpoint.dbname
    )
}

async fn connect(conninfo: &str, what: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| format!("cannot connect to {what} ({conninfo}): {e}"))?;
    let what = what.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection to {what} ended: {e}");
        }
    });
    Ok(client)
}

/// The servers owning `users`, by name.
fn servers_of(map: &ClusterMap, users: &[i64]) -> Result<std::collections::BTreeSet<String>> {
    users.iter().map(|user| owner(map, *user)).collect()
}

fn owner(map: &ClusterMap, user: i64) -> Result<String> {
    let partition = map.partition_of("users", &shardmap::KeyValue::Int(user))?;
    Ok(map.assignments[partition as usize].owner.clone())
}

fn print_page(map: &ClusterMap, number: usize, page: &[Photo]) -> Result<()> {
    println!("\npage {number} ({} photos)", page.len());
    println!(
        "{:>20}  {:>7}  {:<6}  {:<26}  caption",
        "photo_id", "user_id", "server", "created (UTC)"
    );
    for photo in page {
        println!(
            "{:>20}  {:>7}  {:<6}  {:<26}  {}",
            photo.photo_id,
            photo.user_id,
            owner(map, photo.user_id)?,
            utc_text(photo.created),
            photo.caption
        );
    }
    Ok(())
}
