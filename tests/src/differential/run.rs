//! Running queries on both sides and judging the answers: connections
//! (reconnected when one breaks), timeouts, the simple protocol, the
//! extended protocol with binary results and with text results, reads
//! inside a transaction, and the allowed refusals.

use std::fmt;
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use super::compare::{compare, exactness, table_from_rows, table_from_simple, Order, Table};
use super::text_client;
use super::{Coverage, DiffQuery, Failure, Param};

/// How long one query may take on one side before it counts as failed (a
/// proxy that hangs must not hang the suite).
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to `conninfo`, or says why not.
pub async fn connect(conninfo: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .map_err(|e| format!("cannot connect to {conninfo}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Both ends of a comparison, reconnected when a connection breaks so that
/// one crashed session does not fail every later query.
pub struct Sides {
    reference_conninfo: String,
    candidate_conninfo: String,
    reference: Client,
    candidate: Client,
}

impl Sides {
    pub async fn connect(
        reference_conninfo: &str,
        candidate_conninfo: &str,
    ) -> Result<Sides, String> {
        Ok(Sides {
            reference: connect(reference_conninfo).await?,
            candidate: connect(candidate_conninfo).await?,
            reference_conninfo: reference_conninfo.to_string(),
            candidate_conninfo: candidate_conninfo.to_string(),
        })
    }

    async fn reconnect_closed(&mut self) -> Result<(), String> {
        if self.reference.is_closed() {
            self.reference = connect(&self.reference_conninfo).await?;
        }
        if self.candidate.is_closed() {
            self.candidate = connect(&self.candidate_conninfo).await?;
        }
        Ok(())
    }
}

/// SQLSTATE, message and hint of a server error; the error itself otherwise.
pub fn describe_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "{} {}{}",
            db.code().code(),
            db.message(),
            db.hint()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default()
        ),
        None => error.to_string(),
    }
}

/// Why one side gave no answer.
#[derive(Debug)]
struct SideError {
    sqlstate: Option<String>,
    text: String,
}

impl fmt::Display for SideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

