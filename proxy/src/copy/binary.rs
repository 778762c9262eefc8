//! Binary COPY data: the file header (signature, flags, extension), then
//! per tuple a 16-bit field count and per field a 32-bit length (-1 = NULL)
//! and its bytes, then the -1 trailer. Every length is checked before it is
//! used; data bytes are skipped, not copied (a row inside one message is a
//! slice of it). Errors are Postgres's (`ReceiveCopyBinaryHeader`,
//! `NextCopyFrom`, `CopyReadBinaryAttribute`).

use super::input::Input;
use super::{CopyError, CopyRow, BAD_COPY_FILE_FORMAT};

/// The header each per-server stream starts with: signature, no flags, no
/// header extension.
pub(super) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The end-of-data tuple (field count -1).
pub(super) const TRAILER: &[u8] = b"\xff\xff";
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Signature,
    Flags,
    ExtensionLength,
    Extension {
        left: u32,
    },
    FieldCount,
    FieldLength {
        field: usize,
    },
    FieldData {
        field: usize,
        left: usize,
    },
    /// The trailer was read: nothing may follow.
    Trailer,
    Done,
}

#[derive(Debug)]
pub(super) struct BinarySplitter {
    relation: String,
    columns: usize,
    key: usize,
    pub(super) input: Input,
    state: State,
    /// A number being read, byte by byte (it may span messages).
    number: [u8; 11],
    have: usize,
    lineno: u64,
    /// The key field's place in the current row (offset, length), or NULL.
    key_at: Option<(usize, usize)>,
    failed: Option<CopyError>,
    pub(super) rows: u64,
}

impl BinarySplitter {
    pub(super) fn new(relation: String, columns: usize, key: usize) -> BinarySplitter {
        BinarySplitter {
            relation,
            columns,
            key,
            input: Input::new(),
            state: State::Signature,
            number: [0; 11],
            have: 0,
            lineno: 0,
            key_at: None,
            failed: None,
            rows: 0,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        match self.state {
            State::Done => true,
            State::Trailer => self.input.eof,
            _ => false,
        }
    }

    pub(super) fn next_row(&mut self) -> Result<Option<CopyRow>, CopyError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.step() {
            Ok(row) => Ok(row),
            Err(error) => {
                self.failed = Some(error.clone());
                self.state = State::Done;
                self.input.discard_all();
                self.input.eof = true;
                Err(error)
            }
        }
    }

    fn error(&self, message: impl Into<String>) -> CopyError {
        CopyError::new(BAD_COPY_FILE_FORMAT, message).at(&self.relation, self.lineno)
    }

    /// Postgres reads the header before its error context is set up: its
    /// errors name no line.
    fn header_error(message: &str) -> CopyError {
        CopyError::new(BAD_COPY_FILE_FORMAT, message)
    }

    /// Collects `want` bytes of a number into `self.number`; false when the
    /// message ran out first.
    fn gather(&mut self, pos: &mut usize, want: usize) -> bool {
        let available = self.input.chunk.len() - *pos;
        let take = (want - self.have).min(available);
        self.number[self.have..self.have + take]
            .copy_from_slice(&self.input.chunk[*pos..*pos + take]);
        self.have += take;
        *pos += take;
        self.have == want
    }

    fn int32(&mut self) -> i32 {
        self.have = 0;
        i32::from_be_bytes([
            self.number[0],
            self.number[1],
            self.number[2],
            self.number[3],
        ])
    }

