//! Text and CSV COPY data: where each line ends (Postgres's
//! `CopyReadLineText`: newline style fixed by the first line, CSV quotes,
//! the `\.` end marker), how it splits into fields and what the key field
//! holds (`CopyReadAttributesText` / `CopyReadAttributesCSV`).

use bytes::{Bytes, BytesMut};

use super::input::Input;
use super::{CopyError, CopyIn, CopyRow, BAD_COPY_FILE_FORMAT};

/// The newline style, fixed by the first line's terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Nl,
    Cr,
    CrNl,
}

impl Eol {
    fn bytes(self) -> &'static [u8] {
        match self {
            Eol::Unknown | Eol::Nl => b"\n",
            Eol::Cr => b"\r",
            Eol::CrNl => b"\r\n",
        }
    }
}

/// How a line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A line terminator.
    Newline,
    /// The end of the data; `dangling`: the line ends in an escaping
    /// backslash with nothing to escape, which Postgres ignores.
    Eof { dangling: bool },
    /// The `\.` end marker; the line's data stops before it.
    Marker,
}

/// A complete line: its raw bytes and where its data ends in them.
struct Line {
    raw: Bytes,
    content: usize,
    end: End,
}

/// Reading state inside the current line.
#[derive(Debug, Clone, Copy)]
struct Scan {
    started: bool,
    first_char: bool,
    in_quote: bool,
    last_was_esc: bool,
}

impl Scan {
    fn idle() -> Scan {
        Scan {
            started: false,
            first_char: true,
            in_quote: false,
            last_was_esc: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct TextSplitter {
    csv: bool,
    delim: u8,
    quote: u8,
    /// The CSV escape as fields are parsed.
    escape: u8,
    /// The CSV escape as lines are found: none when it is the quote.
    line_escape: Option<u8>,
    null: Vec<u8>,
    header: bool,
    force_not_null: bool,
    force_null: bool,
    columns: Vec<String>,
    key: usize,
    relation: String,
    pub(super) input: Input,
    eol: Eol,
    lineno: u64,
    scan: Scan,
    pub(super) done: bool,
    failed: Option<CopyError>,
    pub(super) rows: u64,
    pub(super) prefix: Bytes,
    scratch: Vec<u8>,
}

impl TextSplitter {
    pub(super) fn new(
        copy: &CopyIn,
        columns: Vec<String>,
        key: usize,
    ) -> Result<TextSplitter, CopyError> {
        let options = &copy.options;
        let key_name = columns.get(key).cloned().unwrap_or_default();
        for (option, set) in [
            ("FORCE_NOT_NULL", &options.force_not_null),
            ("FORCE_NULL", &options.force_null),
        ] {
            if let Some(missing) = set.names().iter().find(|c| !columns.contains(c)) {
                return Err(CopyError::new(
                    "42P10",
                    format!("{option} column \"{missing}\" not referenced by COPY"),
                ));
            }
        }
        let csv = options.format == super::CopyFormat::Csv;
        Ok(TextSplitter {
            csv,
            delim: options.delimiter,
            quote: options.quote,
            escape: options.escape,
            line_escape: (options.escape != options.quote).then_some(options.escape),
            null: options.null.clone().into_bytes(),
            header: options.header,
            force_not_null: options.force_not_null.contains(&key_name),
            force_null: options.force_null.contains(&key_name),
            columns,
            key,
            relation: copy.table.clone(),
            input: Input::new(),
            eol: Eol::Unknown,
            lineno: 0,
            scan: Scan::idle(),
            done: false,
            failed: None,
            rows: 0,
            prefix: Bytes::new(),
            scratch: Vec::new(),
        })
    }

    pub(super) fn next_row(&mut self) -> Result<Option<CopyRow>, CopyError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.next_row_inner() {
            Ok(row) => Ok(row),
            Err(error) => {
                self.failed = Some(error.clone());
                self.end();
                Err(error)
            }
        }
    }

    fn end(&mut self) {
        self.done = true;
        self.input.discard_all();
        self.input.eof = true;
    }

    fn next_row_inner(&mut self) -> Result<Option<CopyRow>, CopyError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(line) = self.read_line()? else {
                return Ok(None);
            };
            if self.header {
                // Postgres reads the header line and throws it away; at the
                // end of the data there are no rows at all.
                self.header = false;
                if line.end != End::Newline {
                    self.end();
                    return Ok(None);
                }
                self.prefix = line.raw;
                continue;
            }
            if line.end != End::Newline && line.content == 0 {
                self.end();
                return Ok(None);
            }
            let row = self.row(&line)?;
            if line.end != End::Newline {
                self.end();
            }
            self.rows += 1;
            return Ok(Some(row));
        }
    }

