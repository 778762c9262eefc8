//! pgtls: TLS from shardline to its Postgres servers, with rustls, as libpq
//! means `sslmode`:
//!
//! - `disable`: clear text;
//! - `prefer`: TLS when the server accepts the SSLRequest, clear text when it
//!   declines (a failed handshake is an error, not a fallback);
//! - `require`: TLS or nothing; the certificate is not checked unless
//!   `sslrootcert` is set (then as `verify-ca`, like libpq with a root file);
//! - `verify-ca`: the chain must lead to `sslrootcert`; the host name is not checked;
//! - `verify-full`: chain and host name (DNS name or IP address) are checked.
//!
//! A [`Connector`] is built once from a server's [`BackendTls`] (it reads
//! the PEM files then) and serves two kinds of connections: the proxy's own
//! wire-protocol ones ([`Connector::negotiate`] → [`PgStream`]) and
//! tokio-postgres ones ([`connect`], used by the rebalancer, shardctl and
//! two-phase recovery), so every binary checks certificates the same way.
//! Errors say what is wrong and which setting to change.

mod postgres;
mod stream;
mod verify;

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use settings::{BackendTls, SslMode};

pub use postgres::{connect, MakeRustlsConnect, RustlsConnect, RustlsStream};
pub use stream::PgStream;

/// How to reach one server: its mode, and the rustls configuration unless
/// the mode is `disable`.
#[derive(Clone)]
pub struct Connector {
    mode: SslMode,
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Why a connection could not be secured as its sslmode asks.
#[derive(Debug)]
pub enum TlsError {
    /// The server answered the SSLRequest with `N`.
    NotOffered {
        mode: SslMode,
    },
    /// The TLS handshake failed; the text says why and what to change.
    Handshake(String),
    /// The server's answer to the SSLRequest was not `S` or `N`.
    Protocol(String),
    Io(io::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::NotOffered { mode } => write!(
                f,
                "the server does not accept TLS connections and sslmode is {mode}: turn ssl on \
                 on the server, or set sslmode = \"prefer\" to allow clear text"
            ),
            TlsError::Handshake(text) | TlsError::Protocol(text) => f.write_str(text),
            TlsError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<io::Error> for TlsError {
    fn from(e: io::Error) -> TlsError {
        TlsError::Io(e)
    }
}

impl Connector {
    /// Reads the files `tls` names and builds the rustls configuration.
    pub fn new(tls: &BackendTls) -> Result<Connector, String> {
        let config = match tls.mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(verify::client_config(tls)?)),
        };
        Ok(Connector {
            mode: tls.mode,
            config,
        })
    }

    /// Clear text only.
    pub fn disabled() -> Connector {
        Connector {
            mode: SslMode::Disable,
            config: None,
        }
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }
}

/// Checks that a connection could be secured to every server as
/// `credentials` say (the settings for all servers, and each server's own):
/// modes complete, files readable and well-formed. For binaries to refuse
/// to start on a mistake rather than fail every connection.
pub fn check(credentials: &settings::Credentials) -> Result<(), String> {
    for server in std::iter::once("").chain(credentials.servers.keys().map(String::as_str)) {
        Connector::new(&credentials.tls_for_server(server)?).map_err(|e| match server {
            "" => format!("[backend] TLS settings: {e}"),
            _ => format!("TLS settings for server {server}: {e}"),
        })?;
    }
    Ok(())
}

/// What a rustls handshake error means for the operator, for a server
/// reached as `host` with `mode`.
pub fn describe_handshake_error(error: &io::Error, host: &str, mode: SslMode) -> String {
    use rustls::CertificateError as C;
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(problem)) => match problem {
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the server's certificate does not match host {host} (sslmode {mode}): fix the \
                 certificate's names, name the server in the map by a host the certificate \
                 covers, or set sslmode = \"verify-ca\" to check the chain only"
            ),
            C::UnknownIssuer | C::BadSignature => format!(
                "the server's certificate is not signed by a CA in sslrootcert (sslmode {mode}): \
                 set sslrootcert to the CA that issued the servers' certificates"
            ),
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => {
                format!("the server's certificate has expired or is not valid yet (sslmode {mode}): renew it")
            }
            other => format!(
                "the server's certificate was refused ({other:?}, sslmode {mode}): fix the \
                 certificate or the sslmode"
            ),
        },
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "the server ended the TLS handshake ({alert:?}): if it asks for a client \
             certificate, set sslcert and sslkey to one its CA signed"
        ),
        Some(other) => format!("TLS handshake with the server failed: {other}"),
        None => format!("TLS handshake with the server failed: {error}"),
    }
}

/// A hint for a login the server refused, when the refusal is about TLS:
/// pg_hba allows only `hostssl` and this connection was in clear text.
pub fn refusal_hint(code: &str, message: &str) -> Option<&'static str> {
    (code == "28000" && message.contains("no encryption")).then_some(
        "the server takes TLS connections only: set sslmode = \"verify-full\" (or \"require\") \
         in [backend], or SHARDLINE_BACKEND_SSLMODE",
    )
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read sslkey {}: {e}", path.display()))
}
