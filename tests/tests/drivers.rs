//! The driver matrix (issue 10): mainstream Postgres drivers, each used from
//! the language its users use it from, against the real proxy over three real
//! servers. Every write names exactly one `user_id`, and the keys are spread
//! over all three servers (a few per server, computed from the map). Every
//! driver also reads across servers (the `scatter_*` cases): keyless
//! aggregates, `user_id = ANY(array)` with ORDER BY/LIMIT/OFFSET, and a
//! transaction's read that sees its own insert until ROLLBACK; their rows are
//! marked with the case's name, which their reads filter on.
//!
//! - psycopg 3, asyncpg (Python), node-postgres (Node.js), pgjdbc (Java): the
//!   programs under `tests/drivers/` run as subprocesses and print one
//!   `CASE <name> PASS|FAIL <reason>` line per case, plus `EXPECT` lines: the
//!   rows a passed case committed (or rolled back).
//! - psql and pgbench (simple/extended/prepared) run as subprocesses too; their
//!   cases are judged here.
//! - tokio-postgres and sqlx (its statement cache) run in this process.
//!
//! After a driver's cases, every `EXPECT` is checked on the servers directly:
//! a committed row is there exactly once, on the owner of its key, and absent
//! from the others; a rolled-back row is nowhere. Each test prints the table
//! of its cases (also written to `$CARGO_TARGET_TMPDIR/driver-matrix-*.txt`)
//! and panics naming the failed ones. A driver whose runtime is missing fails
//! with a message naming `scripts/setup`: nothing is skipped.
//!
//! `SHARDLINE_DRIVER_OUTPUT=1` prints each driver program's raw output; a
//! program can also be run by hand against any proxy, e.g.
//! `python3 tests/drivers/asyncpg_cases.py 127.0.0.1 6432 'pg3=1,5;pg2=2;pg1=3' fetch`.

use std::collections::{BTreeMap, HashMap};
use std::ops::DerefMut;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use shardline_tests::fixtures::{create_table, init_schema};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "drivers";
const PARTITIONS: u32 = 16;
/// User ids picked on each server (the drivers take one or several of each).
const KEYS_PER_SERVER: usize = 8;
/// One case's time limit (the driver programs apply it themselves).
const CASE_TIMEOUT: Duration = Duration::from_secs(20);
/// A whole driver program's time limit.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(150);
/// pgbench picks `\set uid random(1, COUNTER_USERS)`: ids on every server.
const COUNTER_USERS: i64 = 60;

const DRV_COLUMNS: &str = "user_id bigint NOT NULL, item_id bigint NOT NULL, note text NOT NULL, \
     n int, doc jsonb, tag uuid, labels text[], at timestamptz, PRIMARY KEY (user_id, item_id)";
const INSERT: &str = "INSERT INTO drv (user_id, item_id, note) VALUES ($1, $2, $3)";
const NOTE: &str = "SELECT note FROM drv WHERE user_id = $1 AND item_id = $2";
const SET_NOTE: &str = "UPDATE drv SET note = $1, n = 1 WHERE user_id = $2 AND item_id = $3";
const ROWS: &str =
    "SELECT item_id, note, n FROM drv WHERE user_id = $1 AND item_id = ANY($2) ORDER BY item_id";

// Reads across servers (scatter-gather). Every row a scatter case writes
// carries the case's name as its note, and its reads filter on that note:
// earlier cases' rows on the same keys are not part of its answers.
const INSERT_N: &str = "INSERT INTO drv (user_id, item_id, note, n) VALUES ($1, $2, $3, $4)";
/// No key: every server answers, the proxy combines.
const TOTALS: &str = "SELECT count(*), sum(n), min(n), max(n) FROM drv WHERE note = $1";
const GROUPS: &str = "SELECT n % 3, count(*), sum(n) FROM drv WHERE note = $1 \
     GROUP BY n % 3 HAVING count(*) > 1 ORDER BY n % 3";
/// No key: every server answers, the proxy merges the sorted rows.
const MARKED: &str = "SELECT user_id, item_id FROM drv WHERE note = $1 ORDER BY user_id, item_id";
/// The paged read's LIMIT and OFFSET: the page starts inside one server's rows
/// and ends in another's (6 keys of 2 rows each, by user_id DESC).
const PAGE_LIMIT: usize = 5;
const PAGE_OFFSET: usize = 3;

/// Three servers, the sharded tables `drv` and `drv_counters` (bigint hash on
/// `user_id`), and a proxy.
struct Matrix {
    proxy: TestProxy,
    map: ClusterMap,
    /// Server name → user ids it owns.
    keys: BTreeMap<String, Vec<i64>>,
    /// The servers in the order the drivers take their keys: the server the
    /// proxy sends statements without a route to (the first by name) comes
    /// last, so that a statement prepared "anywhere" and then bound to a key
    /// elsewhere is what every driver does first.
    order: Vec<String>,
    cluster: TestCluster,
}

impl Matrix {
    async fn start() -> Matrix {
        let cluster = TestCluster::start(3);
        let (_store, map) = init_schema(&cluster, CLUSTER, PARTITIONS, |map| {
            map.declare(
                Group::hash("users", KeyType::Bigint)
                    .table("drv", "user_id")
                    .table("drv_counters", "user_id"),
            );
        })
        .await;
        create_table(&cluster, &map, "drv", DRV_COLUMNS).await;
        create_table(
            &cluster,
            &map,
            "drv_counters",
            "user_id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0",
        )
        .await;
        let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
        let mut order: Vec<String> = map.servers.keys().cloned().collect();
        order.reverse();
        let mut matrix = Matrix {
            proxy,
            map,
            keys: BTreeMap::new(),
            order,
            cluster,
        };
        for server in &matrix.cluster.cluster.servers {
            matrix.keys.insert(server.name().to_string(), Vec::new());
        }
        let mut user = 1;
        while matrix.keys.values().any(|k| k.len() < KEYS_PER_SERVER) {
            let owner = matrix.owner(user);
            let keys = matrix.keys.get_mut(&owner).expect("owner is a server");
            if keys.len() < KEYS_PER_SERVER {
                keys.push(user);
            }
            user += 1;
            assert!(user < 100_000, "some server owns no partition");
        }
        matrix
    }

    fn owner(&self, user: i64) -> String {
        let partition = self
            .map
            .partition_of("drv", &KeyValue::Int(user))
            .expect("partition of a user id");
        self.map
            .owner_of(partition)
            .expect("every partition has an owner")
            .name
            .clone()
    }

    /// The servers' keys, in `order`.
    fn columns(&self) -> Vec<(&String, &Vec<i64>)> {
        self.order.iter().map(|s| (s, &self.keys[s])).collect()
    }