    fn error(&self, message: impl Into<String>) -> CopyError {
        CopyError::new(BAD_COPY_FILE_FORMAT, message).at(&self.relation, self.lineno)
    }

    /// Reads up to the end of the current line; `None` when more data is needed.
    fn read_line(&mut self) -> Result<Option<Line>, CopyError> {
        if !self.scan.started {
            self.lineno += 1;
            self.scan = Scan {
                started: true,
                ..Scan::idle()
            };
        }
        let (limit, known_bad) = self.validity();
        let chunk = self.input.chunk.clone();
        let buf: &[u8] = &chunk;
        let len = buf.len();
        let eof = self.input.eof;
        let peek = |i: usize| buf.get(i).copied().unwrap_or(0);
        // Postgres checks the encoding as it reads: touching (reading or
        // looking ahead at) the first invalid byte is the error.
        let touch = |i: usize, lineno: u64| -> Result<(), CopyError> {
            if i < len && i >= limit {
                return Err(invalid_encoding(&buf[limit..]).at(&self.relation, lineno));
            }
            Ok(())
        };
        let mut pos = self.input.pos;
        let (content, end, kind) = loop {
            if !self.csv && pos < limit {
                // Outside CSV only these three bytes mean anything.
                match memchr::memchr3(b'\\', b'\r', b'\n', &buf[pos..limit]) {
                    Some(offset) => pos += offset,
                    None => pos = limit,
                }
            }
            if pos >= len {
                if eof {
                    break (len, len, End::Eof { dangling: false });
                }
                self.input.wait(pos, &self.relation, self.lineno)?;
                return Ok(None);
            }
            if pos >= limit && !known_bad {
                // An incomplete character at the end of the message.
                self.input.wait(pos, &self.relation, self.lineno)?;
                return Ok(None);
            }
            touch(pos, self.lineno)?;
            let c = buf[pos];
            // Postgres looks ahead before acting on these; without the
            // next bytes (and more to come) stop here, state untouched.
            if (c == b'\r' || c == b'\\') && !eof {
                let need = if c == b'\\' && buf.get(pos + 1) == Some(&b'.') {
                    3
                } else {
                    1
                };
                if pos + need >= len || (pos + need >= limit && !known_bad) {
                    self.input.wait(pos, &self.relation, self.lineno)?;
                    return Ok(None);
                }
            }
            if self.csv && (c == b'\r' || c == b'\\') {
                // CSV fetches the next byte before anything else.
                touch(pos + 1, self.lineno)?;
            }
            let at = pos;
            pos += 1;
            if self.csv {
                let scan = &mut self.scan;
                if scan.in_quote && Some(c) == self.line_escape {
                    scan.last_was_esc = !scan.last_was_esc;
                }
                if c == self.quote && !scan.last_was_esc {
                    scan.in_quote = !scan.in_quote;
                }
                if Some(c) != self.line_escape {
                    scan.last_was_esc = false;
                }
                // Postgres counts quoted newlines of the current style
                // (before the style is known: carriage returns).
                let counted = if self.eol == Eol::Nl { b'\n' } else { b'\r' };
                if scan.in_quote && c == counted {
                    self.lineno += 1;
                }
            }
            let in_quote = self.csv && self.scan.in_quote;
            if c == b'\r' && !in_quote {
                match self.eol {
                    Eol::Unknown | Eol::CrNl => {
                        touch(pos, self.lineno)?;
                        if peek(pos) == b'\n' {
                            pos += 1;
                            self.eol = Eol::CrNl;
                        } else {
                            if self.eol == Eol::CrNl {
                                return Err(self.carriage_return_error());
                            }
                            self.eol = Eol::Cr;
                        }
                    }
                    Eol::Nl => return Err(self.carriage_return_error()),
                    Eol::Cr => {}
                }
                break (at, pos, End::Newline);
            }
            if c == b'\n' && !in_quote {
                if matches!(self.eol, Eol::Cr | Eol::CrNl) {
                    return Err(if self.csv {
                        self.error("unquoted newline found in data")
                            .hint("Use quoted CSV field to represent newline.")
                    } else {
                        self.error("literal newline found in data")
                            .hint("Use \"\\n\" to represent newline.")
                    });
                }
                self.eol = Eol::Nl;
                break (at, pos, End::Newline);
            }
            if c == b'\\' && (!self.csv || self.scan.first_char) {
                if pos >= len {
                    // Only at the end of the data: the backslash is data.
                    break (
                        len,
                        len,
                        End::Eof {
                            dangling: !self.csv,
                        },
                    );
                }
                touch(pos, self.lineno)?;
                if buf[pos] == b'.' {
                    pos += 1;
                    match self.end_marker(buf, &mut pos, &touch)? {
                        true => break (at, pos.min(len), End::Marker),
                        // CSV: `\.` followed by more is data; go on after the backslash.
                        false => pos = at + 1,
                    }
                } else if !self.csv {
                    // Any byte after a backslash is data (an escaped newline too).
                    pos += 1;
                }
            }
            self.scan.first_char = false;
        };
        self.scan = Scan::idle();
        let raw = self.input.take(end);
        // `raw` holds carried bytes too: the data ends as far before the
        // line's end as it does in the chunk.
        let content = raw.len() - (end - content);
        Ok(Some(Line {
            raw,
            content,
            end: kind,
        }))
    }

