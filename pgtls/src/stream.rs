//! The proxy's connection to a server after the SSLRequest: plain TCP, TLS
//! over it, or the server's Unix-domain socket (a server on the same host;
//! like libpq, no TLS there). An enum rather than a trait object, so the
//! plain path costs one branch per read and nothing is boxed per call.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{describe_handshake_error, Connector, TlsError};

/// The SSLRequest message: length 8, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connector {
    /// Asks the server for TLS on a fresh connection to `host` (the name
    /// certificates are checked against) and does the handshake, as the
    /// sslmode says. The startup message goes over the result.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<PgStream, TlsError> {
        let Some(config) = &self.config else {
            return Ok(PgStream::Plain(tcp));
        };
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' if self.mode.requires_tls() => {
                return Err(TlsError::NotOffered { mode: self.mode })
            }
            b'N' => return Ok(PgStream::Plain(tcp)),
            other => {
                return Err(TlsError::Protocol(format!(
                    "the server answered the SSLRequest with {:?}: is it a Postgres server?",
                    char::from(other)
                )))
            }
        }
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            TlsError::Handshake(format!(
                "host {host:?} cannot be checked against a certificate: {e}"
            ))
        })?;
        let tls = TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| TlsError::Handshake(describe_handshake_error(&e, host, self.mode)))?;
        Ok(PgStream::Tls(Box::new(tls)))
    }
}

impl PgStream {
    /// The socket under a plain or Unix-socket stream; none under TLS,
    /// whose bytes only rustls may write.
    pub fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            PgStream::Plain(s) => Some(s.as_fd()),
            PgStream::Unix(s) => Some(s.as_fd()),
            PgStream::Tls(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }

    /// Whether the server closed the connection or sent something while it
    /// sat idle, without blocking. Under TLS this reads the raw socket: any
    /// byte there means the connection is dropped anyway, so taking it from
    /// under rustls does no harm.
    pub fn closed_while_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        let read = match self {
            PgStream::Plain(s) => s.try_read(&mut probe),
            PgStream::Tls(s) => s.get_ref().0.try_read(&mut probe),
            PgStream::Unix(s) => s.try_read(&mut probe),
        };
        !matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            PgStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PgStream::Plain(s) => s.is_write_vectored(),
            PgStream::Tls(s) => s.is_write_vectored(),
            PgStream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
