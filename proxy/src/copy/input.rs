//! The bytes of the row being read, across CopyData messages: the current
//! message as received, plus a copy of the current row's bytes from earlier
//! messages. A row inside one message is handed out as a slice of it.

use bytes::{Bytes, BytesMut};

use super::{CopyError, DEFAULT_MAX_ROW_BYTES};

#[derive(Debug)]
pub(super) struct Input {
    /// The message being read (possibly prefixed by a few unread bytes of
    /// the previous one, see `push`).
    pub(super) chunk: Bytes,
    /// Next byte of `chunk` to read.
    pub(super) pos: usize,
    /// Where the current row starts in `chunk`; its earlier bytes are in `carry`.
    pub(super) row_start: usize,
    carry: BytesMut,
    /// CopyDone was received.
    pub(super) eof: bool,
    /// Text formats: `chunk[..valid_to]` is valid UTF-8; `bad`: the byte at
    /// `valid_to` starts an invalid character.
    pub(super) valid_to: usize,
    pub(super) bad: Option<usize>,
    pub(super) max_row: usize,
}

impl Input {
    pub(super) fn new() -> Input {
        Input {
            chunk: Bytes::new(),
            pos: 0,
            row_start: 0,
            carry: BytesMut::new(),
            eof: false,
            valid_to: 0,
            bad: None,
            max_row: DEFAULT_MAX_ROW_BYTES,
        }
    }

    /// Adds a message. Bytes the reader left unread (it stops before a byte
    /// whose meaning depends on the next ones: at most a few) are joined
    /// with the new message so that it can look ahead.
    pub(super) fn push(&mut self, data: Bytes) {
        if data.is_empty() || self.eof {
            return;
        }
        if self.row_start < self.pos {
            self.carry
                .extend_from_slice(&self.chunk[self.row_start..self.pos]);
        }
        if self.pos < self.chunk.len() {
            let mut joined = BytesMut::with_capacity(self.chunk.len() - self.pos + data.len());
            joined.extend_from_slice(&self.chunk[self.pos..]);
            joined.extend_from_slice(&data);
            self.chunk = joined.freeze();
        } else {
            self.chunk = data;
        }
        self.pos = 0;
        self.row_start = 0;
        self.valid_to = 0;
        self.bad = None;
    }

    /// Bytes of the current row up to `pos` (of `chunk`).
    pub(super) fn row_len(&self, pos: usize) -> usize {
        self.carry.len() + pos.saturating_sub(self.row_start)
    }

    /// The current row, which ends at `end`; the next row starts there.
    pub(super) fn take(&mut self, end: usize) -> Bytes {
        let end = end.min(self.chunk.len());
        let row = if self.carry.is_empty() {
            self.chunk.slice(self.row_start..end)
        } else {
            self.carry
                .extend_from_slice(&self.chunk[self.row_start..end]);
            self.carry.split().freeze()
        };
        self.row_start = end;
        self.pos = self.pos.max(end);
        row
    }

    /// Drops everything read so far and anything still to come.
    pub(super) fn discard_all(&mut self) {
        self.carry = BytesMut::new();
        self.chunk = Bytes::new();
        self.pos = 0;
        self.row_start = 0;
        self.valid_to = 0;
        self.bad = None;
    }

    /// Stops at `pos` for more data; errs if the incomplete row is too long.
    pub(super) fn wait(&mut self, pos: usize, relation: &str, line: u64) -> Result<(), CopyError> {
        self.pos = pos;
        if self.row_len(self.chunk.len()) > self.max_row {
            return Err(CopyError::new(
                "54000",
                format!(
                    "COPY row is longer than the proxy's limit of {} bytes",
                    self.max_row
                ),
            )
            .hint("split the data into shorter rows, or COPY into each server directly")
            .at(relation, line));
        }
        Ok(())
    }
}