    /// After `\.` (`pos` past the dot): whether this is the end marker.
    /// Text mode rejects a malformed one; CSV takes it as data.
    fn end_marker(
        &self,
        buf: &[u8],
        pos: &mut usize,
        touch: &dyn Fn(usize, u64) -> Result<(), CopyError>,
    ) -> Result<bool, CopyError> {
        let peek = |i: usize| {
            touch(i, self.lineno)?;
            Ok::<u8, CopyError>(buf.get(i).copied().unwrap_or(0))
        };
        let corrupt = || self.error("end-of-copy marker corrupt");
        let mismatch = || self.error("end-of-copy marker does not match previous newline style");
        if self.eol == Eol::CrNl {
            let c = peek(*pos)?;
            *pos += 1;
            if c == b'\n' {
                return if self.csv { Ok(false) } else { Err(mismatch()) };
            }
            if c != b'\r' {
                return if self.csv { Ok(false) } else { Err(corrupt()) };
            }
        }
        let c = peek(*pos)?;
        *pos += 1;
        if c != b'\r' && c != b'\n' {
            return if self.csv { Ok(false) } else { Err(corrupt()) };
        }
        let matches = match self.eol {
            Eol::Nl | Eol::CrNl => c == b'\n',
            Eol::Cr => c == b'\r',
            Eol::Unknown => true,
        };
        if !matches {
            return Err(mismatch());
        }
        Ok(true)
    }

    fn carriage_return_error(&self) -> CopyError {
        if self.csv {
            self.error("unquoted carriage return found in data")
                .hint("Use quoted CSV field to represent carriage return.")
        } else {
            self.error("literal carriage return found in data")
                .hint("Use \"\\r\" to represent carriage return.")
        }
    }

    /// How far the message is known to be valid UTF-8 (by Postgres's
    /// rules, which also refuse a zero byte), checked once per message:
    /// the first byte not known valid, and whether it is known invalid with
    /// all the bytes Postgres names in its error (else more data is needed).
    fn validity(&mut self) -> (usize, bool) {
        let input = &mut self.input;
        let len = input.chunk.len();
        if input.bad.is_none() && input.valid_to < len {
            let from = input.valid_to;
            let rest = &input.chunk[from..];
            let (valid, invalid) = match std::str::from_utf8(rest) {
                Ok(_) => (rest.len(), false),
                Err(e) => (e.valid_up_to(), e.error_len().is_some()),
            };
            match memchr::memchr(0, &rest[..valid]) {
                Some(zero) => {
                    input.valid_to = from + zero;
                    input.bad = Some(from + zero);
                }
                None => {
                    input.valid_to = from + valid;
                    input.bad = invalid.then_some(from + valid);
                }
            }
        }
        let limit = input.valid_to;
        let known_bad = limit < len
            && (input.eof
                || (input.bad.is_some() && len - limit >= utf8_char_len(input.chunk[limit])));
        (limit, known_bad)
    }

