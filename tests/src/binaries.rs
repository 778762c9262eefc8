//! The workspace's own programs as real processes: `shardctl` commands, and
//! `shardline-rebalancer` daemons that a test can kill mid-move.

use std::path::PathBuf;
use std::time::Duration;

use rebalancer::config::RebalancerConfig;

use crate::TestCluster;

/// The `shardline-rebalancer` binary of this build. `cargo test --workspace`
/// builds it (the rebalancer package has integration tests of its own); a
/// narrower `cargo test` run builds it here.
pub fn rebalancer_binary() -> PathBuf {
    workspace_binary("rebalancer", "shardline-rebalancer")
}

/// A binary of this workspace's build (built here if a narrow test run did
/// not build it).
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let binary = profile_dir.join(name);
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build {name}");
    }
    binary
}

/// Runs `shardctl` against `cluster`/`name` as actor `test`, whatever it
/// exits with.
pub fn shardctl_output(cluster: &TestCluster, name: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(workspace_binary("shardctl", "shardctl"))
        .args(args)
        .envs(cluster.etcd_env())
        .env("SHARDLINE_CLUSTER", name)
        .env("SHARDLINE_ACTOR", "test")
        .env_remove("SHARDLINE_CONFIG")
        .output()
        .expect("run shardctl")
}

/// Runs `shardctl` against `cluster`/`name`; returns stdout, panics on failure.
pub fn shardctl(cluster: &TestCluster, name: &str, args: &[&str]) -> String {
    let output = shardctl_output(cluster, name, args);
    assert!(
        output.status.success(),
        "shardctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `shardline-rebalancer` process; killed (SIGKILL) when dropped.
pub struct RebalancerProcess {
    pub child: std::process::Child,
    pub id: String,
}

impl RebalancerProcess {
    /// Starts one with `config`, crashing at `failpoint` if given.
    pub fn start(
        config: &RebalancerConfig,
        id: &str,
        failpoint: Option<&str>,
        dir: &std::path::Path,
    ) -> RebalancerProcess {
        let path = dir.join(format!("{id}.toml"));
        let text = format!(
            "cluster = {:?}\nleader_ttl_seconds = {}\n[etcd]\n{}",
            config.cluster,
            config.leader_ttl_seconds,
            toml::to_string(&config.etcd).expect("etcd settings encode")
        );
        std::fs::write(&path, text).expect("write rebalancer config");
        let mut command = std::process::Command::new(rebalancer_binary());
        command
            .arg("--config")
            .arg(&path)
            .args(["--id", id])
            .env("SHARDLINE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(point) = failpoint {
            command.env("SHARDLINE_FAILPOINT", point);
        }
        RebalancerProcess {
            child: command.spawn().expect("start shardline-rebalancer"),
            id: id.to_string(),
        }
    }

    /// Waits for the process to end by itself; `None` on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout).await
    }
}

impl Drop for RebalancerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `shardline-proxy` process on a free port (trust auth); killed
/// (SIGKILL) when dropped. The crash tests arm a failpoint with it.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub port: u16,
}

impl ProxyProcess {
    /// Starts one registered as `id`, crashing at `failpoint` if given;
    /// waits until it accepts connections.
    pub async fn start(
        cluster: &TestCluster,
        cluster_name: &str,
        id: &str,
        failpoint: Option<&str>,
    ) -> ProxyProcess {
        ProxyProcess::start_with(cluster, cluster_name, id, failpoint, &[]).await
    }

    /// As `start`, with more environment (`SHARDLINE_PROXY_THREADS`,
    /// `SHARDLINE_PROXY_CONFIG`, ...).
    pub async fn start_with(
        cluster: &TestCluster,
        cluster_name: &str,
        id: &str,
        failpoint: Option<&str>,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = std::process::Command::new(workspace_binary("proxy", "shardline-proxy"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(cluster.etcd_env())
            .args(["--cluster", cluster_name])
            .args(["--auth-method", "trust"])
            .args(["--id", id])
            .env(
                "SHARDLINE_LOG",
                std::env::var("SHARDLINE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("SHARDLINE_PROXY_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SHARDLINE_TEST_PROXY_LOGS=DIR keeps each proxy's log there.
        if let Some(dir) = std::env::var_os("SHARDLINE_TEST_PROXY_LOGS") {
            if let Ok(file) =
                std::fs::File::create(std::path::Path::new(&dir).join(format!("{id}.log")))
            {
                command.stderr(file);
            }
        }
        if let Some(point) = failpoint {
            command.env("SHARDLINE_FAILPOINT", point);
        }
        command.envs(env.iter().copied());
        let process = ProxyProcess {
            child: command.spawn().expect("start shardline-proxy"),
            port,
        };
        let up = serves_within(&process.conninfo(), Duration::from_secs(20)).await;
        assert!(up, "shardline-proxy {id} never served");
        process
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Waits for the process to end by itself; `None` on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, timeout).await
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to end by itself; `None` on timeout.
async fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a proxy (or server) at `conninfo` answers `SELECT 1` within
/// `timeout`: for a process that was just started.
pub async fn serves_within(conninfo: &str, timeout: Duration) -> bool {
    crate::eventually(timeout, || {
        let conninfo = conninfo.to_string();
        async move {
            match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    client.simple_query("SELECT 1").await.is_ok()
                }
                Err(_) => false,
            }
        }
    })
    .await
}
