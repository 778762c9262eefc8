//! The client's side of a session: its socket with a read buffer (framed
//! into messages) and a write buffer, and the errors that end a session.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls::ClientStream;
use crate::wire::frame::{next_frame, Frame};
use crate::wire::messages;

/// The client side of a session: a socket with a read and a write buffer.
pub struct ClientIo {
    pub(super) stream: ClientStream,
    pub(super) read_buf: BytesMut,
    pub out: BytesMut,
    pub(super) max_message: usize,
    /// How many times `out` was written: a request whose replies are to be
    /// taken back must not have been flushed in part.
    pub(super) flushes: u64,
}

impl ClientIo {
    pub fn new(stream: ClientStream, read_buf: BytesMut, max_message: usize) -> ClientIo {
        ClientIo {
            stream,
            read_buf,
            // Allocated on first use: idle clients cost only their task and socket.
            out: BytesMut::new(),
            max_message,
            flushes: 0,
        }
    }

    /// The next message, or `None` when the client closed the connection.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            match next_frame(&mut self.read_buf, self.max_message) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|_| SessionError::ClientGone)?;
            if n == 0 {
                if self.read_buf.is_empty() {
                    return Ok(None);
                }
                return Err(SessionError::ClientGone);
            }
        }
    }

    /// Puts a message back in front of the unread input.
    pub fn unread(&mut self, frame: &Frame) {
        let mut buf = BytesMut::with_capacity(frame.raw.len() + self.read_buf.len());
        buf.extend_from_slice(&frame.raw);
        buf.extend_from_slice(&self.read_buf);
        self.read_buf = buf;
    }

    /// Writes everything buffered for the client.
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.flushes += 1;
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            // Do not keep a large result's buffer for the session's life.
            self.out = BytesMut::new();
        }
        result.map_err(|_| SessionError::ClientGone)
    }

    pub fn error(&mut self, code: &str, message: &str, hint: Option<&str>) {
        messages::error_fields(b'E', "ERROR", code, message, hint, &mut self.out);
    }

    pub fn fatal(&mut self, code: &str, message: &str) {
        messages::error_fields(b'E', "FATAL", code, message, None, &mut self.out);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client disconnected")]
    ClientGone,
    #[error("protocol violation: {0}")]
    ClientProtocol(String),
}