async fn within<T>(
    future: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, SideError> {
    match tokio::time::timeout(QUERY_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(SideError {
            sqlstate: e.as_db_error().map(|db| db.code().code().to_string()),
            text: describe_error(&e),
        }),
        Err(_) => Err(SideError {
            sqlstate: None,
            text: format!("no answer within {QUERY_TIMEOUT:?}"),
        }),
    }
}

/// What became of one query.
enum Verdict {
    Same,
    /// The proxy refused (0A000) a query that may be refused.
    AllowedRefusal,
    Wrong(String),
}

/// The reference's answer (when it gave one) and the verdict.
struct Judgement {
    expected: Option<Table>,
    verdict: Verdict,
}

impl Judgement {
    fn suite_bug(error: SideError) -> Judgement {
        Judgement {
            expected: None,
            verdict: Verdict::Wrong(format!(
                "the reference refused the query (a bug in the suite): {error}"
            )),
        }
    }
}

/// The verdict on a proxy error: allowed for a 0A000 refusal of a query
/// marked [`DiffQuery::may_refuse`], wrong otherwise.
fn proxy_error(query: &DiffQuery, stage: &str, error: SideError) -> Verdict {
    if query.may_refuse && error.sqlstate.as_deref() == Some("0A000") {
        Verdict::AllowedRefusal
    } else {
        Verdict::Wrong(format!("the proxy failed {stage}: {error}"))
    }
}

fn compared(query: &DiffQuery, types: &[Type], expected: &Table, actual: &Table) -> Verdict {
    match compare(expected, actual, query.order, &exactness(types, &query.sql)) {
        Ok(()) => Verdict::Same,
        Err(diff) => Verdict::Wrong(diff),
    }
}

async fn judge_simple(sides: &Sides, query: &DiffQuery) -> Judgement {
    let types = match within(sides.reference.prepare(&query.sql)).await {
        Ok(statement) => statement
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect::<Vec<_>>(),
        Err(e) => return Judgement::suite_bug(e),
    };
    let expected = match within(sides.reference.simple_query(&query.sql)).await {
        Ok(messages) => table_from_simple(&messages),
        Err(e) => return Judgement::suite_bug(e),
    };
    let verdict = match within(sides.candidate.simple_query(&query.sql)).await {
        Ok(messages) => compared(query, &types, &expected, &table_from_simple(&messages)),
        Err(e) => proxy_error(query, "to answer", e),
    };
    Judgement {
        expected: Some(expected),
        verdict,
    }
}

async fn judge_extended(sides: &Sides, query: &DiffQuery) -> Judgement {
    let params: Vec<&(dyn ToSql + Sync)> = query.params.iter().map(Param::as_sql).collect();
    let reference_statement = match within(sides.reference.prepare(&query.sql)).await {
        Ok(statement) => statement,
        Err(e) => return Judgement::suite_bug(e),
    };
    let expected = match within(sides.reference.query(&reference_statement, &params)).await {
        Ok(rows) => table_from_rows(reference_statement.columns(), &rows),
        Err(e) => return Judgement::suite_bug(e),
    };
    let expected = match expected {
        Ok(table) => table,
        Err(e) => {
            return Judgement::suite_bug(SideError {
                sqlstate: None,
                text: e,
            })
        }
    };
    let verdict = async {
        let statement = match within(sides.candidate.prepare(&query.sql)).await {
            Ok(statement) => statement,
            Err(e) => return proxy_error(query, "to prepare (Parse/Describe)", e),
        };
        let describe = |s: &tokio_postgres::Statement| -> Vec<String> {
            s.columns()
                .iter()
                .map(|c| format!("{} {}", c.name(), c.type_()))
                .collect()
        };
        if describe(&reference_statement) != describe(&statement) {
            return Verdict::Wrong(format!(
                "described columns differ:\n  reference: {:?}\n  proxy:     {:?}",
                describe(&reference_statement),
                describe(&statement)
            ));
        }
        let rows = match within(sides.candidate.query(&statement, &params)).await {
            Ok(rows) => rows,
            Err(e) => return proxy_error(query, "to answer", e),
        };
        match table_from_rows(statement.columns(), &rows) {
            Ok(actual) => {
                let types: Vec<Type> = reference_statement
                    .columns()
                    .iter()
                    .map(|c| c.type_().clone())
                    .collect();
                compared(query, &types, &expected, &actual)
            }
            Err(e) => Verdict::Wrong(format!("the proxy's rows cannot be read: {e}")),
        }
    }
    .await;
    Judgement {
        expected: Some(expected),
        verdict,
    }
}

/// Runs every parameterless query in the simple protocol (text results) on
/// both sides; returns the failures and what the reference answered.
pub async fn run_simple(sides: &mut Sides, queries: &[DiffQuery]) -> (Vec<Failure>, Coverage) {
    let mut run = Run::default();
    for query in queries.iter().filter(|q| q.params.is_empty()) {
        match sides.reconnect_closed().await {
            Err(e) => run.failures.push(failure(query, "simple protocol", e)),
            Ok(()) => {
                let judgement = judge_simple(sides, query).await;
                run.record(query, "simple protocol", judgement);
            }
        }
    }
    (run.failures, run.coverage)
}

/// Runs every query in the extended protocol (Parse/Describe, then Bind with
/// its parameters and binary results) on both sides, comparing the column
/// names and types each describes and then the rows.
pub async fn run_extended(sides: &mut Sides, queries: &[DiffQuery]) -> (Vec<Failure>, Coverage) {
    let mut run = Run::default();
    for query in queries {
        match sides.reconnect_closed().await {
            Err(e) => run.failures.push(failure(query, "extended protocol", e)),
            Ok(()) => {
                let judgement = judge_extended(sides, query).await;
                run.record(query, "extended protocol", judgement);
            }
        }
    }
    (run.failures, run.coverage)
}

#[derive(Default)]
struct Run {
    failures: Vec<Failure>,
    coverage: Coverage,
}

impl Run {
    fn record(&mut self, query: &DiffQuery, protocol: &'static str, judgement: Judgement) {
        let coverage = &mut self.coverage;
        coverage.queries += 1;
        if let Some(expected) = &judgement.expected {
            coverage.with_rows += usize::from(!expected.rows.is_empty());
            coverage.reference_rows += expected.rows.len();
        }
        coverage.order_sensitive += usize::from(query.order == Order::Total);
        match judgement.verdict {
            Verdict::Same => {}
            Verdict::AllowedRefusal => coverage.refused.push(query.label.clone()),
            Verdict::Wrong(detail) => self.failures.push(failure(query, protocol, detail)),
        }
    }
}

fn failure(query: &DiffQuery, protocol: &'static str, detail: String) -> Failure {
    Failure {
        label: query.label.clone(),
        protocol,
        sql: query.sql.clone(),
        params: if query.params.is_empty() {
            String::new()
        } else {
            format!("{:?}", query.params)
        },
        detail,
    }
}

/// Values whose binary form [`compare::binary_text`] must decode to exactly
/// the server's text form (numerics of every shape, integers at their
/// limits, text, uuid, jsonb).
const DECODING_PROBE: &str = "SELECT 0::numeric, 12.500::numeric, -0.00012::numeric, \
     123456789.123456789::numeric, 'NaN'::numeric, 10000::numeric, 1e20::numeric, \
     -99990000.0001::numeric, 1::numeric / 3, (-7)::int2, 2147483647::int4, \
     (-9223372036854775808)::int8, true, 'Zoë d\"q'::text, \
     'a13f0bff-1e68-4fba-91c9-1daa902ef7f3'::uuid, '{\"a\": [1, 2.50]}'::jsonb";

/// Checks the binary decoding the extended comparison relies on against the
/// server's own text output, so that a diff shows the values the server
/// would print.
pub async fn check_binary_decoding(client: &Client) -> Result<(), String> {
    let text = within(client.simple_query(DECODING_PROBE))
        .await
        .map(|messages| table_from_simple(&messages))
        .map_err(|e| e.text)?;
    let statement = within(client.prepare(DECODING_PROBE))
        .await
        .map_err(|e| e.text)?;
    let rows = within(client.query(&statement, &[]))
        .await
        .map_err(|e| e.text)?;
    let binary = table_from_rows(statement.columns(), &rows)?;
    if text.rows == binary.rows {
        Ok(())
    } else {
        Err(format!(
            "binary values decode differently from the server's text:\n  text:   {:?}\n  binary: {:?}",
            text.rows, binary.rows
        ))
    }
}

/// Runs `writes` in a transaction on both sides, then `queries` (simple
/// protocol) inside it, then rolls back: a cross-shard read must see the
/// transaction's own uncommitted writes.
pub async fn run_in_transaction(
    sides: &mut Sides,
    writes: &[&str],
    queries: &[DiffQuery],
) -> (Vec<Failure>, Coverage) {
    let mut run = Run::default();
    let begin = DiffQuery::new("transaction writes", &writes.join("; "), Order::Unordered);
    let mut script = vec!["BEGIN"];
    script.extend_from_slice(writes);
    for statement in script {
        for (side, client) in [("reference", &sides.reference), ("proxy", &sides.candidate)] {
            if let Err(e) = within(client.simple_query(statement)).await {
                run.failures.push(failure(
                    &begin,
                    "simple protocol, in a transaction",
                    format!("{statement} failed on the {side}: {e}"),
                ));
                let _ = within(sides.reference.simple_query("ROLLBACK")).await;
                let _ = within(sides.candidate.simple_query("ROLLBACK")).await;
                return (run.failures, run.coverage);
            }
        }
    }
    for query in queries {
        let judgement = judge_simple(sides, query).await;
        run.record(query, "simple protocol, in a transaction", judgement);
    }
    for (side, client) in [("reference", &sides.reference), ("proxy", &sides.candidate)] {
        if let Err(e) = within(client.simple_query("ROLLBACK")).await {
            run.failures.push(failure(
                &begin,
                "simple protocol, in a transaction",
                format!("ROLLBACK failed on the {side}: {e}"),
            ));
        }
    }
    (run.failures, run.coverage)
}

/// Runs every parameterless query in the extended protocol with text-format
/// results on both sides (reconnecting after a broken connection), comparing
/// the described column names and types and then the rows.
pub async fn run_extended_text(
    reference: std::net::SocketAddr,
    candidate: std::net::SocketAddr,
    queries: &[DiffQuery],
) -> (Vec<Failure>, Coverage) {
    use text_client::{TextClient, TextError};
    const PROTOCOL: &str = "extended protocol, text results";
    let mut run = Run::default();
    let mut clients: Option<(TextClient, TextClient)> = None;
    for query in queries.iter().filter(|q| q.params.is_empty()) {
        let (reference_client, candidate_client) = match clients.as_mut() {
            Some(pair) => pair,
            None => match (
                TextClient::connect(reference).await,
                TextClient::connect(candidate).await,
            ) {
                (Ok(r), Ok(c)) => clients.insert((r, c)),
                (Err(e), _) | (_, Err(e)) => {
                    run.failures.push(failure(query, PROTOCOL, e.message));
                    continue;
                }
            },
        };
        let side_error = |e: TextError| SideError {
            sqlstate: e.sqlstate,
            text: e.message,
        };
        let timed = |result: Result<
            Result<text_client::TextResult, TextError>,
            tokio::time::error::Elapsed,
        >| {
            result.unwrap_or_else(|_| {
                Err(TextError {
                    sqlstate: None,
                    message: format!("no answer within {QUERY_TIMEOUT:?}"),
                })
            })
        };
        let expected =
            timed(tokio::time::timeout(QUERY_TIMEOUT, reference_client.query(&query.sql)).await);
        let actual =
            timed(tokio::time::timeout(QUERY_TIMEOUT, candidate_client.query(&query.sql)).await);
        let broken = matches!(&expected, Err(e) if e.sqlstate.is_none())
            || matches!(&actual, Err(e) if e.sqlstate.is_none());
        let judgement = match (expected, actual) {
            (Err(e), _) => Judgement::suite_bug(side_error(e)),
            (Ok(expected), Err(e)) => Judgement {
                verdict: proxy_error(query, "to answer", side_error(e)),
                expected: Some(expected.table),
            },
            (Ok(expected), Ok(actual)) => {
                let verdict = if expected.type_oids != actual.type_oids {
                    Verdict::Wrong(format!(
                        "described column types differ:\n  reference: {:?}\n  proxy:     {:?}",
                        expected.type_oids, actual.type_oids
                    ))
                } else {
                    let types: Vec<Type> = expected
                        .type_oids
                        .iter()
                        .map(|oid| Type::from_oid(*oid).unwrap_or(Type::UNKNOWN))
                        .collect();
                    compared(query, &types, &expected.table, &actual.table)
                };
                Judgement {
                    expected: Some(expected.table),
                    verdict,
                }
            }
        };
        run.record(query, PROTOCOL, judgement);
        if broken {
            clients = None;
        }
    }
    (run.failures, run.coverage)
}
