//! COPY FROM STDIN into a sharded table, the parts that need no session:
//! reading the statement ([`parse_copy_in`]) and splitting the client's
//! CopyData stream into rows with their sharding key ([`CopySplitter`]), so
//! that each row can be forwarded, untouched, to the server owning its key.
//!
//! The splitter decodes exactly as Postgres 15's `copyfromparse.c` does:
//! where lines end (newline styles, CSV quotes, the `\.` end marker), how
//! fields split, which field is NULL, and the errors (with their line
//! numbers) for input Postgres rejects before looking at column types. Type
//! errors in other columns are left to the servers.
//!
//! Memory: a row's bytes are kept only until the row is complete. Rows that
//! lie inside one CopyData message are slices of it (no copy); only a row
//! that spans messages is copied, and it may grow to `max_row_bytes` at most.

mod binary;
mod input;
mod statement;
mod statement_options;
mod text;

#[cfg(test)]
mod binary_tests;
#[cfg(test)]
mod statement_tests;
#[cfg(test)]
mod text_tests;

use bytes::Bytes;

pub use statement::{parse_copy_in, ColumnSet, CopyFormat, CopyIn, CopyOptions, CopyRefusal};

/// SQLSTATE bad_copy_file_format.
pub const BAD_COPY_FILE_FORMAT: &str = "22P04";

/// The longest row the splitter holds by default (Postgres's own limit for
/// a line is 1 GB; a proxy shared by many clients should hold far less).
pub const DEFAULT_MAX_ROW_BYTES: usize = 64 << 20;

/// One complete row of the client's COPY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRow {
    /// The bytes to send to the row's server, line terminator included
    /// (binary: the whole tuple). A per-server stream is [`CopySplitter::prefix`],
    /// then rows, then [`CopySplitter::trailer`].
    pub data: Bytes,
    /// The line number Postgres reports for an error in this row (CSV rows
    /// spanning lines: the last of them; binary: the tuple's number).
    pub line: u64,
    /// The key column's value: text formats give the de-escaped field text
    /// (valid UTF-8), binary gives the field's raw bytes; `None` is NULL.
    pub key: Option<Bytes>,
}

/// Input Postgres would reject, or the proxy cannot split; what the client
/// gets as its ErrorResponse (SQLSTATE, message, hint, CONTEXT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// The line Postgres names in its CONTEXT; `None` where it names none
    /// (binary header errors, statement-level errors).
    pub line: Option<u64>,
    /// `COPY table, line N`, as Postgres writes it (without the line's text).
    pub context: Option<String>,
}

impl CopyError {
    fn new(code: &'static str, message: impl Into<String>) -> CopyError {
        CopyError {
            code,
            message: message.into(),
            hint: None,
            line: None,
            context: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> CopyError {
        self.hint = Some(hint.into());
        self
    }

    fn at(mut self, relation: &str, line: u64) -> CopyError {
        self.line = Some(line);
        self.context = Some(format!("COPY {relation}, line {line}"));
        self
    }
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)?;
        if let Some(context) = &self.context {
            write!(f, ", {context}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CopyError {}

/// The sharding key's position among the columns a COPY's rows carry. A
/// COPY that leaves the key out cannot be split (the servers would fill it
/// from a default, or leave it NULL).
pub fn key_position(columns: &[String], key: &str, table: &str) -> Result<usize, CopyError> {
    columns.iter().position(|c| c == key).ok_or_else(|| {
        CopyError::new(
            "0A000",
            format!("COPY into sharded table \"{table}\" must include its sharding key column \"{key}\""),
        )
        .hint(format!("add \"{key}\" to the COPY column list, with each row's key value"))
    })
}

/// Splits a COPY FROM STDIN data stream into rows. Feed it each CopyData
/// payload with [`push`](Self::push), take rows with
/// [`next_row`](Self::next_row) until it returns `Ok(None)`, and call
/// [`finish`](Self::finish) at CopyDone, then drain again.
#[derive(Debug)]
pub struct CopySplitter {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Text(text::TextSplitter),
    Binary(binary::BinarySplitter),
}

impl CopySplitter {
    /// A splitter for `copy`'s format and options. `columns` are the columns
    /// each row carries, in order ([`CopyIn::row_columns`]); `key` is the
    /// sharding key's position among them.
    pub fn new(copy: &CopyIn, columns: Vec<String>, key: usize) -> Result<CopySplitter, CopyError> {
        if key >= columns.len() {
            return Err(CopyError::new(
                "XX000",
                format!(
                    "the sharding key is column {} of a COPY row with {} columns",
                    key + 1,
                    columns.len()
                ),
            ));
        }
        let inner = match copy.options.format {
            CopyFormat::Binary => Inner::Binary(binary::BinarySplitter::new(
                copy.table.clone(),
                columns.len(),
                key,
            )),
            CopyFormat::Text | CopyFormat::Csv => {
                Inner::Text(text::TextSplitter::new(copy, columns, key)?)
            }
        };
        Ok(CopySplitter { inner })
    }

    /// Sets the longest row held while it is incomplete (54000 beyond it).
    pub fn set_max_row_bytes(&mut self, max: usize) {
        match &mut self.inner {
            Inner::Text(t) => t.input.max_row = max,
            Inner::Binary(b) => b.input.max_row = max,
        }
    }

    /// Adds one CopyData payload. Data after the end of the copy (text `\.`)
    /// is ignored, as Postgres ignores it.
    pub fn push(&mut self, data: Bytes) {
        match &mut self.inner {
            Inner::Text(t) => t.input.push(data),
            Inner::Binary(b) => b.input.push(data),
        }
    }

    /// The client sent CopyDone: no more data comes.
    pub fn finish(&mut self) {
        match &mut self.inner {
            Inner::Text(t) => t.input.eof = true,
            Inner::Binary(b) => b.input.eof = true,
        }
    }

    /// The next complete row; `Ok(None)` when more data is needed (or, after
    /// [`finish`](Self::finish) or the end marker, when there are no more rows).
    /// After an error the copy is over: the same error is returned again.
    pub fn next_row(&mut self) -> Result<Option<CopyRow>, CopyError> {
        match &mut self.inner {
            Inner::Text(t) => t.next_row(),
            Inner::Binary(b) => b.next_row(),
        }
    }

    /// The data has ended (end marker, trailer, or CopyDone with all rows taken).
    pub fn is_done(&self) -> bool {
        match &self.inner {
            Inner::Text(t) => t.done,
            Inner::Binary(b) => b.is_done(),
        }
    }

    /// Rows returned so far: the `COPY n` count once the copy is done.
    pub fn rows(&self) -> u64 {
        match &self.inner {
            Inner::Text(t) => t.rows,
            Inner::Binary(b) => b.rows,
        }
    }

    /// What each per-server stream starts with: binary, the file header;
    /// text/CSV with HEADER, the client's header line (so the server, which
    /// runs the same statement, skips it); else nothing. Known once the
    /// first row has been returned.
    pub fn prefix(&self) -> Bytes {
        match &self.inner {
            Inner::Text(t) => t.prefix.clone(),
            Inner::Binary(_) => Bytes::from_static(binary::HEADER),
        }
    }

    /// What each per-server stream ends with (binary: the -1 trailer).
    pub fn trailer(&self) -> &'static [u8] {
        match &self.inner {
            Inner::Text(_) => b"",
            Inner::Binary(_) => binary::TRAILER,
        }
    }
}