    /// The row to forward for a complete line, with its key.
    fn row(&mut self, line: &Line) -> Result<CopyRow, CopyError> {
        let content = line.raw.slice(..line.content);
        let key = if self.csv {
            self.csv_fields(&content)?
        } else {
            self.text_fields(&content)?
        };
        let data = match line.end {
            End::Newline => line.raw.clone(),
            // The last line: it gets a terminator, since the server may get
            // more rows after it; a dangling backslash (ignored by Postgres)
            // must not escape that terminator.
            End::Eof { dangling } => with_terminator(&content, dangling, self.eol),
            End::Marker => with_terminator(&content, false, self.eol),
        };
        Ok(CopyRow {
            data,
            line: self.lineno,
            key,
        })
    }

    fn check_count(&self, count: usize) -> Result<(), CopyError> {
        if count > self.columns.len() {
            return Err(self.error("extra data after last expected column"));
        }
        if let Some(column) = self.columns.get(count) {
            return Err(self.error(format!("missing data for column \"{column}\"")));
        }
        Ok(())
    }

    /// Text format fields: the key field's de-escaped value. Every field an
    /// escape made non-ASCII is checked for valid UTF-8, as Postgres does.
    fn text_fields(&mut self, line: &Bytes) -> Result<Option<Bytes>, CopyError> {
        let b: &[u8] = line;
        let mut start = 0;
        let mut field = 0;
        let mut key = None;
        loop {
            let scan = text_field(b, start, self.delim, None);
            let is_null = b[start..scan.raw_end] == self.null[..];
            let is_key = field == self.key;
            if !is_null && (scan.non_ascii || (is_key && scan.escaped)) {
                self.scratch.clear();
                text_field(b, start, self.delim, Some(&mut self.scratch));
                if scan.non_ascii {
                    if let Some(at) = first_invalid(&self.scratch) {
                        return Err(
                            invalid_encoding(&self.scratch[at..]).at(&self.relation, self.lineno)
                        );
                    }
                }
            }
            if is_key && !is_null {
                key = Some(if scan.escaped {
                    Bytes::copy_from_slice(&self.scratch)
                } else {
                    line.slice(start..scan.raw_end)
                });
            }
            field += 1;
            start = scan.next;
            if !scan.found_delim {
                break;
            }
        }
        self.check_count(field)?;
        Ok(key)
    }

    /// CSV fields: the key field's value after quotes, FORCE_NOT_NULL and FORCE_NULL.
    fn csv_fields(&mut self, line: &Bytes) -> Result<Option<Bytes>, CopyError> {
        let b: &[u8] = line;
        let n = b.len();
        let (delim, quote, escape) = (self.delim, self.quote, self.escape);
        let mut i = 0;
        let mut field = 0;
        let mut key = None;
        loop {
            let start = i;
            let want = field == self.key;
            if want {
                self.scratch.clear();
            }
            let mut saw_quote = false;
            let mut found_delim = false;
            let raw_end;
            'field: loop {
                loop {
                    if i >= n {
                        raw_end = i;
                        break 'field;
                    }
                    let c = b[i];
                    i += 1;
                    if c == delim {
                        raw_end = i - 1;
                        found_delim = true;
                        break 'field;
                    }
                    if c == quote {
                        saw_quote = true;
                        break;
                    }
                    if want {
                        self.scratch.push(c);
                    }
                }
                loop {
                    if i >= n {
                        return Err(self.error("unterminated CSV quoted field"));
                    }
                    let c = b[i];
                    i += 1;
                    if c == escape && i < n && (b[i] == escape || b[i] == quote) {
                        if want {
                            self.scratch.push(b[i]);
                        }
                        i += 1;
                        continue;
                    }
                    if c == quote {
                        break;
                    }
                    if want {
                        self.scratch.push(c);
                    }
                }
            }
            if want {
                let is_null = !saw_quote && b[start..raw_end] == self.null[..];
                let mut value = if is_null {
                    None
                } else if saw_quote {
                    Some(Bytes::copy_from_slice(&self.scratch))
                } else {
                    Some(line.slice(start..raw_end))
                };
                match &value {
                    None if self.force_not_null => {
                        value = Some(Bytes::copy_from_slice(&self.null));
                    }
                    Some(v) if self.force_null && v[..] == self.null[..] => value = None,
                    _ => {}
                }
                key = value;
            }
            field += 1;
            if !found_delim {
                break;
            }
        }
        self.check_count(field)?;
        Ok(key)
    }
}

/// The last line's data with a line terminator of the stream's style.
fn with_terminator(content: &[u8], dangling: bool, eol: Eol) -> Bytes {
    let keep = if dangling {
        content.len().saturating_sub(1)
    } else {
        content.len()
    };
    let mut data = BytesMut::with_capacity(keep + 2);
    data.extend_from_slice(&content[..keep]);
    data.extend_from_slice(eol.bytes());
    data.freeze()
}

