//! Ordering rows from several servers the way one Postgres server would: a
//! scatter SELECT with ORDER BY runs on every server, each returns its rows
//! sorted, and the proxy merges the streams by comparing each ORDER BY key's
//! value (sent by the servers as a hidden column in Postgres's binary format).
//!
//! The rule (DESIGN.md, "Cross-shard statements") is never a wrong order: a
//! key type the proxy cannot compare exactly as Postgres does has no
//! [`KeyKind`], and text under a collation that is not plain byte order is
//! refused by [`collation_is_bytewise`]; the caller then refuses the statement.
//!
//! - [`sortkey`]: key kinds by type OID, [`compare`] of two binary values.
//! - `numeric`: Postgres's `numeric` binary format and its ordering.
//! - [`collation`]: which collations order text as plain bytes.
//! - [`kway`]: picking the stream whose head row comes first.

pub mod collation;
pub mod kway;
mod numeric;
pub mod sortkey;

pub use collation::collation_is_bytewise;
pub use kway::KWayMerge;
pub use sortkey::{compare, KeyError, KeyKind, SortSpec};