    /// `pg3=3,7,...;pg2=1,2,...;pg1=...`, the drivers' KEYS argument (in `order`).
    fn keys_arg(&self) -> String {
        self.columns()
            .into_iter()
            .map(|(server, keys)| {
                let ids: Vec<String> = keys.iter().map(i64::to_string).collect();
                format!("{server}={}", ids.join(","))
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// One key on each server.
    fn per_server(&self) -> Vec<i64> {
        self.columns().into_iter().map(|(_, k)| k[0]).collect()
    }

    /// `n` keys taking turns over the servers.
    fn spread(&self, n: usize) -> Vec<i64> {
        let columns: Vec<&Vec<i64>> = self.columns().into_iter().map(|(_, k)| k).collect();
        (0..n)
            .map(|i| {
                let column = columns[i % columns.len()];
                column[(i / columns.len()) % column.len()]
            })
            .collect()
    }

    fn where_(&self, user: i64) -> String {
        format!("user_id {user} ({})", self.owner(user))
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.proxy.addr.port()
        )
    }

    /// `sql` run on each server directly (not through the proxy): the
    /// server's name and its rows.
    async fn on_each_server(
        &self,
        sql: &str,
    ) -> Result<Vec<(String, Vec<tokio_postgres::Row>)>, String> {
        let mut out = Vec::new();
        for (index, server) in self.cluster.cluster.servers.iter().enumerate() {
            let rows = self
                .cluster
                .connect(index)
                .await
                .query(sql, &[])
                .await
                .map_err(|e| format!("{sql} on {}: {e}", server.name()))?;
            out.push((server.name().to_string(), rows));
        }
        Ok(out)
    }

    /// Runs a driver program (`KEYS`-style arguments appended) and records
    /// its cases in `report`.
    async fn run_program(&self, report: &mut Report, mut command: tokio::process::Command) {
        let shown = format!("{:?}", command.as_std());
        command
            .arg("127.0.0.1")
            .arg(self.proxy.addr.port().to_string())
            .arg(self.keys_arg())
            .env("SHARDLINE_CASE_TIMEOUT", CASE_TIMEOUT.as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                report.fail(
                    "runtime",
                    format!("cannot start {shown}: {e}: install the driver's runtime with scripts/setup"),
                );
                return;
            }
        };
        // Read while the program runs: a full pipe would stop it.
        let out_reader = tokio::spawn(read_all(child.stdout.take().expect("piped stdout")));
        let err_reader = tokio::spawn(read_all(child.stderr.take().expect("piped stderr")));
        let ended = match tokio::time::timeout(PROGRAM_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => format!("the program ended ({status})"),
            Ok(Err(e)) => format!("waiting for the program failed: {e}"),
            Err(_) => {
                let _ = child.kill().await;
                format!(
                    "the program was killed after {} s",
                    PROGRAM_TIMEOUT.as_secs()
                )
            }
        };
        let stdout = out_reader.await.unwrap_or_default();
        let stderr = err_reader.await.unwrap_or_default();
        if std::env::var_os("SHARDLINE_DRIVER_OUTPUT").is_some() {
            println!("--- {shown}: {ended}\n--- stdout:\n{stdout}--- stderr:\n{stderr}---");
        }
        let stderr_tail: String = {
            let lines: Vec<&str> = stderr.lines().collect();
            lines[lines.len().saturating_sub(8)..].join(" | ")
        };
        let mut plan: Option<Vec<String>> = None;
        let mut missing = None;
        let mut expects: HashMap<String, Vec<Expect>> = HashMap::new();
        let mut results: HashMap<String, Result<(), String>> = HashMap::new();
        let mut order = Vec::new();
        for line in stdout.lines() {
            let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
            match tag {
                "VERSION" => report.version = Some(rest.to_string()),
                "PLAN" => plan = Some(rest.split_whitespace().map(str::to_string).collect()),
                "MISSING" | "FATAL" => missing = Some(rest.to_string()),
                "NOTE" => report.notes.push(rest.to_string()),
                "EXPECT" => {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    if let [case, user, item, state] = f[..] {
                        expects.entry(case.to_string()).or_default().push(Expect {
                            user: user.parse().expect("EXPECT user id"),
                            item: item.parse().expect("EXPECT item id"),
                            present: state == "present",
                        });
                    }
                }
                "CASE" => {
                    let (name, verdict) = rest.split_once(' ').unwrap_or((rest, ""));
                    let result = match verdict.strip_prefix("FAIL") {
                        Some(reason) => Err(reason.trim().to_string()),
                        None if verdict == "PASS" => Ok(()),
                        None => Err(format!("unreadable result line: {line}")),
                    };
                    if !results.contains_key(name) {
                        order.push(name.to_string());
                    }
                    results.insert(name.to_string(), result);
                }
                _ => {}
            }
        }
        let Some(plan) = plan else {
            let why = missing.unwrap_or_else(|| {
                format!(
                    "{ended} before running any case (is its runtime installed? run scripts/setup); \
                     stderr: {stderr_tail}"
                )
            });
            report.fail("runtime", format!("{shown}: {why}"));
            return;
        };
        for name in plan
            .iter()
            .chain(order.iter().filter(|n| !plan.contains(*n)))
        {
            let result = results.remove(name).unwrap_or_else(|| {
                Err(format!(
                    "no result: {ended} before this case finished; stderr: {stderr_tail}"
                ))
            });
            report.push(name, result, expects.remove(name).unwrap_or_default());
        }
        if let Some(why) = missing {
            report.notes.push(why);
        }
    }

    /// Checks every passed case's expected rows on the servers directly, and
    /// that every row of `drv` is on its owner only.
    async fn verify(&self, report: &mut Report) {
        let mut found: HashMap<(i64, i64), Vec<(String, String)>> = HashMap::new();
        let servers = self
            .on_each_server("SELECT user_id, item_id, note FROM drv")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for (server, rows) in servers {
            for row in rows {
                found
                    .entry((row.get(0), row.get(1)))
                    .or_default()
                    .push((server.clone(), row.get(2)));
            }
        }
        for case in &mut report.cases {
            if case.result.is_err() {
                continue;
            }
            let mut problems = Vec::new();
            for e in &case.expects {
                let owner = self.owner(e.user);
                let places = found
                    .get(&(e.user, e.item))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                let ok = if e.present {
                    matches!(places, [(server, note)] if *server == owner && *note == case.name)
                } else {
                    places.is_empty()
                };
                if !ok {
                    problems.push(format!(
                        "row (user_id {}, item_id {}) should be {}: found {:?}",
                        e.user,
                        e.item,
                        if e.present {
                            format!("once on {owner} with note '{}'", case.name)
                        } else {
                            "on no server (rolled back or refused)".to_string()
                        },
                        places
                    ));
                }
            }
            if !problems.is_empty() {
                case.result = Err(format!("server check: {}", problems.join("; ")));
            }
        }
        let mut misplaced: Vec<String> = found
            .iter()
            .filter(|((user, _), places)| places.len() != 1 || places[0].0 != self.owner(*user))
            .map(|((user, item), places)| {
                format!(
                    "(user_id {user}, item_id {item}) owned by {} found on {:?}",
                    self.owner(*user),
                    places.iter().map(|p| &p.0).collect::<Vec<_>>()
                )
            })
            .collect();
        misplaced.sort();
        if found.is_empty() && report.cases.iter().all(|c| c.result.is_err()) {
            return; // nothing ran: nothing to check
        }
        let result = if misplaced.is_empty() {
            Ok(())
        } else {
            Err(misplaced.join("; "))
        };
        report.push("servers: every row once, on its owner", result, Vec::new());
    }
}

/// All a program's output on a pipe, as text.
async fn read_all(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

struct Expect {
    user: i64,
    item: i64,
    present: bool,
}

struct Outcome {
    name: String,
    result: Result<(), String>,
    expects: Vec<Expect>,
}

struct Report {
    driver: String,
    version: Option<String>,
    cases: Vec<Outcome>,
    notes: Vec<String>,
    started: Instant,
}

impl Report {
    fn new(driver: &str) -> Report {
        Report {
            driver: driver.into(),
            version: None,
            cases: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Records a case; the rows a failed case expected are not checked.
    fn push(&mut self, name: &str, result: Result<(), String>, expects: Vec<Expect>) {
        let expects = if result.is_ok() { expects } else { Vec::new() };
        self.cases.push(Outcome {
            name: name.into(),
            result,
            expects,
        });
    }

    fn fail(&mut self, name: &str, reason: String) {
        self.push(name, Err(reason), Vec::new());
    }

    fn record(
        &mut self,
        ctx: Ctx,
        outcome: Result<Result<(), String>, tokio::time::error::Elapsed>,
    ) {
        let result = outcome.unwrap_or_else(|_| {
            Err(format!(
                "at {}: no answer within {} s",
                ctx.step,
                CASE_TIMEOUT.as_secs()
            ))
        });
        self.push(ctx.name, result, ctx.expects);
    }

    /// Prints the table of cases (and writes it next to the test binaries);
    /// panics naming the failed cases.
    fn finish(self) {
        let failed: Vec<&Outcome> = self.cases.iter().filter(|c| c.result.is_err()).collect();
        let width = self.cases.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut table = format!(
            "== driver matrix: {} ({}): {} cases, {} passed, {} failed, {:.1} s\n",
            self.driver,
            self.version.as_deref().unwrap_or("version unknown"),
            self.cases.len(),
            self.cases.len() - failed.len(),
            failed.len(),
            self.started.elapsed().as_secs_f64()
        );
        for case in &self.cases {
            match &case.result {
                Ok(()) => table.push_str(&format!("  PASS  {}\n", case.name)),
                Err(reason) => table.push_str(&format!("  FAIL  {:width$}  {reason}\n", case.name)),
            }
        }
        for note in &self.notes {
            table.push_str(&format!("  note: {note}\n"));
        }
        println!("\n{table}");
        let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "driver-matrix-{}.txt",
            self.driver
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        let _ = std::fs::write(file, &table);
        if !failed.is_empty() {
            let list: Vec<String> = failed
                .iter()
                .map(|c| format!("{}: {}", c.name, c.result.as_ref().unwrap_err()))
                .collect();
            panic!(
                "{}: {} of {} cases failed:\n  {}",
                self.driver,
                failed.len(),
                self.cases.len(),
                list.join("\n  ")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The external drivers.

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

async fn external(driver: &str, command: tokio::process::Command) {
    let matrix = Matrix::start().await;
    let mut report = Report::new(driver);
    matrix.run_program(&mut report, command).await;
    matrix.verify(&mut report).await;
    report.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3() {
    let mut command = tokio::process::Command::new("python3");
    command.arg(drivers_dir().join("psycopg_cases.py"));
    external("psycopg 3", command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg() {
    let mut command = tokio::process::Command::new("python3");
    command.arg(drivers_dir().join("asyncpg_cases.py"));
    external("asyncpg", command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let dir = drivers_dir().join("node");
    let mut command = tokio::process::Command::new("node");
    command.arg(dir.join("pg_cases.js")).current_dir(&dir);
    external("node-postgres", command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let jar = std::env::var_os("SHARDLINE_PGJDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    if !jar.is_file() {
        let mut report = Report::new("pgjdbc");
        report.fail(
            "runtime",
            format!(
                "the pgjdbc jar {} is missing (Debian package libpostgresql-jdbc-java): run scripts/setup",
                jar.display()
            ),
        );
        report.finish();
        return;
    }
    let mut command = tokio::process::Command::new("java");
    command
        .arg("-cp")
        .arg(&jar)
        .arg(drivers_dir().join("jdbc").join("JdbcCases.java"));
    external("pgjdbc", command).await;
}

// ---------------------------------------------------------------------------
// The Rust drivers and the command-line tools, judged here.

static NEXT_ITEM: AtomicI64 = AtomicI64::new(1_000_000);

/// One case run in this process.
struct Ctx {
    name: &'static str,
    step: String,
    expects: Vec<Expect>,
}

impl Ctx {
    fn new(name: &'static str) -> Ctx {
        Ctx {
            name,
            step: "start".into(),
            expects: Vec::new(),
        }
    }

    fn item(&self) -> i64 {
        NEXT_ITEM.fetch_add(1, Ordering::Relaxed)
    }

    fn present(&mut self, user: i64, item: i64) {
        self.expects.push(Expect {
            user,
            item,
            present: true,
        });
    }

    fn absent(&mut self, user: i64, item: i64) {
        self.expects.push(Expect {
            user,
            item,
            present: false,
        });
    }

    fn check(&self, condition: bool, what: impl std::fmt::Display) -> Result<(), String> {
        if condition {
            Ok(())
        } else {
            Err(format!("at {}: {what}", self.step))
        }
    }

    /// The row's note, read back through the proxy, must be the case's name;
    /// the servers must then hold the row.
    fn read_back(&mut self, user: i64, item: i64, note: &str) -> Result<(), String> {
        self.check(note == self.name, format!("read back {note:?}"))?;
        self.present(user, item);
        Ok(())
    }

    /// `result` must be an error with `sqlstate`.
    fn expect_error<T, E: DbError>(
        &self,
        sqlstate: &str,
        result: Result<T, E>,
    ) -> Result<(), String> {
        match result {
            Ok(_) => Err(format!(
                "at {}: expected {sqlstate}, the statement succeeded",
                self.step
            )),
            Err(e) if e.sqlstate().as_deref() == Some(sqlstate) => Ok(()),
            Err(e) => Err(format!(
                "at {}: expected {sqlstate}, got {}",
                self.step,
                e.describe()
            )),
        }
    }
}

/// Runs a case of this process under the case time limit and records it.
macro_rules! case {
    ($report:expr, $name:expr, $c:ident => $call:expr) => {{
        let mut ctx = Ctx::new($name);
        let outcome = {
            let $c = &mut ctx;
            tokio::time::timeout(CASE_TIMEOUT, $call).await
        };
        $report.record(ctx, outcome);
    }};
}

trait DbError: std::fmt::Display {
    fn sqlstate(&self) -> Option<String>;
    fn describe(&self) -> String;
}

impl DbError for tokio_postgres::Error {
    fn sqlstate(&self) -> Option<String> {
        self.code().map(|c| c.code().to_string())
    }
    fn describe(&self) -> String {
        match self.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => self.to_string(),
        }
    }
}

impl DbError for sqlx::Error {
    fn sqlstate(&self) -> Option<String> {
        self.as_database_error()
            .and_then(|db| db.code())
            .map(|c| c.into_owned())
    }
    fn describe(&self) -> String {
        match self.as_database_error() {
            Some(db) => format!("{} {}", db.code().unwrap_or_default(), db.message()),
            None => self.to_string(),
        }
    }
}

/// `?` with the case's step and the error's SQLSTATE and message.
trait At<T> {
    fn at(self, c: &Ctx) -> Result<T, String>;
}

impl<T, E: DbError> At<T> for Result<T, E> {
    fn at(self, c: &Ctx) -> Result<T, String> {
        self.map_err(|e| format!("at {}: {}", c.step, e.describe()))
    }
}

/// The version of crate `name` in the workspace's Cargo.lock.
fn lock_version(name: &str) -> Option<String> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .ok()?;
    let mut lines = lock.lines();
    let wanted = format!("name = \"{name}\"");
    lines.find(|l| *l == wanted)?;
    let version = lines.next()?.strip_prefix("version = ")?.trim_matches('"');
    Some(format!("{name} {version}"))
}

// --- What the Rust drivers' cases share ---
//
// Errors and transactions are the same story in every driver, so
// tokio-postgres and sqlx run one copy of those cases: each statement still
// goes through the driver's own API (its connection, or the transaction
// object the driver hands out).

/// The statements the shared cases send, on a connection or in a transaction.
trait Statements {
    type Error: DbError;

    /// INSERT INTO drv: the rows inserted.
    async fn insert(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error>;

    /// The row's note and `n = 1` (`SET_NOTE`): the rows updated.
    async fn set_note(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error>;

    /// The row's note (an error when there is no such row).
    async fn note(&mut self, user: i64, item: i64) -> Result<String, Self::Error>;

    /// The user's rows among `items`, by item (`ROWS`).
    async fn rows(&mut self, user: i64, items: &[i64]) -> Result<Vec<DrvRow>, Self::Error>;

    /// INSERT INTO drv with `n` (`INSERT_N`).
    async fn insert_n(
        &mut self,
        user: i64,
        item: i64,
        note: &str,
        n: i32,
    ) -> Result<u64, Self::Error>;

    /// count(*), sum(n), min(n), max(n) of the rows with `note`, no key (`TOTALS`).
    async fn totals(&mut self, note: &str) -> Result<Totals, Self::Error>;

    /// The groups of `GROUPS`.
    async fn groups(&mut self, note: &str) -> Result<Vec<Group3>, Self::Error>;

    /// `(user_id, item_id)` of `user_id = ANY(keys)` with `note`, by user_id
    /// DESC, item_id, LIMIT `PAGE_LIMIT` OFFSET `PAGE_OFFSET` (`page_sql`).
    async fn page(&mut self, keys: &[i64], note: &str) -> Result<Vec<(i64, i64)>, Self::Error>;

    /// `(user_id, item_id)` of the rows with `note`, no key (`MARKED`).
    async fn marked(&mut self, note: &str) -> Result<Vec<(i64, i64)>, Self::Error>;
}

/// count(*), sum(n), min(n), max(n).
type Totals = (i64, Option<i64>, Option<i32>, Option<i32>);
/// n % 3, count(*), sum(n).
type Group3 = (Option<i32>, i64, Option<i64>);

/// `(item_id, note, n)` of a row of drv.
type DrvRow = (i64, String, Option<i32>);

/// A Rust driver's connection through the proxy.
trait Driver: Statements + Sized {
    /// The driver's transaction object.
    type Tx<'a>: Statements<Error = Self::Error>
    where
        Self: 'a;

    async fn connect(m: &Matrix) -> Result<Self, Self::Error>;
    async fn begin(&mut self) -> Result<Self::Tx<'_>, Self::Error>;
    async fn commit(tx: Self::Tx<'_>) -> Result<(), Self::Error>;
    async fn rollback(tx: Self::Tx<'_>) -> Result<(), Self::Error>;
}

/// Connects through the proxy (the case's step `connect`).
async fn connect<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<D, String> {
    c.step = "connect".into();
    D::connect(m).await.at(c)
}

/// A committed and a rolled-back transaction per server.
async fn transaction_commit_and_rollback<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    for key in m.per_server() {
        let (kept, dropped) = (c.item(), c.item());
        c.step = format!("committed transaction {}", m.where_(key));
        let mut tx = db.begin().await.at(c)?;
        tx.insert(key, kept, "tmp").await.at(c)?;
        tx.set_note(key, kept, c.name).await.at(c)?;
        D::commit(tx).await.at(c)?;
        c.step = format!("rolled-back transaction {}", m.where_(key));
        let mut tx = db.begin().await.at(c)?;
        tx.insert(key, dropped, c.name).await.at(c)?;
        D::rollback(tx).await.at(c)?;
        c.step = format!("SELECT after {}", m.where_(key));
        let got = db.rows(key, &[kept, dropped]).await.at(c)?;
        c.check(
            got == [(kept, c.name.to_string(), Some(1))],
            format!("rows {got:?}"),
        )?;
        c.present(key, kept);
        c.absent(key, dropped);
    }
    Ok(())
}

/// A duplicate key gives 23505 and the connection stays usable.
async fn duplicate_key_then_usable<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    for key in m.per_server() {
        let (item, after) = (c.item(), c.item());
        c.step = format!("INSERT {}", m.where_(key));
        db.insert(key, item, c.name).await.at(c)?;
        c.step = format!("duplicate INSERT {}", m.where_(key));
        c.expect_error("23505", db.insert(key, item, c.name).await)?;
        c.step = format!("next INSERT {}", m.where_(key));
        db.insert(key, after, c.name).await.at(c)?;
        c.present(key, item);
        let note = db.note(key, after).await.at(c)?;
        c.read_back(key, after, &note)?;
    }
    Ok(())
}

/// Inside a transaction: 23505, then 25P02 for the next statement, then
/// ROLLBACK recovers.
async fn transaction_error_25p02_rollback<D: Driver>(
    m: &Matrix,
    c: &mut Ctx,
) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    for key in m.per_server() {
        let (existing, inside, after) = (c.item(), c.item(), c.item());
        c.step = format!("setup INSERT {}", m.where_(key));
        db.insert(key, existing, c.name).await.at(c)?;
        c.step = format!("BEGIN {}", m.where_(key));
        let mut tx = db.begin().await.at(c)?;
        c.step = format!("INSERT in transaction {}", m.where_(key));
        tx.insert(key, inside, c.name).await.at(c)?;
        c.step = format!("duplicate INSERT in transaction {}", m.where_(key));
        c.expect_error("23505", tx.insert(key, existing, c.name).await)?;
        c.step = format!("statement after the error {}", m.where_(key));
        c.expect_error("25P02", tx.note(key, existing).await)?;
        c.step = format!("ROLLBACK {}", m.where_(key));
        D::rollback(tx).await.at(c)?;
        c.step = format!("after ROLLBACK {}", m.where_(key));
        db.insert(key, after, c.name).await.at(c)?;
        let rows = db.rows(key, &[existing, inside, after]).await.at(c)?;
        let got: Vec<i64> = rows.iter().map(|r| r.0).collect();
        c.check(got == [existing, after], format!("rows {got:?}"))?;
        c.present(key, existing);
        c.absent(key, inside);
        c.present(key, after);
    }
    Ok(())
}

/// The paged read across servers: `PAGE_LIMIT` and `PAGE_OFFSET` in its text.
fn page_sql() -> String {
    format!(
        "SELECT user_id, item_id FROM drv WHERE user_id = ANY($1) AND note = $2 \
         ORDER BY user_id DESC, item_id LIMIT {PAGE_LIMIT} OFFSET {PAGE_OFFSET}"
    )
}

/// `(user_id, item_id, n)` on 3 keys of every server, with different n: the
/// rows the keyless aggregate cases write.
fn aggregate_rows(m: &Matrix, c: &Ctx) -> Vec<(i64, i64, i32)> {
    m.spread(9)
        .into_iter()
        .enumerate()
        .map(|(i, key)| (key, c.item(), 10 * i as i32 + (key % 7) as i32))
        .collect()
}

/// What `TOTALS` must answer for `rows`.
fn expected_totals(rows: &[(i64, i64, i32)]) -> Totals {
    let ns = rows.iter().map(|r| r.2);
    (
        rows.len() as i64,
        Some(ns.clone().map(i64::from).sum()),
        ns.clone().min(),
        ns.max(),
    )
}

/// What `GROUPS` must answer for `rows`.
fn expected_groups(rows: &[(i64, i64, i32)]) -> Vec<Group3> {
    let mut groups: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for &(_, _, n) in rows {
        let group = groups.entry(n % 3).or_default();
        group.0 += 1;
        group.1 += i64::from(n);
    }
    groups
        .into_iter()
        .filter(|(_, (count, _))| *count > 1)
        .map(|(rest, (count, sum))| (Some(rest), count, Some(sum)))
        .collect()
}

/// `(user_id, item_id)`: 2 rows on each of 2 keys of every server, for the
/// paged read.
fn page_rows(m: &Matrix, c: &Ctx) -> Vec<(i64, i64)> {
    m.spread(6)
        .into_iter()
        .flat_map(|key| [(key, c.item()), (key, c.item())])
        .collect()
}

/// `rows` by user_id DESC, item_id, LIMIT `PAGE_LIMIT` OFFSET `PAGE_OFFSET`.
fn expected_page(rows: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut ordered = rows.to_vec();
    ordered.sort_by_key(|&(user, item)| (std::cmp::Reverse(user), item));
    ordered
        .into_iter()
        .skip(PAGE_OFFSET)
        .take(PAGE_LIMIT)
        .collect()
}

/// Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a
/// non-key): every server answers and the proxy combines the partial results.
async fn scatter_aggregate_all_servers<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    let rows = aggregate_rows(m, c);
    for &(key, item, n) in &rows {
        c.step = format!("INSERT {}", m.where_(key));
        db.insert_n(key, item, c.name, n).await.at(c)?;
        c.present(key, item);
    }
    c.step = "count/sum/min/max over all servers".into();
    let got = db.totals(c.name).await.at(c)?;
    let want = expected_totals(&rows);
    c.check(got == want, format!("got {got:?}, expected {want:?}"))?;
    c.step = "GROUP BY n % 3 HAVING over all servers".into();
    let got = db.groups(c.name).await.at(c)?;
    let want = expected_groups(&rows);
    c.check(got == want, format!("got {got:?}, expected {want:?}"))
}

/// `user_id = ANY($1)` bound to keys on every server, ORDER BY user_id DESC
/// LIMIT OFFSET: the proxy merges the servers' sorted rows. Twice: sqlx binds
/// the statement in its cache the second time; tokio-postgres prepares the
/// text again.
async fn scatter_any_order_limit_offset<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    let rows = page_rows(m, c);
    for &(key, item) in &rows {
        c.step = format!("INSERT {}", m.where_(key));
        db.insert(key, item, c.name).await.at(c)?;
        c.present(key, item);
    }
    let mut keys: Vec<i64> = rows.iter().map(|r| r.0).collect();
    keys.sort();
    keys.dedup();
    let want = expected_page(&rows);
    for run in ["first", "second"] {
        c.step = format!("ANY({keys:?}) ORDER BY LIMIT OFFSET, {run} run");
        let got = db.page(&keys, c.name).await.at(c)?;
        c.check(got == want, format!("rows {got:?}, expected {want:?}"))?;
    }
    Ok(())
}

/// In a transaction (one per server): INSERT, then a read across servers sees
/// the transaction's row beside the committed ones; after ROLLBACK it no
/// longer does.
async fn scatter_read_in_transaction<D: Driver>(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut db: D = connect(m, c).await?;
    let mut committed = Vec::new();
    for key in m.per_server() {
        let item = c.item();
        c.step = format!("committed INSERT {}", m.where_(key));
        db.insert(key, item, c.name).await.at(c)?;
        c.present(key, item);
        committed.push((key, item));
    }
    committed.sort();
    for key in m.per_server() {
        let item = c.item();
        c.step = format!("BEGIN and INSERT {}", m.where_(key));
        let mut tx = db.begin().await.at(c)?;
        tx.insert(key, item, c.name).await.at(c)?;
        c.step = format!(
            "read across servers in the transaction of {}",
            m.where_(key)
        );
        let got = tx.marked(c.name).await.at(c)?;
        let mut want = committed.clone();
        want.push((key, item));
        want.sort();
        c.check(got == want, format!("rows {got:?}, expected {want:?}"))?;
        c.step = format!("ROLLBACK {}", m.where_(key));
        D::rollback(tx).await.at(c)?;
        c.step = format!("read across servers after ROLLBACK {}", m.where_(key));
        let got = db.marked(c.name).await.at(c)?;
        c.check(
            got == committed,
            format!("rows {got:?}, expected {committed:?}"),
        )?;
        c.absent(key, item);
    }
    Ok(())
}

/// The test of a Rust driver (crate `$driver`, connection `$conn`): a fresh
/// matrix; the driver's own cases in order (each an `async fn(&Matrix, &mut
/// Ctx)`), then the cases all Rust drivers share; the server check; the table.
macro_rules! rust_driver_test {
    ($test:ident, $driver:literal, $conn:ty, [$(($name:literal, $case:expr)),* $(,)?]) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let m = Matrix::start().await;
            let mut report = Report::new($driver);
            report.version = lock_version($driver);
            $(case!(report, $name, c => $case(&m, c));)*
            case!(report, "transaction_commit_and_rollback",
                c => transaction_commit_and_rollback::<$conn>(&m, c));
            case!(report, "duplicate_key_then_usable",
                c => duplicate_key_then_usable::<$conn>(&m, c));
            case!(report, "transaction_error_25p02_rollback",
                c => transaction_error_25p02_rollback::<$conn>(&m, c));
            case!(report, "scatter_aggregate_all_servers",
                c => scatter_aggregate_all_servers::<$conn>(&m, c));
            case!(report, "scatter_any_order_limit_offset",
                c => scatter_any_order_limit_offset::<$conn>(&m, c));
            case!(report, "scatter_read_in_transaction",
                c => scatter_read_in_transaction::<$conn>(&m, c));
            m.verify(&mut report).await;
            report.finish();
        }
    };
}

// --- tokio-postgres ---

/// tokio-postgres: a `Client`, or a `Transaction` it began.
struct Tp<C>(C);

type TokioPostgres = Tp<tokio_postgres::Client>;

impl<C: tokio_postgres::GenericClient + Sync> Statements for Tp<C> {
    type Error = tokio_postgres::Error;

    async fn insert(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error> {
        self.0.execute(INSERT, &[&user, &item, &note]).await
    }

    async fn set_note(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error> {
        self.0.execute(SET_NOTE, &[&note, &user, &item]).await
    }

    async fn note(&mut self, user: i64, item: i64) -> Result<String, Self::Error> {
        Ok(self.0.query_one(NOTE, &[&user, &item]).await?.get(0))
    }

    async fn rows(&mut self, user: i64, items: &[i64]) -> Result<Vec<DrvRow>, Self::Error> {
        let rows = self.0.query(ROWS, &[&user, &items]).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn insert_n(
        &mut self,
        user: i64,
        item: i64,
        note: &str,
        n: i32,
    ) -> Result<u64, Self::Error> {
        self.0.execute(INSERT_N, &[&user, &item, &note, &n]).await
    }

    async fn totals(&mut self, note: &str) -> Result<Totals, Self::Error> {
        let row = self.0.query_one(TOTALS, &[&note]).await?;
        Ok((row.get(0), row.get(1), row.get(2), row.get(3)))
    }

    async fn groups(&mut self, note: &str) -> Result<Vec<Group3>, Self::Error> {
        let rows = self.0.query(GROUPS, &[&note]).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn page(&mut self, keys: &[i64], note: &str) -> Result<Vec<(i64, i64)>, Self::Error> {
        let rows = self.0.query(&page_sql(), &[&keys, &note]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn marked(&mut self, note: &str) -> Result<Vec<(i64, i64)>, Self::Error> {
        let rows = self.0.query(MARKED, &[&note]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

impl Driver for TokioPostgres {
    type Tx<'a> = Tp<tokio_postgres::Transaction<'a>>;

    async fn connect(m: &Matrix) -> Result<Self, Self::Error> {
        let (client, connection) =
            tokio_postgres::connect(&m.proxy.conninfo(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Tp(client))
    }

    async fn begin(&mut self) -> Result<Self::Tx<'_>, Self::Error> {
        Ok(Tp(self.0.transaction().await?))
    }

    async fn commit(tx: Self::Tx<'_>) -> Result<(), Self::Error> {
        tx.0.commit().await
    }

    async fn rollback(tx: Self::Tx<'_>) -> Result<(), Self::Error> {
        tx.0.rollback().await
    }
}

rust_driver_test! {
    tokio_postgres,
    "tokio-postgres",
    TokioPostgres,
    [
        ("simple_query", tp_simple_query),
        ("execute_params", tp_execute_params),
        ("prepared_reused_20_keys", tp_prepared_reused),
        ("pipelined_queries_one_user", tp_pipelined),
        ("types_null_jsonb_uuid_array_timestamptz", tp_types),
    ]
}

/// batch_execute / simple_query: the simple protocol.
async fn tp_simple_query(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let Tp(client): TokioPostgres = connect(m, c).await?;
    for key in m.per_server() {
        let item = c.item();
        c.step = format!("INSERT {}", m.where_(key));
        client
            .batch_execute(&format!(
                "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{}')",
                c.name
            ))
            .await
            .at(c)?;
        c.step = format!("SELECT {}", m.where_(key));
        let messages = client
            .simple_query(&format!(
                "SELECT note FROM drv WHERE user_id = {key} AND item_id = {item}"
            ))
            .await
            .at(c)?;
        let notes: Vec<String> = messages
            .iter()
            .filter_map(|msg| match msg {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .collect();
        c.check(notes == [c.name], format!("read back {notes:?}"))?;
        c.present(key, item);
    }
    Ok(())
}

/// execute / query_one with parameters: tokio-postgres prepares a named
/// statement (Parse, Describe, Sync), then binds it.
async fn tp_execute_params(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut client: TokioPostgres = connect(m, c).await?;
    for key in m.spread(6) {
        let item = c.item();
        c.step = format!("execute INSERT {}", m.where_(key));
        let n = client.insert(key, item, c.name).await.at(c)?;
        c.check(n == 1, format!("{n} rows inserted"))?;
        c.step = format!("query_one SELECT {}", m.where_(key));
        let note = client.note(key, item).await.at(c)?;
        c.read_back(key, item, &note)?;
    }
    Ok(())
}

/// One prepared statement bound with 20 different keys.
async fn tp_prepared_reused(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let Tp(client): TokioPostgres = connect(m, c).await?;
    c.step = "prepare".into();
    let insert = client.prepare(INSERT).await.at(c)?;
    let select = client.prepare(NOTE).await.at(c)?;
    let pairs: Vec<(i64, i64)> = m.spread(20).into_iter().map(|k| (k, c.item())).collect();
    for &(key, item) in &pairs {
        c.step = format!("prepared INSERT {}", m.where_(key));
        client
            .execute(&insert, &[&key, &item, &c.name])
            .await
            .at(c)?;
    }
    for &(key, item) in &pairs {
        c.step = format!("prepared SELECT {}", m.where_(key));
        let row = client.query_one(&select, &[&key, &item]).await.at(c)?;
        c.read_back(key, item, row.get(0))?;
    }
    Ok(())
}

/// Several queries in flight on one connection at once (tokio-postgres
/// pipelines them, each with its own Sync), all for one user.
async fn tp_pipelined(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let Tp(client): TokioPostgres = connect(m, c).await?;
    let insert = client.prepare(INSERT).await.at(c)?;
    for key in m.per_server() {
        let items: Vec<i64> = (0..10).map(|_| c.item()).collect();
        c.step = format!("10 pipelined INSERTs {}", m.where_(key));
        let name = c.name;
        let (client, insert) = (&client, &insert);
        futures_util::future::try_join_all(
            items
                .iter()
                .map(|item| async move { client.execute(insert, &[&key, item, &name]).await }),
        )
        .await
        .at(c)?;
        c.step = format!("count {}", m.where_(key));
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM drv WHERE user_id = $1 AND note = $2",
                &[&key, &c.name],
            )
            .await
            .at(c)?
            .get(0);
        c.check(n == 10, format!("{n} rows instead of 10"))?;
        for item in items {
            c.present(key, item);
        }
    }
    Ok(())
}

/// Binary parameters and results: jsonb, uuid, text[], timestamptz, NULL.
async fn tp_types(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let Tp(client): TokioPostgres = connect(m, c).await?;
    for key in m.per_server() {
        let item = c.item();
        let doc = serde_json::json!({"driver": "tokio-postgres", "key": key, "nested": [1, 2, {"x": null}]});
        let tag = uuid::Uuid::new_v4();
        let labels = vec!["a".to_string(), "b c".to_string(), "ünï".to_string()];
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_714_979_289_123_456);
        c.step = format!("INSERT {}", m.where_(key));
        client
            .execute(
                "INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&key, &item, &c.name, &None::<i32>, &doc, &tag, &labels, &at],
            )
            .await
            .at(c)?;
        c.step = format!("SELECT {}", m.where_(key));
        let row = client
            .query_one(
                "SELECT note, n, doc, tag, labels, at FROM drv WHERE user_id = $1 AND item_id = $2 AND tag = $3",
                &[&key, &item, &tag],
            )
            .await
            .at(c)?;
        let want = (c.name.to_string(), None::<i32>, doc, tag, labels, at);
        let got = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        c.check(got == want, format!("read back {got:?}"))?;
        c.present(key, item);
    }
    Ok(())
}

// --- sqlx ---

/// sqlx runs statements on a `PgConnection`, reached through the
/// connection's box or through a `Transaction` it began.
type Sqlx = Box<sqlx::PgConnection>;

impl<C: DerefMut<Target = sqlx::PgConnection>> Statements for C {
    type Error = sqlx::Error;

    async fn insert(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error> {
        let query = sqlx::query(INSERT).bind(user).bind(item).bind(note);
        Ok(query.execute(&mut **self).await?.rows_affected())
    }

    async fn set_note(&mut self, user: i64, item: i64, note: &str) -> Result<u64, Self::Error> {
        let query = sqlx::query(SET_NOTE).bind(note).bind(user).bind(item);
        Ok(query.execute(&mut **self).await?.rows_affected())
    }

    async fn note(&mut self, user: i64, item: i64) -> Result<String, Self::Error> {
        let query = sqlx::query_scalar(NOTE).bind(user).bind(item);
        query.fetch_one(&mut **self).await
    }

    async fn rows(&mut self, user: i64, items: &[i64]) -> Result<Vec<DrvRow>, Self::Error> {
        let query = sqlx::query_as(ROWS).bind(user).bind(items);
        query.fetch_all(&mut **self).await
    }

    async fn insert_n(
        &mut self,
        user: i64,
        item: i64,
        note: &str,
        n: i32,
    ) -> Result<u64, Self::Error> {
        let query = sqlx::query(INSERT_N)
            .bind(user)
            .bind(item)
            .bind(note)
            .bind(n);
        Ok(query.execute(&mut **self).await?.rows_affected())
    }

    async fn totals(&mut self, note: &str) -> Result<Totals, Self::Error> {
        let query = sqlx::query_as(TOTALS).bind(note);
        query.fetch_one(&mut **self).await
    }

    async fn groups(&mut self, note: &str) -> Result<Vec<Group3>, Self::Error> {
        let query = sqlx::query_as(GROUPS).bind(note);
        query.fetch_all(&mut **self).await
    }

    async fn page(&mut self, keys: &[i64], note: &str) -> Result<Vec<(i64, i64)>, Self::Error> {
        let sql = page_sql();
        let query = sqlx::query_as(&sql).bind(keys).bind(note);
        query.fetch_all(&mut **self).await
    }

    async fn marked(&mut self, note: &str) -> Result<Vec<(i64, i64)>, Self::Error> {
        let query = sqlx::query_as(MARKED).bind(note);
        query.fetch_all(&mut **self).await
    }
}

impl Driver for Sqlx {
    type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

    async fn connect(m: &Matrix) -> Result<Self, Self::Error> {
        use sqlx::Connection;
        Ok(Box::new(sqlx::PgConnection::connect(&m.url()).await?))
    }

    async fn begin(&mut self) -> Result<Self::Tx<'_>, Self::Error> {
        use sqlx::Connection;
        (**self).begin().await
    }

    async fn commit(tx: Self::Tx<'_>) -> Result<(), Self::Error> {
        tx.commit().await
    }

    async fn rollback(tx: Self::Tx<'_>) -> Result<(), Self::Error> {
        tx.rollback().await
    }
}

rust_driver_test! {
    sqlx,
    "sqlx",
    Sqlx,
    [
        ("statement_cache_30_keys", sx_statement_cache),
        ("not_persistent", sx_not_persistent),
        ("types_null_array_and_text_casts", sx_types),
    ]
}

/// The same `sqlx::query("... $1").bind(k)` (`Statements` for sqlx) with 30
/// keys: sqlx prepares each text once as a named statement (its statement
/// cache) and binds it again.
async fn sx_statement_cache(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut conn: Sqlx = connect(m, c).await?;
    let pairs: Vec<(i64, i64)> = m.spread(30).into_iter().map(|k| (k, c.item())).collect();
    for &(key, item) in &pairs {
        c.step = format!("INSERT {}", m.where_(key));
        conn.insert(key, item, c.name).await.at(c)?;
    }
    for &(key, item) in &pairs {
        c.step = format!("SELECT {}", m.where_(key));
        let note = conn.note(key, item).await.at(c)?;
        c.read_back(key, item, &note)?;
    }
    Ok(())
}

/// `.persistent(false)`: unnamed statements, not cached.
async fn sx_not_persistent(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut conn = *connect::<Sqlx>(m, c).await?;
    for key in m.spread(6) {
        let item = c.item();
        c.step = format!("INSERT {}", m.where_(key));
        let insert = sqlx::query(INSERT).bind(key).bind(item).bind(c.name);
        insert.persistent(false).execute(&mut conn).await.at(c)?;
        c.step = format!("SELECT {}", m.where_(key));
        let select = sqlx::query_scalar(NOTE).bind(key).bind(item);
        let note: String = select.persistent(false).fetch_one(&mut conn).await.at(c)?;
        c.read_back(key, item, &note)?;
    }
    Ok(())
}

/// NULL and text[] bound natively; jsonb, uuid and timestamptz as text cast
/// by the server (the matrix builds sqlx without its json/uuid/chrono features).
async fn sx_types(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut conn = *connect::<Sqlx>(m, c).await?;
    for key in m.per_server() {
        let item = c.item();
        let tag = uuid::Uuid::new_v4().to_string();
        let labels = vec!["a".to_string(), "b c".to_string(), "ünï".to_string()];
        c.step = format!("INSERT {}", m.where_(key));
        sqlx::query(
            "INSERT INTO drv (user_id, item_id, note, n, doc, tag, labels, at) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6::uuid, $7, $8::timestamptz)",
        )
        .bind(key)
        .bind(item)
        .bind(c.name)
        .bind(None::<i32>)
        .bind(r#"{"driver": "sqlx"}"#)
        .bind(&tag)
        .bind(&labels)
        .bind("2024-05-06 07:08:09.123456+00")
        .execute(&mut conn)
        .await
        .at(c)?;
        c.step = format!("SELECT {}", m.where_(key));
        let got: (String, Option<i32>, String, Vec<String>, String) = sqlx::query_as(
            "SELECT note, n, doc->>'driver', labels, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
             FROM drv WHERE user_id = $1 AND item_id = $2 AND tag = $3::uuid",
        )
        .bind(key)
        .bind(item)
        .bind(&tag)
        .fetch_one(&mut conn)
        .await
        .at(c)?;
        let want = (
            c.name.to_string(),
            None,
            "sqlx".to_string(),
            labels,
            "2024-05-06 07:08:09.123456".to_string(),
        );
        c.check(got == want, format!("read back {got:?}"))?;
        c.present(key, item);
    }
    Ok(())
}

// --- psql and pgbench ---

/// Runs a PostgreSQL client program (psql, pgbench) with `script` on its
/// standard input, to its end.
async fn run_client(
    c: &Ctx,
    command: &mut tokio::process::Command,
    script: &str,
) -> Result<std::process::Output, String> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("cannot start {program}: {e}: install postgresql-client-15 with scripts/setup")
        })?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(|e| format!("at {}: writing to {program}: {e}", c.step))?;
    drop(stdin);
    child
        .wait_with_output()
        .await
        .map_err(|e| format!("at {}: {program}: {e}", c.step))
}

struct PsqlRun {
    ok: bool,
    stdout: Vec<String>,
    /// SQLSTATEs of the errors psql printed, in order.
    errors: Vec<String>,
    stderr: String,
}

/// Runs `script` through psql (-X -q -At, errors don't stop it, VERBOSITY
/// verbose so each error shows its SQLSTATE).
async fn psql(m: &Matrix, c: &Ctx, script: &str) -> Result<PsqlRun, String> {
    let mut command = tokio::process::Command::new("psql");
    command
        .args(["-X", "-q", "-At", "-v", "VERBOSITY=verbose"])
        .arg(m.proxy.conninfo());
    let output = run_client(c, &mut command, script).await?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let errors = stderr
        .lines()
        .filter_map(|l| l.split_once("ERROR:  ").map(|(_, rest)| rest))
        .map(|rest| rest.split(':').next().unwrap_or("").to_string())
        .collect();
    Ok(PsqlRun {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        errors,
        stderr,
    })
}

fn psql_errors(run: &PsqlRun) -> String {
    run.stderr
        .lines()
        .filter(|l| l.contains("ERROR:") || l.contains("FATAL:"))
        .map(|l| l.split_once("ERROR:  ").map(|x| x.1).unwrap_or(l).trim())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// One server's key's share of a psql case: statements, what psql must print
/// for them, and the rows they leave.
#[derive(Default)]
struct PsqlPart {
    script: String,
    /// The lines psql prints (-At: one value a line).
    stdout: Vec<String>,
    /// The SQLSTATEs of the errors psql reports, in order.
    errors: Vec<&'static str>,
    /// Items of the key the servers must hold afterwards, and must not.
    present: Vec<i64>,
    absent: Vec<i64>,
}

/// Runs one psql script made of a part per server, `part(case name, key,
/// N fresh items)`, and checks that psql printed exactly what the parts say.
async fn psql_per_server<const N: usize>(
    m: &Matrix,
    c: &mut Ctx,
    what: &str,
    part: fn(&str, i64, [i64; N]) -> PsqlPart,
) -> Result<(), String> {
    let mut want = PsqlPart::default();
    for key in m.per_server() {
        let share = part(c.name, key, std::array::from_fn(|_| c.item()));
        want.script.push_str(&share.script);
        want.stdout.extend(share.stdout);
        want.errors.extend(share.errors);
        for item in share.present {
            c.present(key, item);
        }
        for item in share.absent {
            c.absent(key, item);
        }
    }
    c.step = format!("psql {what} over {:?}", m.per_server());
    psql_expect(m, c, &want).await
}

/// Runs `want.script` through psql and checks that psql printed exactly
/// `want.stdout` and the errors `want.errors`.
async fn psql_expect(m: &Matrix, c: &Ctx, want: &PsqlPart) -> Result<(), String> {
    let run = psql(m, c, &want.script).await?;
    c.check(
        run.errors == want.errors,
        format!(
            "errors {:?}, expected {:?}: {}",
            run.errors,
            want.errors,
            psql_errors(&run)
        ),
    )?;
    c.check(
        run.ok && run.stdout == want.stdout,
        format!("output {:?}, expected {:?}", run.stdout, want.stdout),
    )
}

fn psql_statements(name: &str, key: i64, [item]: [i64; 1]) -> PsqlPart {
    PsqlPart {
        script: format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{name}');\n\
             SELECT note FROM drv WHERE user_id = {key} AND item_id = {item};\n\
             UPDATE drv SET n = 7 WHERE user_id = {key} AND item_id = {item};\n\
             SELECT n FROM drv WHERE item_id = {item} AND user_id = {key};\n"
        ),
        stdout: vec![name.to_string(), "7".to_string()],
        present: vec![item],
        ..PsqlPart::default()
    }
}

fn psql_transaction(name: &str, key: i64, [kept, dropped]: [i64; 2]) -> PsqlPart {
    PsqlPart {
        script: format!(
            "BEGIN;\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {kept}, 'tmp');\n\
             UPDATE drv SET note = '{name}', n = 1 WHERE user_id = {key} AND item_id = {kept};\n\
             COMMIT;\n\
             BEGIN;\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {dropped}, '{name}');\n\
             ROLLBACK;\n\
             SELECT count(*) FROM drv WHERE user_id = {key} AND item_id IN ({kept}, {dropped});\n"
        ),
        stdout: vec!["1".to_string()],
        present: vec![kept],
        absent: vec![dropped],
        ..PsqlPart::default()
    }
}

fn psql_duplicate_key(name: &str, key: i64, [item, after]: [i64; 2]) -> PsqlPart {
    PsqlPart {
        script: format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{name}');\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{name}');\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {after}, '{name}');\n\
             SELECT note FROM drv WHERE user_id = {key} AND item_id = {after};\n"
        ),
        stdout: vec![name.to_string()],
        errors: vec!["23505"],
        present: vec![item, after],
        ..PsqlPart::default()
    }
}

fn psql_transaction_error(name: &str, key: i64, [existing, inside, after]: [i64; 3]) -> PsqlPart {
    PsqlPart {
        script: format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {existing}, '{name}');\n\
             BEGIN;\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {inside}, '{name}');\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {existing}, '{name}');\n\
             SELECT note FROM drv WHERE user_id = {key} AND item_id = {existing};\n\
             ROLLBACK;\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {after}, '{name}');\n\
             SELECT string_agg(item_id::text, ',' ORDER BY item_id) FROM drv WHERE user_id = {key} AND item_id IN ({existing}, {inside}, {after});\n"
        ),
        stdout: vec![format!("{existing},{after}")],
        errors: vec!["23505", "25P02"],
        present: vec![existing, after],
        absent: vec![inside],
    }
}

/// A statement with parameters, for psql (15 has no `\bind`): each `$i`
/// replaced by `literals[i - 1]`, from the last so that `$1` is not part of `$10`.
fn with_literals(sql: &str, literals: &[String]) -> String {
    let mut out = sql.to_string();
    for (index, literal) in literals.iter().enumerate().rev() {
        out = out.replace(&format!("${}", index + 1), literal);
    }
    out
}

/// `(user_id, item_id)` rows as psql -At prints them.
fn psql_pairs(rows: &[(i64, i64)]) -> Vec<String> {
    rows.iter()
        .map(|(user, item)| format!("{user}|{item}"))
        .collect()
}

/// A value as psql -At prints it (NULL: nothing).
fn psql_value<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Aggregates with no key (count/sum/min/max, and GROUP BY/HAVING on a
/// non-key) in the simple protocol: the proxy combines the servers' partial
/// results.
async fn psql_scatter_aggregate(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let rows = aggregate_rows(m, c);
    let mut want = PsqlPart::default();
    for &(key, item, n) in &rows {
        want.script.push_str(&format!(
            "INSERT INTO drv (user_id, item_id, note, n) VALUES ({key}, {item}, '{}', {n});\n",
            c.name
        ));
        c.present(key, item);
    }
    let note = [format!("'{}'", c.name)];
    want.script
        .push_str(&format!("{};\n", with_literals(TOTALS, &note)));
    let (count, sum, min, max) = expected_totals(&rows);
    want.stdout.push(format!(
        "{count}|{}|{}|{}",
        psql_value(sum),
        psql_value(min),
        psql_value(max)
    ));
    want.script
        .push_str(&format!("{};\n", with_literals(GROUPS, &note)));
    for (rest, count, sum) in expected_groups(&rows) {
        want.stdout
            .push(format!("{}|{count}|{}", psql_value(rest), psql_value(sum)));
    }
    c.step = "psql: keyless aggregates over all servers".into();
    psql_expect(m, c, &want).await
}

/// `user_id = ANY('{...}')` and `user_id IN (...)` with keys on every server,
/// ORDER BY user_id DESC LIMIT OFFSET: the proxy merges the servers' sorted
/// rows.
async fn psql_scatter_any_order_limit_offset(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let rows = page_rows(m, c);
    let mut want = PsqlPart::default();
    for &(key, item) in &rows {
        want.script.push_str(&format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{}');\n",
            c.name
        ));
        c.present(key, item);
    }
    let mut ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    ids.sort();
    ids.dedup();
    let keys: Vec<String> = ids.iter().map(i64::to_string).collect();
    let note = format!("'{}'", c.name);
    let array = format!("'{{{}}}'::bigint[]", keys.join(","));
    let any = with_literals(&page_sql(), &[array, note.clone()]);
    let in_list = with_literals(
        &page_sql().replace("= ANY($1)", "IN ($1)"),
        &[keys.join(", "), note],
    );
    let page = psql_pairs(&expected_page(&rows));
    for sql in [any, in_list] {
        want.script.push_str(&format!("{sql};\n"));
        want.stdout.extend(page.iter().cloned());
    }
    c.step = format!("psql: ANY and IN over {keys:?}, ORDER BY LIMIT OFFSET");
    psql_expect(m, c, &want).await
}

/// In a transaction (one per server): INSERT, then a read across servers sees
/// the transaction's row beside the committed ones; after ROLLBACK it no
/// longer does.
async fn psql_scatter_read_in_transaction(m: &Matrix, c: &mut Ctx) -> Result<(), String> {
    let mut want = PsqlPart::default();
    let marked = with_literals(MARKED, &[format!("'{}'", c.name)]);
    let mut committed = Vec::new();
    for key in m.per_server() {
        let item = c.item();
        want.script.push_str(&format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{}');\n",
            c.name
        ));
        c.present(key, item);
        committed.push((key, item));
    }
    committed.sort();
    for key in m.per_server() {
        let item = c.item();
        want.script.push_str(&format!(
            "BEGIN;\n\
             INSERT INTO drv (user_id, item_id, note) VALUES ({key}, {item}, '{}');\n\
             {marked};\n\
             ROLLBACK;\n\
             {marked};\n",
            c.name
        ));
        let mut inside = committed.clone();
        inside.push((key, item));
        inside.sort();
        want.stdout.extend(psql_pairs(&inside));
        want.stdout.extend(psql_pairs(&committed));
        c.absent(key, item);
    }
    c.step = format!(
        "psql: transactions with reads across servers over {:?}",
        m.per_server()
    );
    psql_expect(m, c, &want).await
}

/// `\bind` (psql 16 and later): the extended protocol from psql.
fn psql_bind(name: &str, key: i64, [item]: [i64; 1]) -> PsqlPart {
    PsqlPart {
        script: format!(
            "INSERT INTO drv (user_id, item_id, note) VALUES ($1, $2, $3) \\bind {key} {item} {name} \\g\n\
             SELECT note FROM drv WHERE user_id = $1 AND item_id = $2 \\bind {key} {item} \\g\n"
        ),
        stdout: vec![name.to_string()],
        present: vec![item],
        ..PsqlPart::default()
    }
}

async fn psql_major() -> Option<u32> {
    let out = tokio::process::Command::new("psql")
        .arg("--version")
        .output()
        .await
        .ok()?;
    // "psql (PostgreSQL) 15.18 (Debian ...)"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_cases() {
    let m = Matrix::start().await;
    let mut report = Report::new("psql");
    let major = psql_major().await;
    report.version = major.map(|v| format!("psql {v}"));
    case!(report, "statements_on_every_server",
        c => psql_per_server(&m, c, "script", psql_statements));
    case!(report, "transaction_commit_and_rollback",
        c => psql_per_server(&m, c, "transactions", psql_transaction));
    case!(report, "duplicate_key_then_usable",
        c => psql_per_server(&m, c, "duplicate keys", psql_duplicate_key));
    case!(report, "transaction_error_25p02_rollback",
        c => psql_per_server(&m, c, "transaction errors", psql_transaction_error));
    case!(report, "scatter_aggregate_all_servers", c => psql_scatter_aggregate(&m, c));
    case!(report, "scatter_any_order_limit_offset",
        c => psql_scatter_any_order_limit_offset(&m, c));
    case!(report, "scatter_read_in_transaction", c => psql_scatter_read_in_transaction(&m, c));
    if major.unwrap_or(0) >= 16 {
        case!(report, "bind_extended_protocol", c => psql_per_server(&m, c, "\\bind", psql_bind));
    } else {
        report.notes.push(format!(
            "psql {} has no \\bind (psql 16+): psql's extended protocol is not in this run",
            major.map_or("?".into(), |v| v.to_string())
        ));
    }
    m.verify(&mut report).await;
    report.finish();
}

/// The counters' total on all servers, and whether each server holds exactly
/// the counter rows of the users it owns.
async fn counters(m: &Matrix) -> Result<i64, String> {
    let mut total = 0;
    let servers = m
        .on_each_server("SELECT user_id, n FROM drv_counters ORDER BY user_id")
        .await?;
    for (server, rows) in servers {
        let users: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let owned: Vec<i64> = (1..=COUNTER_USERS)
            .filter(|u| m.owner(*u) == server)
            .collect();
        if users != owned {
            return Err(format!(
                "server check: {server} holds counters of users {users:?}, owns {owned:?}"
            ));
        }
        total += rows.iter().map(|r| r.get::<_, i64>(1)).sum::<i64>();
    }
    Ok(total)
}

/// pgbench's transaction: one random user's counter, plus 1.
fn pgbench_script() -> String {
    [
        format!("\\set uid random(1, {COUNTER_USERS})"),
        "BEGIN;".into(),
        "UPDATE drv_counters SET n = n + 1 WHERE user_id = :uid;".into(),
        "SELECT n FROM drv_counters WHERE user_id = :uid;".into(),
        "END;\n".into(),
    ]
    .join("\n")
}

async fn pgbench_mode(m: &Matrix, c: &mut Ctx, mode: &str, before: i64) -> Result<(), String> {
    const CLIENTS: i64 = 4;
    const TRANSACTIONS: i64 = 25;
    c.step = format!("pgbench -M {mode}");
    let mut command = tokio::process::Command::new("pgbench");
    command
        .args(["-n", "-M", mode, "-c", &CLIENTS.to_string(), "-j", "2"])
        .args(["-t", &TRANSACTIONS.to_string()])
        .args(["-h", "127.0.0.1", "-p", &m.proxy.addr.port().to_string()])
        // the script from standard input
        .args(["-U", "postgres", "-f", "-", "postgres"]);
    let output = run_client(c, &mut command, &pgbench_script()).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let processed = CLIENTS * TRANSACTIONS;
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("error") || l.contains("ERROR"))
        .take(3)
        .collect();
    c.check(
        output.status.success()
            && stdout.contains(&format!(
                "number of transactions actually processed: {processed}/{processed}"
            )),
        format!(
            "{} ({})",
            errors.join(" | "),
            stdout
                .lines()
                .find(|l| l.contains("actually processed"))
                .unwrap_or("no summary")
        ),
    )?;
    c.step = format!("server check after -M {mode}");
    let total = counters(m).await?;
    c.check(
        total == before + processed,
        format!(
            "server check: counters total {total}, expected {}",
            before + processed
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench() {
    let m = Matrix::start().await;
    let mut report = Report::new("pgbench");
    // The counters each server owns, loaded directly.
    let owners: Vec<String> = (1..=COUNTER_USERS).map(|u| m.owner(u)).collect();
    for server in m.keys.keys() {
        assert!(
            owners.contains(server),
            "users 1..={COUNTER_USERS} miss {server}"
        );
    }
    for (index, server) in m.cluster.cluster.servers.iter().enumerate() {
        let owned: Vec<i64> = (1..=COUNTER_USERS)
            .filter(|u| owners[(*u - 1) as usize] == server.name())
            .collect();
        m.cluster
            .connect(index)
            .await
            .execute(
                "INSERT INTO drv_counters (user_id) SELECT unnest($1::bigint[])",
                &[&owned],
            )
            .await
            .expect("load counters");
    }
    let out = tokio::process::Command::new("pgbench")
        .arg("--version")
        .output()
        .await;
    report.version = out
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    for (name, mode) in [
        ("pgbench_simple", "simple"),
        ("pgbench_extended", "extended"),
        ("pgbench_prepared", "prepared"),
    ] {
        let before = match counters(&m).await {
            Ok(total) => total,
            Err(e) => {
                report.fail(name, e);
                continue;
            }
        };
        case!(report, name, c => pgbench_mode(&m, c, mode, before));
    }
    m.verify(&mut report).await;
    report.finish();
}