/// Where one text-format field ends, and what its escapes held.
struct FieldScan {
    /// End of the field's raw text (what is compared with the NULL string).
    raw_end: usize,
    /// Where the next field starts.
    next: usize,
    found_delim: bool,
    escaped: bool,
    /// An escape gave a zero byte or a byte above 0x7f.
    non_ascii: bool,
}

/// Scans one text-format field from `start`, de-escaping into `out` if given
/// (Postgres's rules: octal `\ooo`, hex `\xhh`, `\b \f \n \r \t \v`, any
/// other byte taken literally, a backslash at the end of the line ignored).
fn text_field(b: &[u8], start: usize, delim: u8, mut out: Option<&mut Vec<u8>>) -> FieldScan {
    let n = b.len();
    let mut i = start;
    let mut escaped = false;
    let mut non_ascii = false;
    loop {
        let raw_end = i;
        if i >= n {
            return FieldScan {
                raw_end,
                next: n,
                found_delim: false,
                escaped,
                non_ascii,
            };
        }
        let mut c = b[i];
        i += 1;
        if c == delim {
            return FieldScan {
                raw_end,
                next: i,
                found_delim: true,
                escaped,
                non_ascii,
            };
        }
        if c == b'\\' {
            if i >= n {
                return FieldScan {
                    raw_end,
                    next: n,
                    found_delim: false,
                    escaped: true,
                    non_ascii,
                };
            }
            escaped = true;
            c = b[i];
            i += 1;
            match c {
                b'0'..=b'7' => {
                    let mut value = u32::from(c - b'0');
                    for _ in 0..2 {
                        match b.get(i) {
                            Some(&d @ b'0'..=b'7') => {
                                value = (value << 3) + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    c = (value & 0xff) as u8;
                    non_ascii |= c == 0 || c >= 0x80;
                }
                b'x' => {
                    if let Some(first) = b.get(i).and_then(|&h| hex_value(h)) {
                        let mut value = first;
                        i += 1;
                        if let Some(second) = b.get(i).and_then(|&h| hex_value(h)) {
                            value = (value << 4) + second;
                            i += 1;
                        }
                        c = value;
                        non_ascii |= c == 0 || c >= 0x80;
                    }
                }
                b'b' => c = 0x08,
                b'f' => c = 0x0c,
                b'n' => c = b'\n',
                b'r' => c = b'\r',
                b't' => c = b'\t',
                b'v' => c = 0x0b,
                _ => {}
            }
        }
        if let Some(out) = out.as_deref_mut() {
            out.push(c);
        }
    }
}

fn hex_value(h: u8) -> Option<u8> {
    match h {
        b'0'..=b'9' => Some(h - b'0'),
        b'a'..=b'f' => Some(h - b'a' + 10),
        b'A'..=b'F' => Some(h - b'A' + 10),
        _ => None,
    }
}

/// The first byte that makes `data` invalid UTF-8 by Postgres's rules
/// (which also refuse a zero byte).
fn first_invalid(data: &[u8]) -> Option<usize> {
    let utf8 = std::str::from_utf8(data).err().map(|e| e.valid_up_to());
    let scanned = utf8.unwrap_or(data.len());
    memchr::memchr(0, &data[..scanned]).or(utf8)
}

/// The length of a UTF-8 character by its first byte, as Postgres's
/// `pg_utf_mblen` gives it.
fn utf8_char_len(first: u8) -> usize {
    match first {
        b if b & 0x80 == 0 => 1,
        b if b & 0xe0 == 0xc0 => 2,
        b if b & 0xf0 == 0xe0 => 3,
        b if b & 0xf8 == 0xf0 => 4,
        _ => 1,
    }
}

/// Postgres's `report_invalid_encoding`: the bytes of the bad character.
fn invalid_encoding(rest: &[u8]) -> CopyError {
    let len = utf8_char_len(rest.first().copied().unwrap_or(0));
    let shown: Vec<String> = rest
        .iter()
        .take(len.min(rest.len()).max(1))
        .map(|b| format!("0x{b:02x}"))
        .collect();
    CopyError::new(
        "22021",
        format!(
            "invalid byte sequence for encoding \"UTF8\": {}",
            shown.join(" ")
        ),
    )
}
