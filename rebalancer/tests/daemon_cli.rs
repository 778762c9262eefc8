//! The `shardline-rebalancer` binary's command line: bad settings stop it
//! with a message that says what is wrong (and cargo builds the binary for
//! the crash tests, which run it as a real process).

use std::process::Command;

#[test]
fn a_bad_config_file_is_refused_with_its_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rebalancer.toml");
    std::fs::write(&path, "max_moves = 3\n").expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_shardline-rebalancer"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run the rebalancer");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_moves"), "stderr: {stderr}");
}

#[test]
fn a_missing_config_file_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_shardline-rebalancer"))
        .args(["--config", "/nonexistent/rebalancer.toml"])
        .output()
        .expect("run the rebalancer");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/rebalancer.toml"),
        "stderr: {stderr}"
    );
}
