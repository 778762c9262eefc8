//! Differential testing of cross-shard reads: the same queries run through
//! the proxy over three shard servers and on one plain Postgres holding all
//! the rows (the reference), and their answers are compared.
//!
//! - [`data`]: the schema and its seeded rows.
//! - [`generator`]: seeded random queries over that schema.
//! - [`compare`]: results as text tables, order-aware comparison, diffs.
//! - [`text_client`]: extended-protocol queries with text-format results.
//!
//! [`DiffCluster::start`] builds the setup (`cluster.rs`): a
//! [`crate::TestCluster`] of four servers where the map places the sharded
//! tables on the first three and the fourth holds plain tables of the same
//! names, so one etcd serves both sides. [`run_simple`], [`run_extended`],
//! [`run_extended_text`] and [`run_in_transaction`] (`run.rs`) run a list of
//! [`DiffQuery`] on both sides and return every failure rather than stopping
//! at the first.

pub mod compare;
pub mod data;
pub mod generator;
pub mod text_client;

mod cluster;
mod run;

use std::fmt;

use tokio_postgres::types::ToSql;

pub use cluster::DiffCluster;
pub use compare::Order;
pub use run::{
    check_binary_decoding, connect, describe_error, run_extended, run_extended_text,
    run_in_transaction, run_simple, Sides,
};

/// A parameter of an extended-protocol query.
#[derive(Debug, Clone)]
pub enum Param {
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Bool(bool),
    Text(String),
    Uuid(uuid::Uuid),
    Int8Array(Vec<i64>),
    /// An int8[] with NULL elements.
    NullableInt8Array(Vec<Option<i64>>),
    TextArray(Vec<String>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Int2(v) => v,
            Param::Int4(v) => v,
            Param::Int8(v) => v,
            Param::Bool(v) => v,
            Param::Text(v) => v,
            Param::Uuid(v) => v,
            Param::Int8Array(v) => v,
            Param::NullableInt8Array(v) => v,
            Param::TextArray(v) => v,
        }
    }
}

/// One query of the suite.
#[derive(Debug, Clone)]
pub struct DiffQuery {
    /// Where it comes from: `hand #12`, `generated #40`.
    pub label: String,
    pub sql: String,
    pub order: Order,
    /// Empty for queries that also run in the simple protocol.
    pub params: Vec<Param>,
    /// The proxy may refuse this query (0A000) instead of answering it; a
    /// wrong answer still fails. For shapes the proxy may not be able to
    /// merge exactly, such as text under an ICU collation.
    pub may_refuse: bool,
}

impl DiffQuery {
    pub fn new(label: impl Into<String>, sql: &str, order: Order) -> DiffQuery {
        DiffQuery {
            label: label.into(),
            sql: sql.to_string(),
            order,
            params: Vec::new(),
            may_refuse: false,
        }
    }

    pub fn may_refuse(mut self) -> DiffQuery {
        self.may_refuse = true;
        self
    }

    pub fn with_params(mut self, params: Vec<Param>) -> DiffQuery {
        self.params = params;
        self
    }
}

/// A query whose answers differ, or that failed on one side.
#[derive(Debug, Clone)]
pub struct Failure {
    pub label: String,
    pub protocol: &'static str,
    pub sql: String,
    pub params: String,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "── {} ({})", self.label, self.protocol)?;
        writeln!(f, "   {}", self.sql)?;
        if !self.params.is_empty() {
            writeln!(f, "   parameters: {}", self.params)?;
        }
        for line in self.detail.lines() {
            writeln!(f, "   {line}")?;
        }
        Ok(())
    }
}

/// What a run saw, to show the queries were not vacuous.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    pub queries: usize,
    /// Queries whose reference answer had at least one row.
    pub with_rows: usize,
    pub order_sensitive: usize,
    pub reference_rows: usize,
    /// Labels of the queries marked [`DiffQuery::may_refuse`] that the proxy refused.
    pub refused: Vec<String>,
}
