//! COPY FROM STDIN into a sharded table through the real proxy over three
//! real Postgres servers, from the clients that send it: psql `\copy` (CSV
//! with a header, 100,000 rows), psycopg 3 `cursor.copy()` (text) and
//! asyncpg `copy_records_to_table` (binary). Every row lands once, on its
//! key's owner (checked on the servers directly); a bad row in the middle
//! leaves nothing on any server and reports its line; inside a transaction
//! the COPY commits or rolls back with it.

use std::io::Write;
use std::process::{Command, Stdio};

use shardline_tests::fixtures::{check_placement, create_table, init_schema};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType};

const CLUSTER: &str = "copyacross";

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("events", "user_id"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "events",
        "user_id bigint, seq int, note text, PRIMARY KEY (user_id, seq)",
    )
    .await;
    map
}

fn psql(port: u16, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    if let Some(input) = stdin {
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(input.as_bytes()).expect("psql stdin");
        }
    }
    child.wait_with_output().expect("psql ends")
}

fn python(program: &str) -> std::process::Output {
    Command::new("python3")
        .arg("-c")
        .arg(program)
        .output()
        .expect("python3 runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_splits_rows_by_owner() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let port = proxy.addr.port();
    let dir = tempfile::tempdir().expect("temp dir");

    // psql \copy, CSV with a header, 100,000 rows over every partition.
    let keys: Vec<i64> = (1..=100_000).collect();
    let path = dir.path().join("events.csv");
    let mut csv = String::from("user_id,seq,note\n");
    for key in &keys {
        csv.push_str(&format!("{key},1,\"psql, csv\"\n"));
    }
    std::fs::write(&path, csv).expect("write the CSV");
    let copy = format!(
        "\\copy events (user_id, seq, note) FROM '{}' WITH (FORMAT csv, HEADER true)",
        path.display()
    );
    let loaded = tokio::task::spawn_blocking(move || psql(port, &["-c", &copy], None))
        .await
        .expect("psql task");
    assert!(
        loaded.status.success(),
        "psql \\copy failed: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    check_placement(&cluster, &map, "events", "user_id", "psql, csv", &keys).await;

    // A bad row in the middle: nothing anywhere, and its line reported.
    let bad = dir.path().join("bad.csv");
    let mut text = String::new();
    for key in 1..=1000i64 {
        if key == 600 {
            text.push_str("600,not a number,bad\n");
        } else {
            text.push_str(&format!("{key},2,bad\n"));
        }
    }
    std::fs::write(&bad, text).expect("write the bad CSV");
    let copy = format!(
        "\\copy events (user_id, seq, note) FROM '{}' WITH (FORMAT csv)",
        bad.display()
    );
    let failed = tokio::task::spawn_blocking(move || psql(port, &["-c", &copy], None))
        .await
        .expect("psql task");
    assert!(!failed.status.success(), "a bad row must fail the COPY");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("invalid input syntax for type integer"),
        "{stderr}"
    );
    check_placement(&cluster, &map, "events", "user_id", "bad", &[]).await;

    // A bad key: its line, as Postgres numbers it.
    let copy = "\\copy events (user_id, seq, note) FROM stdin WITH (FORMAT csv)".to_string();
    let failed = tokio::task::spawn_blocking(move || {
        psql(
            port,
            &["-c", &copy],
            Some("1,3,badkey\n2,3,badkey\nx,3,badkey\n\\.\n"),
        )
    })
    .await
    .expect("psql task");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
    check_placement(&cluster, &map, "events", "user_id", "badkey", &[]).await;

    // psycopg 3: cursor.copy() in text format, then inside a transaction
    // that rolls back, then one that commits.
    let conninfo = proxy.conninfo();
    let program = format!(
        r#"
import psycopg
with psycopg.connect("{conninfo}", autocommit=True) as conn:
    with conn.cursor() as cur:
        with cur.copy("COPY events (user_id, seq, note) FROM STDIN") as copy:
            for key in range(1, 2001):
                copy.write_row((key, 10, "psycopg"))
    try:
        with conn.transaction():
            with conn.cursor() as cur:
                with cur.copy("COPY events (user_id, seq, note) FROM STDIN") as copy:
                    for key in range(1, 501):
                        copy.write_row((key, 11, "psycopg rolled back"))
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    with conn.transaction():
        with conn.cursor() as cur:
            with cur.copy("COPY events (user_id, seq, note) FROM STDIN") as copy:
                for key in range(1, 301):
                    copy.write_row((key, 12, "psycopg in tx"))
            cur.execute("SELECT count(*) FROM events WHERE note = 'psycopg in tx'")
            print(cur.fetchone()[0])
"#
    );
    let output = tokio::task::spawn_blocking(move || python(&program))
        .await
        .expect("task");
    assert!(
        output.status.success(),
        "psycopg copy failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "300",
        "a read in the transaction sees its COPY"
    );
    check_placement(
        &cluster,
        &map,
        "events",
        "user_id",
        "psycopg",
        &(1..=2000).collect::<Vec<_>>(),
    )
    .await;
    check_placement(
        &cluster,
        &map,
        "events",
        "user_id",
        "psycopg rolled back",
        &[],
    )
    .await;
    check_placement(
        &cluster,
        &map,
        "events",
        "user_id",
        "psycopg in tx",
        &(1..=300).collect::<Vec<_>>(),
    )
    .await;

    // asyncpg: copy_records_to_table sends binary COPY.
    let program = format!(
        r#"
import asyncio, asyncpg
async def main():
    conn = await asyncpg.connect(host="127.0.0.1", port={port}, user="postgres", database="postgres", statement_cache_size=0)
    result = await conn.copy_records_to_table("events", records=[(key, 20, "asyncpg") for key in range(1, 3001)], columns=["user_id", "seq", "note"])
    print(result)
    await conn.close()
asyncio.run(main())
"#
    );
    let output = tokio::task::spawn_blocking(move || python(&program))
        .await
        .expect("task");
    assert!(
        output.status.success(),
        "asyncpg copy failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "COPY 3000");
    check_placement(
        &cluster,
        &map,
        "events",
        "user_id",
        "asyncpg",
        &(1..=3000).collect::<Vec<_>>(),
    )
    .await;

    let mut prepared = 0i64;
    for index in 0..3 {
        let row = cluster
            .connect(index)
            .await
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts");
        prepared += row.get::<_, i64>(0);
    }
    assert_eq!(prepared, 0, "no prepared transaction may be left behind");
}
