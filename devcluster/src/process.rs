//! The processes of a local cluster: etcd and Postgres servers, each on free
//! loopback ports, started detached (their own session, output to a log file)
//! so that `shardctl dev up` can exit and leave them running.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::tools::{run, Tools};
use crate::{wait_until, DevCertificates, DevError, EtcdState, PgState};

/// Ports handed out by this process, so two clusters started side by side in
/// one test binary never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16, DevError> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(DevError::io("cannot bind a loopback port"))?;
        let port = listener
            .local_addr()
            .map_err(DevError::io("cannot read a bound port"))?
            .port();
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(DevError::Failed("no free loopback port found".into()))
}

fn log_file(path: &Path) -> Result<File, DevError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(DevError::io(format!("cannot open log {}", path.display())))
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: sending a signal to a pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// An etcd server with its data in one directory.
pub struct EtcdProcess {
    child: Option<Child>,
    pid: u32,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    data_dir: PathBuf,
    etcd_bin: PathBuf,
    /// Serve clients over TLS with these, requiring a client certificate.
    certs: Option<DevCertificates>,
    token_ttl: Option<u32>,
}

impl EtcdProcess {
    /// Starts etcd on free ports with its data in `data_dir`; with `certs`,
    /// clients must speak TLS and present a certificate of that CA.
    pub fn start(
        tools: &Tools,
        data_dir: &Path,
        certs: Option<&DevCertificates>,
        token_ttl: Option<u32>,
    ) -> Result<EtcdProcess, DevError> {
        let mut etcd = EtcdProcess {
            child: None,
            pid: 0,
            client_port: free_port()?,
            peer_port: free_port()?,
            metrics_port: free_port()?,
            data_dir: data_dir.to_path_buf(),
            etcd_bin: tools.etcd.clone(),
            certs: certs.cloned(),
            token_ttl,
        };
        etcd.launch()?;
        Ok(etcd)
    }

    fn launch(&mut self) -> Result<(), DevError> {
        fs::create_dir_all(&self.data_dir).map_err(DevError::io(format!(
            "cannot create {}",
            self.data_dir.display()
        )))?;
        let log_path = self.data_dir.with_extension("log");
        let log = log_file(&log_path)?;
        let err_log = log
            .try_clone()
            .map_err(DevError::io("cannot clone log handle"))?;
        let client = self.state().endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.etcd_bin);
        if let Some(certs) = &self.certs {
            command
                .arg(format!("--cert-file={}", certs.server_cert.display()))
                .arg(format!("--key-file={}", certs.server_key.display()))
                .arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", certs.ca_cert.display()));
        }
        if let Some(ttl) = self.token_ttl {
            command.arg(format!("--auth-token-ttl={ttl}"));
        }
        command
            .arg("--name=shardline-dev")
            .arg(format!(
                "--data-dir={}",
                self.data_dir.join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=shardline-dev={peer}"))
            // /health without TLS or a client certificate, for the checks here.
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        // SAFETY: setsid is async-signal-safe; it detaches etcd from our
        // terminal's process group so Ctrl-C on shardctl does not kill it.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().map_err(DevError::io(format!(
            "cannot start {}",
            self.etcd_bin.display()
        )))?;
        self.pid = child.id();
        self.child = Some(child);
        let state = self.state();
        if !wait_until(Duration::from_secs(20), || etcd_healthy(&state)) {
            let _ = self.kill();
            return Err(DevError::Failed(format!(
                "etcd did not become healthy on port {}; its log says:\n{}",
                state.client_port,
                tail(&log_path)
            )));
        }
        Ok(())
    }

    pub fn state(&self) -> EtcdState {
        EtcdState {
            pid: self.pid,
            client_port: self.client_port,
            peer_port: self.peer_port,
            data_dir: self.data_dir.clone(),
            tls: self.certs.is_some(),
            metrics_port: Some(self.metrics_port),
        }
    }

    pub fn endpoint(&self) -> String {
        self.state().endpoint()
    }

    /// Kills etcd at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> Result<(), DevError> {
        self.terminate(libc::SIGKILL)
    }

    /// Stops etcd cleanly (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) -> Result<(), DevError> {
        self.terminate(libc::SIGTERM)
    }

    fn terminate(&mut self, sig: libc::c_int) -> Result<(), DevError> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), sig);
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
            Ok(())
        } else {
            stop_etcd_pid(&self.state())
        }
    }

    /// Starts etcd again on the same ports with the same data (after `kill`/`stop`).
    pub fn restart(&mut self) -> Result<(), DevError> {
        self.launch()
    }
}

