//! Splitting a byte stream into Postgres protocol messages.
//!
//! A regular message is `tag: u8, length: i32 (counting itself), body`. The
//! first message of a connection has no tag (`length: i32, code: i32, ...`).
//! Every length is checked before anything is read, and messages are cut out
//! of the read buffer as `Bytes` without copying, so they can be forwarded as is.

use bytes::{Buf, Bytes, BytesMut};

/// Postgres's own limit for a message (1 GiB).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 30;

/// One tagged protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The whole message, tag and length included: what is forwarded.
    pub raw: Bytes,
}

impl Frame {
    /// The message body (after tag and length).
    pub fn body(&self) -> Bytes {
        self.raw.slice(5..)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {length} for message type {tag:?}")]
    BadLength { tag: char, length: i64 },
    #[error("message of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { length: usize, limit: usize },
}

/// The tag of the tagged message at the start of `buf` and its size with
/// the tag (`length + 1`), its length checked; `None` if the header is not
/// all in. The message itself may not be all in yet. `max` bounds the
/// accepted message length.
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([a, b, c, d]);
    if length < 4 {
        return Err(FrameError::BadLength {
            tag: char::from(tag),
            length: i64::from(length),
        });
    }
    let length = length as usize;
    if length > max {
        return Err(FrameError::TooLarge { length, limit: max });
    }
    Ok(Some((tag, length + 1)))
}

/// Cuts the next complete tagged message off `buf`, or `None` if more bytes
/// are needed. `max` bounds the accepted message length.
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some((tag, size)) = peek_header(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        raw: buf.split_to(size).freeze(),
    }))
}

/// Cuts the untagged startup-phase packet (startup, SSL, GSSENC or cancel
/// request) off `buf`, returning its body after the length.
pub fn next_startup_packet(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if length < 8 || length as usize > max {
        return Err(FrameError::BadLength {
            tag: '\0',
            length: i64::from(length),
        });
    }
    let length = length as usize;
    if buf.len() < length {
        buf.reserve(length - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(length).freeze();
    packet.advance(4);
    Ok(Some(packet))
}

/// Reads fields of a message body, checking every length.
pub struct Reader {
    data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {message} message: {problem}")]
pub struct Malformed {
    pub message: &'static str,
    pub problem: &'static str,
}

impl Reader {
    pub fn new(data: Bytes) -> Reader {
        Reader { data }
    }

    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self, message: &'static str) -> Result<u8, Malformed> {
        if self.data.is_empty() {
            return Err(Malformed {
                message,
                problem: "truncated",
            });
        }
        Ok(self.data.get_u8())
    }

    pub fn i16(&mut self, message: &'static str) -> Result<i16, Malformed> {
        if self.data.len() < 2 {
            return Err(Malformed {
                message,
                problem: "truncated",
            });
        }
        Ok(self.data.get_i16())
    }

    pub fn i32(&mut self, message: &'static str) -> Result<i32, Malformed> {
        if self.data.len() < 4 {
            return Err(Malformed {
                message,
                problem: "truncated",
            });
        }
        Ok(self.data.get_i32())
    }

    /// A NUL-terminated string (without the NUL), as bytes.
    pub fn cstr_bytes(&mut self, message: &'static str) -> Result<Bytes, Malformed> {
        let end = memchr::memchr(0, &self.data).ok_or(Malformed {
            message,
            problem: "string without terminator",
        })?;
        let s = self.data.split_to(end);
        self.data.advance(1);
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, message: &'static str) -> Result<String, Malformed> {
        let end = memchr::memchr(0, &self.data).ok_or(Malformed {
            message,
            problem: "string without terminator",
        })?;
        // Copied straight from the buffer: most names are empty (unnamed
        // statements and portals), which then allocate nothing.
        let text = std::str::from_utf8(&self.data[..end])
            .map_err(|_| Malformed {
                message,
                problem: "invalid UTF-8",
            })?
            .to_owned();
        self.data.advance(end + 1);
        Ok(text)
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize, message: &'static str) -> Result<Bytes, Malformed> {
        if self.data.len() < n {
            return Err(Malformed {
                message,
                problem: "truncated",
            });
        }
        Ok(self.data.split_to(n))
    }

    pub fn rest(self) -> Bytes {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_only_when_complete() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09abcd"[..]);
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"\0X\0\0\0\x04");
        let frame = next_frame(&mut buf, 100).expect("valid").expect("complete");
        assert_eq!(frame.tag, b'Q');
        assert_eq!(&frame.body()[..], b"abcd\0");
        let terminate = next_frame(&mut buf, 100).expect("valid").expect("complete");
        assert_eq!(terminate.tag, b'X');
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_and_oversized_lengths_are_errors() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(
            next_frame(&mut buf, 100),
            Err(FrameError::BadLength { .. })
        ));
        let mut buf = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
        assert!(matches!(
            next_frame(&mut buf, 100),
            Err(FrameError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert!(matches!(
            next_frame(&mut buf, 100),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn reader_checks_every_field() {
        let mut r = Reader::new(Bytes::from_static(b"ab\0\x00\x01"));
        assert_eq!(r.cstr("t").as_deref(), Ok("ab"));
        assert_eq!(r.i16("t"), Ok(1));
        assert!(r.i32("t").is_err());
        let mut r = Reader::new(Bytes::from_static(b"no terminator"));
        assert!(r.cstr("t").is_err());
        let mut r = Reader::new(Bytes::from_static(b"\xff\xfe\0"));
        assert!(r.cstr("t").is_err());
    }
}
