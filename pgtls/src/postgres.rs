//! tokio-postgres over rustls: a `MakeTlsConnect` built from a
//! [`Connector`], and [`connect`], which sets tokio-postgres's own sslmode
//! from ours (it knows only disable/prefer/require; the verify modes are
//! enforced by the rustls verifier) and words the errors.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Connection, Socket};
use tokio_rustls::TlsConnector;

use crate::{describe_handshake_error, refusal_hint, BackendTls, Connector, SslMode};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Makes one [`RustlsConnect`] per host tokio-postgres connects to.
#[derive(Clone, Debug)]
pub struct MakeRustlsConnect(Connector);

impl Connector {
    /// For `tokio_postgres::Config::connect`; pair it with
    /// [`Connector::configure`].
    pub fn make_tls_connect(&self) -> MakeRustlsConnect {
        MakeRustlsConnect(self.clone())
    }

    /// Sets tokio-postgres's sslmode for ours.
    pub fn configure(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
    }
}

pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    host: String,
    mode: SslMode,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, BoxError> {
        Ok(RustlsConnect {
            config: self.0.config.clone(),
            host: host.to_string(),
            mode: self.0.mode,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, BoxError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| BoxError::from("TLS is off for this server (sslmode disable)"))?;
            let name = ServerName::try_from(self.host.clone()).map_err(|e| {
                format!(
                    "host {:?} cannot be checked against a certificate: {e}",
                    self.host
                )
            })?;
            let tls = TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| describe_handshake_error(&e, &self.host, self.mode))?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// A tokio-postgres connection's stream under TLS.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM then runs without channel binding, as with libpq's
        // channel_binding=prefer against a server that offers none.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

/// Connects with `config` under `tls`. The error is one line: tokio-postgres's
/// chain of causes, plus what to change when the server wants TLS.
pub async fn connect(
    mut config: tokio_postgres::Config,
    tls: &BackendTls,
) -> Result<(Client, Connection<Socket, RustlsStream<Socket>>), String> {
    let connector = Connector::new(tls)?;
    connector.configure(&mut config);
    config
        .connect(connector.make_tls_connect())
        .await
        .map_err(|e| {
            let mut text = settings::error_chain(&e);
            if let Some(db) = e.as_db_error() {
                if let Some(hint) = refusal_hint(db.code().code(), db.message()) {
                    text.push_str("; ");
                    text.push_str(hint);
                }
            }
            text
        })
}