/// Asks etcd's `/health` endpoint whether it is serving (on the plain-HTTP
/// metrics port: the client port may want TLS and a client certificate).
fn etcd_healthy(state: &EtcdState) -> bool {
    let port = state.metrics_port.unwrap_or(state.client_port);
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// Whether the etcd recorded in `state` still runs (the pid is alive and is
/// an etcd using that data directory, not a recycled pid).
pub fn etcd_alive(state: &EtcdState) -> bool {
    if !pid_alive(state.pid) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{}/cmdline", state.pid)).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("etcd") && cmdline.contains(&*state.data_dir.to_string_lossy())
}

/// Stops (SIGTERM, then SIGKILL) process `pid` if its command line names
/// `program` — never a recycled pid of something else.
pub fn stop_named_pid(pid: u32, program: &str) {
    let is_it = || {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        pid_alive(pid) && String::from_utf8_lossy(&cmdline).contains(program)
    };
    if !is_it() {
        return;
    }
    signal(pid, libc::SIGTERM);
    if !wait_until(Duration::from_secs(5), || !is_it()) {
        signal(pid, libc::SIGKILL);
    }
}

/// Stops an etcd this process did not start.
pub fn stop_etcd_pid(state: &EtcdState) -> Result<(), DevError> {
    if !etcd_alive(state) {
        return Ok(());
    }
    signal(state.pid, libc::SIGTERM);
    if !wait_until(Duration::from_secs(10), || !etcd_alive(state)) {
        signal(state.pid, libc::SIGKILL);
        if !wait_until(Duration::from_secs(5), || !etcd_alive(state)) {
            return Err(DevError::Failed(format!(
                "etcd (pid {}) did not stop",
                state.pid
            )));
        }
    }
    Ok(())
}

/// A Postgres server with its own data directory.
pub struct PgServer {
    name: String,
    port: u16,
    data_dir: PathBuf,
    tools: Tools,
    running: bool,
}

impl PgServer {
    /// Copies the `template` data directory to `data_dir`, configures it for
    /// logical replication on a free port, and starts it.
    pub fn start(
        tools: &Tools,
        template: &Path,
        data_dir: &Path,
        name: &str,
        fsync: bool,
        tls: Option<&DevCertificates>,
    ) -> Result<PgServer, DevError> {
        if !data_dir.join("PG_VERSION").exists() {
            let mut copy = tools.as_pg_user("cp");
            copy.arg("-a").arg(template).arg(data_dir);
            run(&mut copy, "copying the template data directory")?;
        }
        PgServer::configure_and_launch(tools, data_dir, name, fsync, tls)
    }

    /// Starts a streaming read replica of `primary` in `data_dir`
    /// (pg_basebackup with a standby.signal), on a free port.
    pub fn start_replica(
        tools: &Tools,
        primary: &PgServer,
        data_dir: &Path,
        name: &str,
    ) -> Result<PgServer, DevError> {
        if !data_dir.join("PG_VERSION").exists() {
            let mut backup = tools.pg_command("pg_basebackup");
            backup
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                ])
                .arg(data_dir)
                .args(["-R", "-X", "stream", "--no-sync"]);
            run(&mut backup, &format!("pg_basebackup of {}", primary.name))?;
        }
        // The base backup holds the primary's TLS settings and pg_hba.conf.
        PgServer::configure_and_launch(tools, data_dir, name, false, None)
    }

    fn configure_and_launch(
        tools: &Tools,
        data_dir: &Path,
        name: &str,
        fsync: bool,
        tls: Option<&DevCertificates>,
    ) -> Result<PgServer, DevError> {
        let port = free_port()?;
        // Appended last, so these win over what a template or base backup holds.
        // max_prepared_transactions: two-phase commit of writes on several
        // servers (0, the default, refuses PREPARE TRANSACTION; it needs a
        // restart, so it is here from the start).
        let settings = format!(
            "\n# shardline dev cluster\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket}'\n\
             wal_level = logical\n\
             max_wal_senders = 32\n\
             max_replication_slots = 32\n\
             max_logical_replication_workers = 16\n\
             wal_retrieve_retry_interval = 500ms\n\
             max_worker_processes = 24\n\
             max_connections = 300\n\
             max_prepared_transactions = 64\n\
             shared_buffers = 64MB\n\
             fsync = {fsync}\n\
             synchronous_commit = {fsync}\n\
             full_page_writes = {fsync}\n\
             log_min_messages = warning\n",
            socket = data_dir.display(),
            fsync = if fsync { "on" } else { "off" },
        );
        let mut settings = settings;
        if let Some(certs) = tls {
            // The files stay in <dir>/tls (handed to the postgres user);
            // ssl_ca_file makes the server ask for a client certificate and
            // check the one shardline shows.
            settings.push_str(&format!(
                "ssl = on
ssl_cert_file = '{}'
ssl_key_file = '{}'
ssl_ca_file = '{}'
",
                certs.server_cert.display(),
                certs.server_key.display(),
                certs.ca_cert.display(),
            ));
            // TCP only over TLS: a clear-text connection finds no hba line.
            write_as_pg_user(
                tools,
                &data_dir.join("pg_hba.conf"),
                "# shardline dev cluster with TLS: TCP connections over TLS only
                 local all all trust
                 local replication all trust
                 hostssl all all 127.0.0.1/32 trust
                 hostssl replication all 127.0.0.1/32 trust
",
                false,
            )?;
        }
        write_as_pg_user(
            tools,
            &data_dir.join("postgresql.auto.conf"),
            &settings,
            true,
        )?;
        let mut server = PgServer {
            name: name.to_string(),
            port,
            data_dir: data_dir.to_path_buf(),
            tools: tools.clone(),
            running: false,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), DevError> {
        let log = self.data_dir.with_extension("log");
        let mut command = self.tools.pg_command("pg_ctl");
        command
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60"])
            .stdin(Stdio::null());
        if let Err(e) = run(&mut command, &format!("starting Postgres {}", self.name)) {
            // pg_ctl may have given up waiting on a server that still starts.
            let _ = stop_postgres(&self.tools, &self.data_dir);
            return Err(DevError::Failed(format!(
                "{e}\nits log says:\n{}",
                tail(&log)
            )));
        }
        self.running = true;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> PgState {
        PgState {
            name: self.name.clone(),
            port: self.port,
            data_dir: self.data_dir.clone(),
        }
    }

    /// Stops the server (fast shutdown: running transactions are rolled back).
    pub fn stop(&mut self) -> Result<(), DevError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        stop_postgres(&self.tools, &self.data_dir)
    }

    /// Kills the server abruptly (immediate shutdown, crash recovery on restart).
    pub fn kill(&mut self) -> Result<(), DevError> {
        self.running = false;
        let mut command = self.tools.pg_command("pg_ctl");
        command
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w"]);
        run(&mut command, &format!("killing Postgres {}", self.name))
    }

    /// Starts the server again after `stop` or `kill`.
    pub fn restart(&mut self) -> Result<(), DevError> {
        self.launch()
    }
}

