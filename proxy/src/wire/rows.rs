//! Result rows as a scatter read needs them: the fields of a RowDescription
//! (to hide the proxy's own columns and state the formats the client asked
//! for), the values of a DataRow (sliced, not copied), and the messages the
//! proxy writes to run a statement with parameters of its choosing.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{Malformed, Reader};

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Bytes,
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    pub format: i16,
}

/// Decodes a RowDescription body.
pub fn decode_row_description(body: Bytes) -> Result<Vec<Field>, Malformed> {
    const M: &str = "RowDescription";
    let mut r = Reader::new(body);
    let count = r.i16(M)?;
    if count < 0 {
        return Err(Malformed {
            message: M,
            problem: "negative column count",
        });
    }
    let mut fields = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let name = r.cstr_bytes(M)?;
        fields.push(Field {
            name,
            table_oid: r.i32(M)? as u32,
            column: r.i16(M)?,
            type_oid: r.i32(M)? as u32,
            type_len: r.i16(M)?,
            type_mod: r.i32(M)?,
            format: r.i16(M)?,
        });
    }
    Ok(fields)
}

/// Writes a RowDescription of `fields`.
pub fn row_description(fields: &[Field], out: &mut BytesMut) {
    out.put_u8(b'T');
    let start = out.len();
    out.put_i32(0);
    out.put_i16(fields.len() as i16);
    for f in fields {
        out.put_slice(&f.name);
        out.put_u8(0);
        out.put_u32(f.table_oid);
        out.put_i16(f.column);
        out.put_u32(f.type_oid);
        out.put_i16(f.type_len);
        out.put_i32(f.type_mod);
        out.put_i16(f.format);
    }
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The format of column `index` under Bind result format codes as sent
/// (none: all text; one: for all; else one per column).
pub fn format_of(codes: &[i16], index: usize) -> i16 {
    match codes.len() {
        0 => 0,
        1 => codes[0],
        _ => codes.get(index).copied().unwrap_or(0),
    }
}

/// Decodes the result-format part of a Bind (`Bind::result_formats`).
pub fn decode_result_formats(raw: Bytes) -> Result<Vec<i16>, Malformed> {
    const M: &str = "Bind";
    let mut r = Reader::new(raw);
    let count = r.i16(M)?;
    if count < 0 {
        return Err(Malformed {
            message: M,
            problem: "negative result format count",
        });
    }
    (0..count).map(|_| r.i16(M)).collect()
}

/// The values of a DataRow body (`None` is NULL), as slices of it.
pub fn data_row_values(body: &Bytes) -> Result<Vec<Option<Bytes>>, Malformed> {
    const M: &str = "DataRow";
    let mut r = Reader::new(body.clone());
    let count = r.i16(M)?;
    if count < 0 {
        return Err(Malformed {
            message: M,
            problem: "negative column count",
        });
    }
    let mut values = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.i32(M)?;
        if len == -1 {
            values.push(None);
        } else if len < 0 {
            return Err(Malformed {
                message: M,
                problem: "negative value length",
            });
        } else {
            values.push(Some(r.bytes(len as usize, M)?));
        }
    }
    Ok(values)
}

/// Writes a DataRow holding only the first `keep` values of `body` (a
/// DataRow body): the columns after them are the proxy's own.
pub fn data_row_prefix(body: &[u8], keep: usize, out: &mut BytesMut) -> Result<(), Malformed> {
    const M: &str = "DataRow";
    let short = || Malformed {
        message: M,
        problem: "shorter than its column count",
    };
    let count = body
        .get(..2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(short)?;
    if (count as usize) < keep || count < 0 {
        return Err(short());
    }
    let mut at = 2usize;
    for _ in 0..keep {
        let len_bytes = body.get(at..at + 4).ok_or_else(short)?;
        let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        at += 4;
        if len > 0 {
            at = at.checked_add(len as usize).ok_or_else(short)?;
        }
        if at > body.len() {
            return Err(short());
        }
    }
    out.put_u8(b'D');
    out.put_i32((4 + 2 + at - 2) as i32);
    out.put_i16(keep as i16);
    out.put_slice(&body[2..at]);
    Ok(())
}

/// Bind of the unnamed portal to the unnamed statement with the given
/// parameter formats, values and result formats.
pub fn bind(
    param_formats: &[i16],
    params: &[Option<Bytes>],
    result_formats: &[i16],
    out: &mut BytesMut,
) {
    out.put_u8(b'B');
    let start = out.len();
    out.put_i32(0);
    out.put_slice(b"\0\0");
    out.put_i16(param_formats.len() as i16);
    for f in param_formats {
        out.put_i16(*f);
    }
    out.put_i16(params.len() as i16);
    for p in params {
        match p {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
    out.put_i16(result_formats.len() as i16);
    for f in result_formats {
        out.put_i16(*f);
    }
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Describe of the unnamed statement (`S`) or portal (`P`).
pub fn describe(kind: u8, out: &mut BytesMut) {
    out.put_u8(b'D');
    out.put_i32(6);
    out.put_u8(kind);
    out.put_u8(0);
}

/// Execute of the unnamed portal: at most `max_rows` rows (0: all).
pub fn execute(max_rows: i32, out: &mut BytesMut) {
    out.put_u8(b'E');
    out.put_i32(9);
    out.put_u8(0);
    out.put_i32(max_rows);
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters(out: &mut BytesMut) {
    out.put_u8(b't');
    out.put_i32(6);
    out.put_i16(0);
}

pub fn sync(out: &mut BytesMut) {
    out.put_u8(b'S');
    out.put_i32(4);
}

pub fn flush(out: &mut BytesMut) {
    out.put_u8(b'H');
    out.put_i32(4);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_row_keeps_its_first_values() {
        let mut row = BytesMut::new();
        super::super::messages::data_row(&[Some("a"), None, Some("ccc")], &mut row);
        let body = Bytes::copy_from_slice(&row[5..]);
        let mut out = BytesMut::new();
        data_row_prefix(&body, 2, &mut out).expect("prefix");
        let mut expected = BytesMut::new();
        super::super::messages::data_row(&[Some("a"), None], &mut expected);
        assert_eq!(out, expected);
        assert_eq!(
            data_row_values(&body).expect("values"),
            vec![
                Some(Bytes::from_static(b"a")),
                None,
                Some(Bytes::from_static(b"ccc"))
            ]
        );
        assert!(data_row_prefix(&body[..8], 3, &mut out).is_err());
        assert!(data_row_values(&body.slice(..8)).is_err());
    }

    #[test]
    fn row_descriptions_round_trip() {
        let fields = vec![Field {
            name: Bytes::from_static(b"n"),
            table_oid: 7,
            column: 2,
            type_oid: 20,
            type_len: 8,
            type_mod: -1,
            format: 1,
        }];
        let mut out = BytesMut::new();
        row_description(&fields, &mut out);
        let body = Bytes::copy_from_slice(&out[5..]);
        assert_eq!(decode_row_description(body).expect("decodes"), fields);
    }
}
