//! The client's side of a session: its socket with a read buffer (framed
//! into messages) and a write buffer, and the errors that end a session.
//!
//! Most clients of a pooling proxy are idle most of the time, so a client
//! that sent nothing for `IDLE_AFTER` gives its buffers back and waits for
//! its socket to become readable without them; a busy client keeps them
//! from one request to the next, so requests allocate no buffers. TLS
//! clients keep their buffers (rustls buffers the socket's bytes itself, so
//! the socket's readiness does not say whether a message is waiting).

use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::outbox::Outbox;
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
    /// The `IDLE_AFTER` timer of a busy client, pushed back at each wait for
    /// its next request (see [`unless_idle`]); dropped with the buffers.
    idle_timer: Option<Pin<Box<Sleep>>>,
    /// Whether a busy client's sends go out with its thread's others (see
    /// `outbox`).
    pub gather_sends: bool,
    /// A busy client's outbox; an idle client holds none (nor its
    /// duplicate descriptor).
    outbox: Option<Outbox>,
}

impl ClientIo {
    pub fn new(stream: ClientStream, read_buf: BytesMut, max_message: usize) -> ClientIo {
        ClientIo {
            stream,
            // The login's buffer is not kept for a client that waits.
            read_buf: if read_buf.is_empty() {
                BytesMut::new()
            } else {
                read_buf
            },
            // Allocated on first use: idle clients cost only their task and socket.
            out: BytesMut::new(),
            max_message,
            flushes: 0,
            idle_timer: None,
            gather_sends: false,
            outbox: None,
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
            if self.read_buf.capacity() == 0 {
                self.read_buf.reserve(READ_BYTES);
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

    /// The first message of the next request; `Closed` when the client
    /// closed the connection, `Idle` when it sent nothing for `IDLE_AFTER`
    /// (its buffers are then released: see the module doc).
    pub async fn read_request(&mut self) -> Result<Next, SessionError> {
        loop {
            match next_frame(&mut self.read_buf, self.max_message) {
                Ok(Some(frame)) => return Ok(Next::Frame(frame)),
                Ok(None) => {}
                Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
            }
            let ClientStream::Plain(tcp) = &mut self.stream else {
                return Ok(self.read_frame().await?.map_or(Next::Closed, Next::Frame));
            };
            if !self.read_buf.is_empty() || !self.out.is_empty() {
                // Part of a message is in: the rest follows shortly.
                return Ok(self.read_frame().await?.map_or(Next::Closed, Next::Frame));
            }
            if self.read_buf.capacity() > 0 || self.out.capacity() > 0 {
                // A busy client: read into the buffer it keeps. A read that
                // leaves room in the buffer tells tokio the socket is
                // drained, so the next request's read waits for epoll
                // instead of trying the socket first (`try_read_buf` below
                // keeps the readiness and costs a recv that finds nothing).
                if self.read_buf.capacity() < READ_BYTES / 4 {
                    // Reclaimed in place once the frames cut from it are gone.
                    self.read_buf.reserve(READ_BYTES);
                }
                match unless_idle(&mut self.idle_timer, tcp.read_buf(&mut self.read_buf)).await {
                    None => return Ok(self.release_buffers()),
                    Some(Ok(0)) => return Ok(Next::Closed),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) => return Err(SessionError::ClientGone),
                }
            }
            match unless_idle(&mut self.idle_timer, tcp.readable()).await {
                None => return Ok(self.release_buffers()),
                Some(Err(_)) => return Err(SessionError::ClientGone),
                Some(Ok(())) => {}
            }
            if self.read_buf.capacity() == 0 {
                self.read_buf.reserve(READ_BYTES);
            }
            // Readiness may be stale (the last read did not drain the
            // socket): then this clears it and the loop waits again.
            match tcp.try_read_buf(&mut self.read_buf) {
                Ok(0) => return Ok(Next::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(SessionError::ClientGone),
            }
        }
    }

    /// Gives the buffers of a client that went idle back. Both are empty,
    /// so no partial message is lost; frames cut from the read buffer keep
    /// their bytes.
    fn release_buffers(&mut self) -> Next {
        self.read_buf = BytesMut::new();
        self.out = BytesMut::new();
        self.idle_timer = None;
        if self.outbox.as_ref().is_some_and(Outbox::settled) {
            self.outbox = None;
        }
        Next::Idle
    }

    /// Waits until an idle client sends something (or closes).
    pub async fn readable(&self) -> Result<(), SessionError> {
        match &self.stream {
            ClientStream::Plain(tcp) => tcp.readable().await.map_err(|_| SessionError::ClientGone),
            // Never idle (see `read_request`).
            ClientStream::Tls(_) => Ok(()),
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
        self.open_outbox();
        let result = match &self.outbox {
            Some(outbox) => outbox.send(&self.out).await,
            None => self.stream.write_all(&self.out).await,
        };
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            // Do not keep a large result's buffer for the session's life.
            self.out = BytesMut::new();
        }
        result.map_err(|_| SessionError::ClientGone)
    }

    /// Makes the outbox to send through when a client starts sending again.
    fn open_outbox(&mut self) {
        if self.outbox.is_none() && self.gather_sends {
            if let ClientStream::Plain(tcp) = &self.stream {
                self.outbox = Outbox::new(tcp.as_fd());
            }
        }
    }

    pub fn error(&mut self, code: &str, message: &str, hint: Option<&str>) {
        messages::error_fields(b'E', "ERROR", code, message, hint, &mut self.out);
    }

    pub fn fatal(&mut self, code: &str, message: &str) {
        messages::error_fields(b'E', "FATAL", code, message, None, &mut self.out);
    }
}

/// How long a client may send nothing and keep its buffers: long enough
/// that a client busy with a stream of requests never gives them back (a
/// request then allocates none), short enough that the many idle clients of
/// a pooling proxy hold none.
pub const IDLE_AFTER: Duration = Duration::from_millis(500);

/// `io`'s output, or `None` when it took `IDLE_AFTER`.
///
/// One timer serves a busy client's every wait: pushing a registered timer
/// later only updates its deadline, while a fresh `tokio::time::timeout` per
/// wait put a new timer in the runtime's wheel, and woke the event loop
/// through its eventfd whenever that timer was the earliest one (a `write`
/// and an extra `epoll_wait` in a third of pgbench's transactions: see
/// docs/PERFORMANCE.md, "Wake-ups nobody needed").
async fn unless_idle<F: Future>(timer: &mut Option<Pin<Box<Sleep>>>, io: F) -> Option<F::Output> {
    let deadline = Instant::now() + IDLE_AFTER;
    let timer = match timer {
        Some(timer) => {
            timer.as_mut().reset(deadline);
            timer
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    tokio::select! {
        biased;
        output = io => Some(output),
        () = timer.as_mut() => None,
    }
}

/// The read buffer's size when a client starts a request after being idle:
/// most requests fit, larger ones grow it.
const READ_BYTES: usize = 4 * 1024;

/// What `read_request` found.
pub enum Next {
    Frame(Frame),
    Closed,
    Idle,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client disconnected")]
    ClientGone,
    #[error("protocol violation: {0}")]
    ClientProtocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::net::{TcpListener, TcpStream};

    async fn connected() -> (TcpStream, ClientIo) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let peer = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let io = ClientIo::new(ClientStream::Plain(server), BytesMut::new(), 1 << 20);
        (peer, io)
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut message = vec![b'Q'];
        message.extend_from_slice(&(4 + sql.len() as i32 + 1).to_be_bytes());
        message.extend_from_slice(sql.as_bytes());
        message.push(0);
        message
    }

    async fn next_query(io: &mut ClientIo) -> Vec<u8> {
        match io.read_request().await.expect("read") {
            Next::Frame(frame) => {
                assert_eq!(frame.tag, b'Q');
                frame.body().to_vec()
            }
            Next::Closed => panic!("closed"),
            Next::Idle => panic!("idle"),
        }
    }

    #[tokio::test]
    async fn an_idle_client_holds_no_buffers_and_goes_on_when_it_sends() {
        let (mut peer, mut io) = connected().await;
        peer.write_all(&query("SELECT 1")).await.expect("send");
        peer.write_all(&query("SELECT 2")).await.expect("send");
        assert_eq!(next_query(&mut io).await, b"SELECT 1\0");
        messages::ready_for_query(b'I', &mut io.out);
        io.flush().await.expect("flush");
        assert_eq!(next_query(&mut io).await, b"SELECT 2\0");
        // Busy: the buffers stay from one request to the next.
        assert!(io.read_buf.capacity() > 0 && io.out.capacity() > 0);
        messages::ready_for_query(b'I', &mut io.out);
        io.flush().await.expect("flush");

        let started = Instant::now();
        assert!(matches!(io.read_request().await, Ok(Next::Idle)));
        assert!(started.elapsed() >= IDLE_AFTER);
        assert_eq!((io.read_buf.capacity(), io.out.capacity()), (0, 0));
        assert!(io.idle_timer.is_none(), "an idle client holds no timer");
        let mut replies = [0u8; 12];
        peer.read_exact(&mut replies).await.expect("replies");
        assert_eq!(&replies, b"Z\0\0\0\x05IZ\0\0\0\x05I");

        peer.write_all(&query("SELECT 3")).await.expect("send");
        io.readable().await.expect("readable");
        assert_eq!(next_query(&mut io).await, b"SELECT 3\0");
        drop(peer);
        assert!(matches!(io.read_request().await, Ok(Next::Closed)));
    }

    #[tokio::test]
    async fn a_busy_client_is_read_request_after_request_past_its_buffers_size() {
        let (mut peer, mut io) = connected().await;
        // One at a time, as a client waiting for each reply sends them:
        // together many times the read buffer's size.
        for i in 0..(8 * READ_BYTES / 20) {
            let text = format!("SELECT {i:08}");
            peer.write_all(&query(&text)).await.expect("send");
            let mut expected = text.into_bytes();
            expected.push(0);
            assert_eq!(next_query(&mut io).await, expected);
            messages::ready_for_query(b'I', &mut io.out);
            io.flush().await.expect("flush");
            let mut reply = [0u8; 6];
            peer.read_exact(&mut reply).await.expect("reply");
            assert!(
                io.read_buf.capacity() > 0,
                "request {i}: busy, the buffer stays"
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_within_idle_after_stays_busy() {
        let (mut peer, mut io) = connected().await;
        peer.write_all(&query("SELECT 0")).await.expect("send");
        assert_eq!(next_query(&mut io).await, b"SELECT 0\0");
        // Each wait is shorter than IDLE_AFTER, all of them together longer:
        // the one timer is pushed back at every wait, not left to fire.
        let gap = IDLE_AFTER * 3 / 5;
        for i in 1..=3 {
            let text = format!("SELECT {i}");
            let sender = async {
                tokio::time::sleep(gap).await;
                peer.write_all(&query(&text)).await.expect("send");
            };
            let (next, ()) = tokio::join!(io.read_request(), sender);
            match next.expect("read") {
                Next::Frame(frame) => assert_eq!(&frame.body()[..8], text.as_bytes()),
                Next::Closed => panic!("request {i}: closed"),
                Next::Idle => panic!("request {i}: went idle after {gap:?}"),
            }
            assert!(
                io.read_buf.capacity() > 0,
                "request {i}: busy, the buffer stays"
            );
        }
    }
}