/// Writes (or appends) `text` to `path` as the user Postgres runs as, so
/// the file stays that user's.
fn write_as_pg_user(tools: &Tools, path: &Path, text: &str, append: bool) -> Result<(), DevError> {
    let mut tee = tools.as_pg_user("tee");
    if append {
        tee.arg("-a");
    }
    tee.arg(path).stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = tee.spawn().map_err(DevError::io("cannot run tee"))?;
    if let Some(stdin) = child.stdin.as_mut() {
        stdin
            .write_all(text.as_bytes())
            .map_err(DevError::io(format!("cannot write {}", path.display())))?;
    }
    drop(child.stdin.take());
    let status = child.wait().map_err(DevError::io("cannot wait for tee"))?;
    if !status.success() {
        return Err(DevError::Failed(format!("cannot write {}", path.display())));
    }
    Ok(())
}

/// Stops the Postgres server of `data_dir` if it runs.
pub fn stop_postgres(tools: &Tools, data_dir: &Path) -> Result<(), DevError> {
    if !data_dir.join("postmaster.pid").exists() {
        return Ok(());
    }
    // A postmaster.pid left by a crash or reboot names no running server:
    // `pg_ctl status` says so (exit 3) and there is nothing to stop.
    let status = tools
        .pg_command("pg_ctl")
        .arg("status")
        .arg("-D")
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(DevError::io("cannot run pg_ctl status"))?;
    if status.code() == Some(3) {
        return Ok(());
    }
    let mut command = tools.pg_command("pg_ctl");
    command
        .arg("stop")
        .arg("-D")
        .arg(data_dir)
        .args(["-m", "fast", "-w", "-t", "60"]);
    run(
        &mut command,
        &format!("stopping Postgres in {}", data_dir.display()),
    )
}
