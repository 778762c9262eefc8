//! Finding the programs a local cluster needs, and running Postgres's as the
//! `postgres` user when we are root.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::DevError;

/// Paths of the programs a local cluster runs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub etcd: PathBuf,
    /// Directory holding `initdb`, `pg_ctl` and `postgres`.
    pub pg_bin: PathBuf,
    /// Whether Postgres commands must run as the `postgres` user.
    run_as_postgres: bool,
}

/// Where Debian puts Postgres 15's server programs (not on PATH by default).
const DEBIAN_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

impl Tools {
    /// Finds etcd and the Postgres 15 programs. `SHARDLINE_ETCD_BIN` and
    /// `SHARDLINE_PG_BIN` override the search.
    pub fn discover() -> Result<Tools, DevError> {
        let etcd = std::env::var_os("SHARDLINE_ETCD_BIN")
            .map(PathBuf::from)
            .or_else(|| find_on_path("etcd"))
            .ok_or_else(|| {
                DevError::Missing(
                    "etcd not found: run scripts/setup (installs Debian's etcd-server)".into(),
                )
            })?;
        let pg_bin = std::env::var_os("SHARDLINE_PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let debian = PathBuf::from(DEBIAN_PG_BIN);
                debian.join("initdb").is_file().then_some(debian)
            })
            .or_else(|| find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
            .ok_or_else(|| {
                DevError::Missing("Postgres 15 server programs (initdb, pg_ctl) not found: run scripts/setup (installs Debian's postgresql-15)".into())
            })?;
        for program in ["initdb", "pg_ctl", "postgres"] {
            if !pg_bin.join(program).is_file() {
                return Err(DevError::Missing(format!(
                    "{program} not found in {}: run scripts/setup, or set SHARDLINE_PG_BIN",
                    pg_bin.display()
                )));
            }
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let run_as_postgres = unsafe { libc::geteuid() } == 0;
        if run_as_postgres && !user_exists("postgres") {
            return Err(DevError::Missing(
                "running as root, but there is no `postgres` user to run Postgres as: run scripts/setup".into(),
            ));
        }
        Ok(Tools {
            etcd,
            pg_bin,
            run_as_postgres,
        })
    }

    /// A command running the Postgres program `program`, as `postgres` when root.
    pub fn pg_command(&self, program: &str) -> Command {
        self.as_pg_user(self.pg_bin.join(program))
    }

    /// A command running `program` as the user Postgres runs as, so that the
    /// files it creates belong to that user.
    pub fn as_pg_user(&self, program: impl AsRef<OsStr>) -> Command {
        if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command.args([
                OsStr::new("-u"),
                OsStr::new("postgres"),
                OsStr::new("--"),
                program.as_ref(),
            ]);
            command
        } else {
            Command::new(program)
        }
    }

    /// Gives `dir` and everything in it to the user Postgres runs as (the
    /// dev certificates: Postgres wants its key owned by itself, and a
    /// subscription's libpq reads the client key as that user).
    pub fn hand_tree_to_postgres(&self, dir: &Path) -> Result<(), DevError> {
        if !self.run_as_postgres {
            return Ok(());
        }
        run(
            Command::new("chown").args([
                OsStr::new("-R"),
                OsStr::new("postgres:postgres"),
                dir.as_os_str(),
            ]),
            "chown -R",
        )
    }

    /// Makes `dir` usable by the user Postgres runs as.
    pub fn hand_to_postgres(&self, dir: &Path) -> Result<(), DevError> {
        if !self.run_as_postgres {
            return Ok(());
        }
        run(
            Command::new("chown").args([OsStr::new("postgres:postgres"), dir.as_os_str()]),
            "chown",
        )?;
        let reachable = self
            .as_pg_user("test")
            .arg("-w")
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !reachable {
            return Err(DevError::Failed(format!(
                "the postgres user cannot write to {} (a parent directory is private?): choose a directory under /tmp",
                dir.display()
            )));
        }
        Ok(())
    }

    /// Creates a Postgres data directory (trust auth on loopback, UTF-8, C collation).
    pub fn initdb(&self, data_dir: &Path) -> Result<(), DevError> {
        let mut command = self.pg_command("initdb");
        command.arg("-D").arg(data_dir).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        run(&mut command, "initdb")
    }
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a command to completion; a failure carries its stderr.
pub(crate) fn run(command: &mut Command, what: &str) -> Result<(), DevError> {
    let output = command
        .output()
        .map_err(DevError::io(format!("cannot run {what}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DevError::Failed(format!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
