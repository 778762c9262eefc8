//! The protocol messages the proxy looks inside, and the ones it writes itself.
//!
//! Decoding borrows from the frame's `Bytes`; parameters stay slices of it.
//! Encoders append to a `BytesMut` that is later written in one go.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{Malformed, Reader};

/// A client's Parse message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    /// The statement text: a slice of the frame, checked to be UTF-8.
    query: Bytes,
    pub param_types: Vec<u32>,
}

impl Parse {
    pub fn decode(body: Bytes) -> Result<Parse, Malformed> {
        const M: &str = "Parse";
        let mut r = Reader::new(body);
        let name = r.cstr(M)?;
        let query = r.cstr_bytes(M)?;
        if std::str::from_utf8(&query).is_err() {
            return Err(Malformed {
                message: M,
                problem: "invalid UTF-8",
            });
        }
        let count = r.i16(M)?;
        if count < 0 {
            return Err(Malformed {
                message: M,
                problem: "negative parameter type count",
            });
        }
        let mut param_types = Vec::with_capacity(count as usize);
        for _ in 0..count {
            param_types.push(r.i32(M)? as u32);
        }
        Ok(Parse {
            name,
            query,
            param_types,
        })
    }

    /// The statement text.
    pub fn query(&self) -> &str {
        // Checked at decode; an empty string cannot be reached.
        std::str::from_utf8(&self.query).unwrap_or_default()
    }

    /// Whether this Parse has the same text as `query` (cheap: no decoding).
    pub fn same_text(&self, query: &str) -> bool {
        self.query.as_ref() == query.as_bytes()
    }
}

/// A client's Bind message; parameter values are slices of the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    /// Format codes as sent: empty = all text, one = for all, else per parameter.
    pub param_formats: Vec<i16>,
    /// `None` is SQL NULL.
    pub params: Vec<Option<Bytes>>,
    /// Everything after the parameters (result format codes), kept raw.
    pub result_formats: Bytes,
}

impl Bind {
    pub fn decode(body: Bytes) -> Result<Bind, Malformed> {
        const M: &str = "Bind";
        let mut r = Reader::new(body);
        let portal = r.cstr(M)?;
        let statement = r.cstr(M)?;
        let nformats = r.i16(M)?;
        if nformats < 0 {
            return Err(Malformed {
                message: M,
                problem: "negative format count",
            });
        }
        let mut param_formats = Vec::with_capacity(nformats as usize);
        for _ in 0..nformats {
            param_formats.push(r.i16(M)?);
        }
        let nparams = r.i16(M)?;
        if nparams < 0 {
            return Err(Malformed {
                message: M,
                problem: "negative parameter count",
            });
        }
        let mut params = Vec::with_capacity(nparams as usize);
        for _ in 0..nparams {
            let len = r.i32(M)?;
            if len == -1 {
                params.push(None);
            } else if len < 0 {
                return Err(Malformed {
                    message: M,
                    problem: "negative parameter length",
                });
            } else {
                params.push(Some(r.bytes(len as usize, M)?));
            }
        }
        let result_formats = r.rest();
        if result_formats.len() < 2 {
            return Err(Malformed {
                message: M,
                problem: "truncated result formats",
            });
        }
        Ok(Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }

    /// Whether parameter `index` (0-based) is sent in binary.
    pub fn is_binary(&self, index: usize) -> bool {
        match self.param_formats.len() {
            0 => false,
            1 => self.param_formats[0] == 1,
            _ => self.param_formats.get(index).copied() == Some(1),
        }
    }

    /// Re-encodes the Bind with another statement name.
    pub fn encode_with_statement(&self, statement: &str, out: &mut BytesMut) {
        let start = begin(out, b'B');
        put_cstr(out, &self.portal);
        put_cstr(out, statement);
        out.put_i16(self.param_formats.len() as i16);
        for f in &self.param_formats {
            out.put_i16(*f);
        }
        out.put_i16(self.params.len() as i16);
        for p in &self.params {
            match p {
                None => out.put_i32(-1),
                Some(v) => {
                    out.put_i32(v.len() as i32);
                    out.put_slice(v);
                }
            }
        }
        out.put_slice(&self.result_formats);
        finish(out, start);
    }
}

/// Describe or Close: a kind (`S`tatement or `P`ortal) and a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: u8,
    pub name: String,
}

