//! shardctl end to end: `dev up` starts a real cluster, the map commands work
//! against it, errors exit non-zero with a message, `dev down` leaves nothing running.

use std::path::Path;
use std::process::{Command, Output};

fn shardctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(args)
        .env("SHARDLINE_CONFIG", dir.join("shardline.toml"))
        .env("SHARDLINE_ACTOR", "cli-test")
        .env_remove("SHARDLINE_ETCD")
        .output()
        .expect("shardctl runs")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let output = shardctl(dir, args);
    assert!(
        output.status.success(),
        "shardctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let output = shardctl(dir, args);
    assert!(
        !output.status.success(),
        "shardctl {args:?} should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn dev_cluster_and_map_commands_end_to_end() {
    let temp = tempfile::Builder::new()
        .prefix("shardctl-test-")
        .tempdir()
        .expect("tempdir");
    let dir = temp.path().join("cluster");
    let dir_arg = dir.to_str().expect("utf-8 temp path");

    let up = ok(
        &dir,
        &[
            "dev",
            "up",
            "--dir",
            dir_arg,
            "--servers",
            "2",
            "--partitions",
            "16",
            "--json",
        ],
    );
    let state: serde_json::Value = serde_json::from_str(&up).expect("dev up --json is JSON");
    assert_eq!(state["servers"].as_array().map(Vec::len), Some(2));
    let etcd_pid = state["etcd"]["pid"].as_u64().expect("etcd pid");
    assert!(pid_alive(etcd_pid));

    // A second `dev up` in the same directory is refused.
    assert!(fails(&dir, &["dev", "up", "--dir", dir_arg]).contains("already running"));

    let map: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["map", "--json"])).expect("map JSON");
    assert_eq!(map["partitions"], 16);
    assert_eq!(map["assignments"].as_array().map(Vec::len), Some(16));
    let human = ok(&dir, &["map"]);
    assert!(
        human.contains("pg1") && human.contains("0-7") && human.contains("8-15"),
        "{human}"
    );

    ok(
        &dir,
        &[
            "table",
            "add",
            "users",
            "--key",
            "user_id",
            "--method",
            "hash",
            "--key-type",
            "bigint",
        ],
    );
    ok(
        &dir,
        &[
            "table",
            "add",
            "photos",
            "--key",
            "photo_id",
            "--group",
            "users",
            "--embedded-id",
        ],
    );
    ok(&dir, &["table", "add", "countries", "--reference"]);
    ok(&dir, &["table", "add", "settings", "--home", "pg2"]);
    let tables: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["table", "list", "--json"])).expect("JSON");
    assert_eq!(tables.as_array().map(Vec::len), Some(4));

    let lookup: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["lookup", "users", "42", "--json"])).expect("lookup JSON");
    let partition = lookup["partition"].as_u64().expect("partition");
    assert_eq!(lookup["server"], if partition < 8 { "pg1" } else { "pg2" });

    // A server that cannot be reached cannot join (its tables and the
    // reference rows must be copied first): refused, and out of the map again.
    let unreachable = fails(
        &dir,
        &[
            "server",
            "add",
            "pg9",
            "postgres://postgres@127.0.0.1:1/postgres",
            "--region",
            "eu",
        ],
    );
    assert!(
        unreachable.contains("cannot connect to server pg9")
            && unreachable.contains("taken out of the map again"),
        "{unreachable}"
    );
    let servers: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["server", "list", "--json"])).expect("JSON");
    assert!(
        servers
            .as_array()
            .is_some_and(|a| a.iter().all(|s| s["name"] != "pg9")),
        "{servers}"
    );
    ok(&dir, &["server", "drain", "pg1"]);
    let servers: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["server", "list", "--json"])).expect("JSON");
    let pg1 = servers
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "pg1"))
        .expect("pg1 listed");
    assert_eq!(pg1["state"], "draining");

    // Errors: clear message, non-zero exit, nothing written.
    assert!(fails(&dir, &["server", "drain", "nope"]).contains("no server named \"nope\""));
    assert!(fails(&dir, &["server", "add", "x", "postgres://u:secret@h/db"]).contains("password"));
    assert!(fails(&dir, &["table", "add", "users", "--key", "k"]).contains("already exists"));
    assert!(fails(&dir, &["lookup", "users", "abc"]).contains("not an integer"));
    assert!(
        fails(&dir, &["partition", "pin", "0-3", "--region", "eu"]).contains("must stay in region")
    );
    assert!(fails(&dir, &["server", "remove", "pg2"]).contains("still owns"));

    let history: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["history", "--json"])).expect("JSON");
    let actions: Vec<&str> = history
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["action"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        actions,
        vec![
            "init",
            "table add",
            "table add",
            "table add",
            "table add",
            "server add",
            "server add failed",
            "server drain"
        ]
    );
    assert!(history
        .as_array()
        .expect("array")
        .iter()
        .all(|e| e["actor"] == "cli-test"));
    assert!(ok(&dir, &["history"]).contains("server drain"));

    // Job records: `prune` deletes finished jobs only. No rebalancer runs
    // here, so a submitted move stays pending and must survive it.
    let moved: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["move", "0", "--to", "pg2", "--json"])).expect("JSON");
    let job = moved[0]["id"].as_str().expect("job id").to_string();
    let pruned: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["prune", "--json"])).expect("prune JSON");
    assert_eq!(pruned["jobs"], serde_json::json!([]), "{pruned}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["status", "--json"])).expect("status JSON");
    let jobs = status["jobs"].as_array().expect("jobs");
    assert!(jobs.iter().any(|j| j["id"] == job.as_str()), "{status}");
    // The dev cluster's servers accept two-phase commit and hold nothing prepared.
    assert_eq!(
        status["two_phase_disabled"],
        serde_json::json!([]),
        "{status}"
    );
    assert_eq!(status["prepared"], serde_json::json!([]), "{status}");
    assert!(fails(&dir, &["status", "--prune"]).contains("`shardctl prune`"));

    let pg_pids: Vec<u64> = state["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| {
            let pidfile =
                Path::new(s["data_dir"].as_str().expect("data dir")).join("postmaster.pid");
            std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
                .expect("postmaster pid")
        })
        .collect();
    assert!(pg_pids.iter().all(|pid| pid_alive(*pid)));

    ok(&dir, &["dev", "down", "--dir", dir_arg]);
    assert!(!pid_alive(etcd_pid), "etcd still running after dev down");
    assert!(
        pg_pids.iter().all(|pid| !pid_alive(*pid)),
        "postgres still running after dev down"
    );
    assert!(!dir.exists(), "dev down removes the directory");
    assert!(fails(&dir, &["dev", "down", "--dir", dir_arg]).contains("no dev cluster"));
}

#[test]
fn missing_etcd_configuration_is_explained() {
    let temp = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "--config",
            &temp.path().join("absent.toml").to_string_lossy(),
            "map",
        ])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read config"));
}
