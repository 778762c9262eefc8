//! A minimal Postgres client for the one thing tokio-postgres cannot do:
//! extended-protocol queries with results in the text format (Parse, Bind
//! asking for text columns, Describe, Execute, Sync). The proxy merges rows
//! in whatever format the client asked for, so the text path is judged too.
//! Trust authentication only, as on the test servers and the test proxy.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::compare::Table;

/// A server error (SQLSTATE and message), or a broken or malformed exchange.
#[derive(Debug, Clone)]
pub struct TextError {
    pub sqlstate: Option<String>,
    pub message: String,
}

impl TextError {
    fn protocol(message: impl Into<String>) -> TextError {
        TextError {
            sqlstate: None,
            message: message.into(),
        }
    }
}

/// A result with its column type oids as the server described them.
#[derive(Debug, Clone)]
pub struct TextResult {
    pub table: Table,
    pub type_oids: Vec<u32>,
}

pub struct TextClient {
    stream: TcpStream,
}

/// Largest message accepted; anything bigger is a broken stream, not a row.
const MAX_MESSAGE: usize = 256 << 20;

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.push(0);
}

/// Reads a message body field by field, refusing to read past its end.
struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], TextError> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.body.len())
            .ok_or_else(|| TextError::protocol("a message is shorter than its fields"))?;
        let bytes = &self.body[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn i16(&mut self) -> Result<i16, TextError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, TextError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<String, TextError> {
        let rest = &self.body[self.at..];
        let length = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| TextError::protocol("a string field has no terminator"))?;
        let text = String::from_utf8_lossy(&rest[..length]).into_owned();
        self.at += length + 1;
        Ok(text)
    }
}

/// The SQLSTATE and message of an ErrorResponse body.
fn error_fields(body: &[u8]) -> TextError {
    let mut error = TextError::protocol("an error without a message");
    let mut reader = Reader { body, at: 0 };
    while let Ok(kind) = reader.take(1) {
        if kind[0] == 0 {
            break;
        }
        let Ok(value) = reader.cstr() else { break };
        match kind[0] {
            b'C' => error.sqlstate = Some(value),
            b'M' => error.message = value,
            _ => {}
        }
    }
    if let Some(code) = &error.sqlstate {
        error.message = format!("{code} {}", error.message);
    }
    error
}

impl TextClient {
    /// Connects and logs in as `postgres` to database `postgres`.
    pub async fn connect(addr: SocketAddr) -> Result<TextClient, TextError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| TextError::protocol(format!("cannot connect to {addr}: {e}")))?;
        let mut client = TextClient { stream };
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for field in ["user", "postgres", "database", "postgres", ""] {
            cstr(&mut body, field);
        }
        let mut startup = (body.len() as i32 + 4).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        client.send(&startup).await?;
        loop {
            let (tag, body) = client.receive().await?;
            match tag {
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0][..]) => {
                    return Err(TextError::protocol(
                        "the server asks for a password: this client speaks trust authentication only",
                    ))
                }
                b'E' => return Err(error_fields(&body)),
                b'Z' => return Ok(client),
                _ => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), TextError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| TextError::protocol(format!("the connection broke while sending: {e}")))
    }

    async fn receive(&mut self) -> Result<(u8, Vec<u8>), TextError> {
        let mut header = [0u8; 5];
        self.stream
            .read_exact(&mut header)
            .await
            .map_err(|e| TextError::protocol(format!("the connection broke while reading: {e}")))?;
        let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let length = usize::try_from(length)
            .ok()
            .filter(|l| (4..MAX_MESSAGE).contains(l))
            .ok_or_else(|| TextError::protocol(format!("a message declares length {length}")))?;
        let mut body = vec![0u8; length - 4];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| TextError::protocol(format!("the connection broke while reading: {e}")))?;
        Ok((header[0], body))
    }

    /// Runs `sql` (no parameters) with every result column in text format.
    pub async fn query(&mut self, sql: &str) -> Result<TextResult, TextError> {
        let mut out = Vec::new();
        let mut parse = Vec::new();
        cstr(&mut parse, "");
        cstr(&mut parse, sql);
        parse.extend_from_slice(&0i16.to_be_bytes());
        message(&mut out, b'P', &parse);
        let mut bind = Vec::new();
        cstr(&mut bind, "");
        cstr(&mut bind, "");
        bind.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
        bind.extend_from_slice(&0i16.to_be_bytes()); // parameters
        bind.extend_from_slice(&1i16.to_be_bytes()); // one result format for all columns:
        bind.extend_from_slice(&0i16.to_be_bytes()); // text
        message(&mut out, b'B', &bind);
        message(&mut out, b'D', b"P\0");
        let mut execute = Vec::new();
        cstr(&mut execute, "");
        execute.extend_from_slice(&0i32.to_be_bytes());
        message(&mut out, b'E', &execute);
        message(&mut out, b'S', &[]);
        self.send(&out).await?;

        let mut result = TextResult {
            table: Table {
                columns: Vec::new(),
                rows: Vec::new(),
            },
            type_oids: Vec::new(),
        };
        let mut failed = None;
        loop {
            let (tag, body) = self.receive().await?;
            let mut reader = Reader { body: &body, at: 0 };
            match tag {
                b'T' => {
                    let count = reader.i16()?;
                    for _ in 0..count {
                        result.table.columns.push(reader.cstr()?);
                        reader.take(6)?; // table oid, attribute number
                        result.type_oids.push(reader.i32()? as u32);
                        reader.take(8)?; // type size, modifier, format
                    }
                }
                b'D' => {
                    let count = reader.i16()?;
                    let mut row = Vec::new();
                    for _ in 0..count {
                        let length = reader.i32()?;
                        row.push(match usize::try_from(length) {
                            Err(_) => None,
                            Ok(length) => {
                                Some(String::from_utf8_lossy(reader.take(length)?).into_owned())
                            }
                        });
                    }
                    result.table.rows.push(row);
                }
                b'E' => failed = Some(error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(result),
        }
    }
}