impl Target {
    pub fn decode(body: Bytes, message: &'static str) -> Result<Target, Malformed> {
        let mut r = Reader::new(body);
        let kind = r.u8(message)?;
        if kind != b'S' && kind != b'P' {
            return Err(Malformed {
                message,
                problem: "kind must be 'S' or 'P'",
            });
        }
        let name = r.cstr(message)?;
        Ok(Target { kind, name })
    }

    pub fn encode(&self, tag: u8, out: &mut BytesMut) {
        let start = begin(out, tag);
        out.put_u8(self.kind);
        put_cstr(out, &self.name);
        finish(out, start);
    }
}

/// The text of a simple Query message, borrowed from its body.
pub fn query_text(body: &[u8]) -> Result<&str, Malformed> {
    const M: &str = "Query";
    let end = memchr::memchr(0, body).ok_or(Malformed {
        message: M,
        problem: "string without terminator",
    })?;
    std::str::from_utf8(&body[..end]).map_err(|_| Malformed {
        message: M,
        problem: "invalid UTF-8",
    })
}

/// The text of a simple Query message.
pub fn decode_query(body: Bytes) -> Result<String, Malformed> {
    Reader::new(body).cstr("Query")
}

/// The portal name of an Execute message.
pub fn decode_execute_portal(body: Bytes) -> Result<String, Malformed> {
    let mut r = Reader::new(body);
    let portal = r.cstr("Execute")?;
    r.i32("Execute")?;
    Ok(portal)
}

// ------------------------------------------------------------------ encoders

fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let start = out.len();
    out.put_i32(0);
    start
}

fn finish(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

pub fn query(text: &str, out: &mut BytesMut) {
    let start = begin(out, b'Q');
    put_cstr(out, text);
    finish(out, start);
}

pub fn parse(name: &str, query: &str, param_types: &[u32], out: &mut BytesMut) {
    let start = begin(out, b'P');
    put_cstr(out, name);
    put_cstr(out, query);
    out.put_i16(param_types.len() as i16);
    for t in param_types {
        out.put_u32(*t);
    }
    finish(out, start);
}

/// Bind of the unnamed portal to `statement`, parameters in text format,
/// results in text format (what a simple Query returns).
pub fn bind_text(statement: &str, values: &[&str], out: &mut BytesMut) {
    bind_portal_text("", statement, values, out);
}

/// Bind of `statement` to portal `portal`, parameters and results in text.
pub fn bind_portal_text(portal: &str, statement: &str, values: &[&str], out: &mut BytesMut) {
    let start = begin(out, b'B');
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.put_i16(0);
    out.put_i16(values.len() as i16);
    for value in values {
        out.put_i32(value.len() as i32);
        out.put_slice(value.as_bytes());
    }
    out.put_i16(0);
    finish(out, start);
}

/// Execute of `portal`, all rows.
pub fn execute(portal: &str, out: &mut BytesMut) {
    let start = begin(out, b'E');
    put_cstr(out, portal);
    out.put_i32(0);
    finish(out, start);
}

/// Describe of the unnamed portal, Execute of it (all rows), and Sync.
pub fn describe_execute_sync(out: &mut BytesMut) {
    out.put_slice(&[b'D', 0, 0, 0, 6, b'P', 0]);
    execute_sync(out);
}

/// Execute of the unnamed portal (all rows), and Sync.
pub fn execute_sync(out: &mut BytesMut) {
    out.put_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    out.put_slice(&[b'S', 0, 0, 0, 4]);
}

pub fn copy_fail(reason: &str, out: &mut BytesMut) {
    let start = begin(out, b'f');
    put_cstr(out, reason);
    finish(out, start);
}

pub fn auth_ok(out: &mut BytesMut) {
    auth(out, 0, &[]);
}

pub fn auth(out: &mut BytesMut, code: i32, data: &[u8]) {
    let start = begin(out, b'R');
    out.put_i32(code);
    out.put_slice(data);
    finish(out, start);
}

pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    let start = begin(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    finish(out, start);
}

pub fn backend_key_data(pid: i32, key: i32, out: &mut BytesMut) {
    let start = begin(out, b'K');
    out.put_i32(pid);
    out.put_i32(key);
    finish(out, start);
}

pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    let start = begin(out, b'Z');
    out.put_u8(status);
    finish(out, start);
}

pub fn command_complete(tag: &str, out: &mut BytesMut) {
    let start = begin(out, b'C');
    put_cstr(out, tag);
    finish(out, start);
}

