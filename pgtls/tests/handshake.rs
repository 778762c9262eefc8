//! The sslmodes against an in-process TLS server that speaks just enough of
//! the protocol (answers the SSLRequest, then a handshake), with the dev
//! CA's certificates: what each mode accepts and how refusals read.

use std::path::PathBuf;
use std::sync::Arc;

use devcluster::DevCertificates;
use pgtls::{BackendTls, Connector, SslMode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Server {
    addr: std::net::SocketAddr,
    _task: tokio::task::JoinHandle<()>,
}

/// A server answering `answer` to SSLRequests, then (for `S`) a TLS handshake
/// with the dev server certificate, then echoing.
async fn server(certs: &DevCertificates, answer: u8) -> Server {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("pem");
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if tcp.read_exact(&mut request).await.is_err() {
                    return;
                }
                let _ = tcp.write_all(&[answer]).await;
                if answer == b'S' {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut byte = [0u8; 1];
                        if tls.read_exact(&mut byte).await.is_ok() {
                            let _ = tls.write_all(&byte).await;
                            let _ = tls.flush().await;
                        }
                    }
                }
            });
        }
    });
    Server { addr, _task: task }
}

fn settings(certs: &DevCertificates, mode: SslMode, root: bool) -> BackendTls {
    BackendTls {
        mode,
        root_cert: root.then(|| certs.ca_cert.clone()),
        cert: None,
        key: None,
    }
}

async fn attempt(server: &Server, tls: &BackendTls, host: &str) -> Result<bool, String> {
    let connector = Connector::new(tls)?;
    let tcp = TcpStream::connect(server.addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = connector
        .negotiate(tcp, host)
        .await
        .map_err(|e| e.to_string())?;
    if stream.is_tls() {
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 1];
        stream
            .read_exact(&mut back)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&back, b"x");
    }
    Ok(stream.is_tls())
}

fn dev_certs() -> (tempfile::TempDir, DevCertificates) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = DevCertificates::create(&dir.path().join("tls")).expect("certs");
    (dir, certs)
}

#[tokio::test]
async fn each_mode_checks_what_libpq_checks() {
    let (_dir, certs) = dev_certs();
    let tls_server = server(&certs, b'S').await;
    // The dev certificate covers localhost and 127.0.0.1, not db.example.
    let full = settings(&certs, SslMode::VerifyFull, true);
    assert_eq!(attempt(&tls_server, &full, "127.0.0.1").await, Ok(true));
    assert_eq!(attempt(&tls_server, &full, "localhost").await, Ok(true));
    let wrong = attempt(&tls_server, &full, "db.example")
        .await
        .expect_err("wrong host");
    assert!(
        wrong.contains("does not match host db.example") && wrong.contains("verify-ca"),
        "{wrong}"
    );
    let ca = settings(&certs, SslMode::VerifyCa, true);
    assert_eq!(attempt(&tls_server, &ca, "db.example").await, Ok(true));
    let require = settings(&certs, SslMode::Require, false);
    assert_eq!(attempt(&tls_server, &require, "db.example").await, Ok(true));
    let prefer = settings(&certs, SslMode::Prefer, false);
    assert_eq!(attempt(&tls_server, &prefer, "db.example").await, Ok(true));
    let disable = settings(&certs, SslMode::Disable, false);
    assert_eq!(
        attempt(&tls_server, &disable, "db.example").await,
        Ok(false)
    );
}

#[tokio::test]
async fn another_ca_and_a_server_without_tls_are_refused_clearly() {
    let (_dir, certs) = dev_certs();
    let (_other_dir, other) = dev_certs();
    let tls_server = server(&certs, b'S').await;
    let foreign = BackendTls {
        mode: SslMode::VerifyCa,
        root_cert: Some(other.ca_cert.clone()),
        cert: None,
        key: None,
    };
    let error = attempt(&tls_server, &foreign, "127.0.0.1")
        .await
        .expect_err("other CA");
    assert!(
        error.contains("not signed by a CA in sslrootcert"),
        "{error}"
    );

    let plain_server = server(&certs, b'N').await;
    let prefer = settings(&certs, SslMode::Prefer, false);
    assert_eq!(
        attempt(&plain_server, &prefer, "127.0.0.1").await,
        Ok(false)
    );
    let full = settings(&certs, SslMode::VerifyFull, true);
    let error = attempt(&plain_server, &full, "127.0.0.1")
        .await
        .expect_err("no TLS");
    assert!(error.contains("does not accept TLS"), "{error}");
}

#[test]
fn unreadable_files_are_named() {
    let tls = BackendTls {
        mode: SslMode::VerifyFull,
        root_cert: Some(PathBuf::from("/nonexistent/ca.crt")),
        cert: None,
        key: None,
    };
    let error = Connector::new(&tls).expect_err("no file");
    assert!(error.contains("/nonexistent/ca.crt"), "{error}");
}