    fn step(&mut self) -> Result<Option<CopyRow>, CopyError> {
        let mut pos = self.input.pos;
        loop {
            match self.state {
                State::Signature => {
                    if !self.gather(&mut pos, SIGNATURE.len()) {
                        if self.input.eof || self.number[..self.have] != SIGNATURE[..self.have] {
                            return Err(Self::header_error("COPY file signature not recognized"));
                        }
                        break;
                    }
                    if self.number[..] != *SIGNATURE {
                        return Err(Self::header_error("COPY file signature not recognized"));
                    }
                    self.have = 0;
                    self.state = State::Flags;
                }
                State::Flags => {
                    if !self.gather(&mut pos, 4) {
                        if self.input.eof {
                            return Err(Self::header_error(
                                "invalid COPY file header (missing flags)",
                            ));
                        }
                        break;
                    }
                    let flags = self.int32();
                    if flags & (1 << 16) != 0 {
                        return Err(Self::header_error("invalid COPY file header (WITH OIDS)"));
                    }
                    if (flags & !(1 << 16)) >> 16 != 0 {
                        return Err(Self::header_error(
                            "unrecognized critical flags in COPY file header",
                        ));
                    }
                    self.state = State::ExtensionLength;
                }
                State::ExtensionLength => {
                    if !self.gather(&mut pos, 4) {
                        if self.input.eof {
                            return Err(Self::header_error(
                                "invalid COPY file header (missing length)",
                            ));
                        }
                        break;
                    }
                    let length = self.int32();
                    let Ok(left) = u32::try_from(length) else {
                        return Err(Self::header_error(
                            "invalid COPY file header (missing length)",
                        ));
                    };
                    self.state = State::Extension { left };
                }
                State::Extension { left } => {
                    let skip = (left as usize).min(self.input.chunk.len() - pos);
                    pos += skip;
                    let left = left - skip as u32;
                    self.state = State::Extension { left };
                    if left > 0 {
                        if self.input.eof {
                            return Err(Self::header_error(
                                "invalid COPY file header (wrong length)",
                            ));
                        }
                        break;
                    }
                    // The header is not part of any row.
                    self.input.take(pos);
                    self.lineno += 1;
                    self.state = State::FieldCount;
                }
                State::FieldCount => {
                    if !self.gather(&mut pos, 2) {
                        if self.input.eof {
                            // Fewer than two bytes left: Postgres sees the end.
                            self.state = State::Done;
                            return Ok(None);
                        }
                        break;
                    }
                    self.have = 0;
                    let count = i16::from_be_bytes([self.number[0], self.number[1]]);
                    if count == -1 {
                        self.input.take(pos);
                        self.state = State::Trailer;
                        continue;
                    }
                    if usize::try_from(count).ok() != Some(self.columns) {
                        return Err(self.error(format!(
                            "row field count is {count}, expected {}",
                            self.columns
                        )));
                    }
                    self.key_at = None;
                    self.state = State::FieldLength { field: 0 };
                }
                State::FieldLength { field } => {
                    if !self.gather(&mut pos, 4) {
                        if self.input.eof {
                            return Err(self.error("unexpected EOF in COPY data"));
                        }
                        break;
                    }
                    let length = self.int32();
                    let left = match length {
                        -1 => 0,
                        n if n < -1 => return Err(self.error("invalid field size")),
                        n => n as usize,
                    };
                    if field == self.key && length >= 0 {
                        self.key_at = Some((self.input.row_len(pos), left));
                    }
                    self.state = State::FieldData { field, left };
                }
                State::FieldData { field, left } => {
                    let skip = left.min(self.input.chunk.len() - pos);
                    pos += skip;
                    let left = left - skip;
                    if left > 0 {
                        self.state = State::FieldData { field, left };
                        if self.input.eof {
                            return Err(self.error("unexpected EOF in COPY data"));
                        }
                        break;
                    }
                    if field + 1 < self.columns {
                        self.state = State::FieldLength { field: field + 1 };
                        continue;
                    }
                    let data = self.input.take(pos);
                    let key = self.key_at.and_then(|(at, len)| {
                        data.get(at..at + len).map(|_| data.slice(at..at + len))
                    });
                    let row = CopyRow {
                        data,
                        line: self.lineno,
                        key,
                    };
                    self.lineno += 1;
                    self.rows += 1;
                    self.state = State::FieldCount;
                    return Ok(Some(row));
                }
                State::Trailer => {
                    if pos < self.input.chunk.len() {
                        return Err(self.error("received copy data after EOF marker"));
                    }
                    return Ok(None);
                }
                State::Done => return Ok(None),
            }
        }
        if matches!(
            self.state,
            State::Signature | State::Flags | State::ExtensionLength | State::Extension { .. }
        ) {
            // Header bytes are checked as they come: none need keeping.
            self.input.take(pos);
        }
        self.input.wait(pos, &self.relation, self.lineno.max(1))?;
        Ok(None)
    }
}