/// A message with an empty body: ParseComplete `1`, BindComplete `2`,
/// CloseComplete `3`, NoData `n`, EmptyQueryResponse `I`.
pub fn empty(tag: u8, out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_i32(4);
}

/// RowDescription for text columns.
pub fn row_description(columns: &[&str], out: &mut BytesMut) {
    let start = begin(out, b'T');
    out.put_i16(columns.len() as i16);
    for name in columns {
        put_cstr(out, name);
        out.put_i32(0); // table oid
        out.put_i16(0); // column number
        out.put_u32(25); // text
        out.put_i16(-1);
        out.put_i32(-1);
        out.put_i16(0); // text format
    }
    finish(out, start);
}

pub fn data_row(values: &[Option<&str>], out: &mut BytesMut) {
    let start = begin(out, b'D');
    out.put_i16(values.len() as i16);
    for v in values {
        match v {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v.as_bytes());
            }
        }
    }
    finish(out, start);
}

/// ErrorResponse (`E`) or NoticeResponse (`N`).
pub fn error_fields(
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    hint: Option<&str>,
    out: &mut BytesMut,
) {
    let start = begin(out, tag);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        out.put_u8(field);
        put_cstr(out, value);
    }
    if let Some(hint) = hint {
        out.put_u8(b'H');
        put_cstr(out, hint);
    }
    out.put_u8(0);
    finish(out, start);
}

/// Extracts SQLSTATE and message from an ErrorResponse body (for logs and tests).
pub fn error_summary(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.split(|&b| b == 0);
    for field in &mut fields {
        let Some((&kind, value)) = field.split_first() else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::next_frame;

    #[test]
    fn bind_round_trips_with_a_new_statement_name() {
        let mut original = BytesMut::new();
        let start = begin(&mut original, b'B');
        put_cstr(&mut original, "");
        put_cstr(&mut original, "s1");
        original.put_i16(1);
        original.put_i16(1);
        original.put_i16(2);
        original.put_i32(8);
        original.put_i64(42);
        original.put_i32(-1);
        original.put_i16(0);
        finish(&mut original, start);
        let frame = next_frame(&mut original, 1 << 20)
            .expect("valid")
            .expect("complete");
        let bind = Bind::decode(frame.body()).expect("decodes");
        assert_eq!(bind.statement, "s1");
        assert!(bind.is_binary(0) && bind.is_binary(1));
        assert_eq!(bind.params[0].as_deref(), Some(&42_i64.to_be_bytes()[..]));
        assert_eq!(bind.params[1], None);
        let mut renamed = BytesMut::new();
        bind.encode_with_statement("sl_7", &mut renamed);
        let frame = next_frame(&mut renamed, 1 << 20)
            .expect("valid")
            .expect("complete");
        let again = Bind::decode(frame.body()).expect("decodes");
        assert_eq!(again.statement, "sl_7");
        assert_eq!(again.params, bind.params);
    }

    #[test]
    fn malformed_binds_are_refused() {
        for body in [
            &b"p\0s\0\xff\xff"[..],
            b"p\0s\0\0\0\0\x01\0\0\0\x10ab",
            b"p\0s\0\0\0\0\x01\xff\xff\xff\xfe\0\0",
            b"p\0",
        ] {
            assert!(
                Bind::decode(Bytes::copy_from_slice(body)).is_err(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn parse_and_targets_decode() {
        let p =
            Parse::decode(Bytes::from_static(b"s\0SELECT $1\0\0\x01\0\0\0\x14")).expect("decodes");
        assert_eq!(
            (p.name.as_str(), p.query(), p.param_types.as_slice()),
            ("s", "SELECT $1", &[20u32][..])
        );
        assert!(Parse::decode(Bytes::from_static(b"s\0SELECT\0\xff\xff")).is_err());
        assert!(Target::decode(Bytes::from_static(b"Xname\0"), "Describe").is_err());
        assert_eq!(
            Target::decode(Bytes::from_static(b"Sname\0"), "Describe")
                .expect("ok")
                .name,
            "name"
        );
    }

    #[test]
    fn error_summary_reads_code_and_message() {
        let mut out = BytesMut::new();
        error_fields(b'E', "ERROR", "0A000", "nope", Some("do this"), &mut out);
        let frame = next_frame(&mut out, 1 << 20)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            error_summary(&frame.body()),
            ("0A000".to_string(), "nope".to_string())
        );
    }
}
