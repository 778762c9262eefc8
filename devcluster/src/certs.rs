//! A throwaway certificate authority for a dev cluster started with TLS
//! (`shardctl dev up --tls`) and for the tests: one CA, a server certificate
//! for the loopback names (`localhost`, `127.0.0.1`) that Postgres and etcd
//! present, and a client certificate that shardline presents to them. Every
//! file is PEM in `<cluster dir>/tls/`; keys are mode 0600.
//!
//! Real deployments bring their own CA: nothing else in shardline depends on
//! these files, only the paths written into the dev cluster's config.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

use crate::DevError;

/// The subject names of the dev server certificate: what a client may
/// verify with `verify-full` when it connects over loopback.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// The common name of the dev client certificate (Postgres maps it to a
/// role with `clientcert=verify-full`; etcd to a user).
pub const CLIENT_NAME: &str = "postgres";

/// Where the files of a dev CA are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevCertificates {
    /// The CA certificate clients and servers trust.
    pub ca_cert: PathBuf,
    /// The server certificate (signed by the CA) and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The client certificate (CN [`CLIENT_NAME`]) and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA that can sign more certificates (tests that need one with other names).
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn tls_error(what: &str) -> impl FnOnce(rcgen::Error) -> DevError + '_ {
    move |e| DevError::Failed(format!("cannot create the dev {what}: {e}"))
}

impl DevCa {
    /// A new self-signed CA.
    pub fn new() -> Result<DevCa, DevError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error("CA"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "shardline dev CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(tls_error("CA key"))?;
        let pem = params.self_signed(&key).map_err(tls_error("CA"))?.pem();
        Ok(DevCa { params, key, pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A certificate signed by this CA: for a server with these subject
    /// names (DNS names or IP addresses), or for a client named `common_name`
    /// when `names` is empty. Returns (certificate PEM, key PEM).
    pub fn issue(&self, common_name: &str, names: &[&str]) -> Result<(String, String), DevError> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(tls_error("certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if names.is_empty() {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            // etcd's peers and gateways also use server certificates as clients.
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        let key = KeyPair::generate().map_err(tls_error("key"))?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(tls_error("certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl DevCertificates {
    /// Creates a CA, a server and a client certificate in `dir` (created if
    /// missing), or returns the ones already there.
    pub fn create(dir: &Path) -> Result<DevCertificates, DevError> {
        let certs = DevCertificates {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        };
        if certs.all_exist() {
            return Ok(certs);
        }
        fs::create_dir_all(dir)
            .map_err(DevError::io(format!("cannot create {}", dir.display())))?;
        let ca = DevCa::new()?;
        let (server_cert, server_key) = ca.issue("shardline dev server", &SERVER_NAMES)?;
        let (client_cert, client_key) = ca.issue(CLIENT_NAME, &[])?;
        write(&certs.ca_cert, ca.cert_pem(), 0o644)?;
        write(&certs.server_cert, &server_cert, 0o644)?;
        write(&certs.server_key, &server_key, 0o600)?;
        write(&certs.client_cert, &client_cert, 0o644)?;
        write(&certs.client_key, &client_key, 0o600)?;
        Ok(certs)
    }

    fn all_exist(&self) -> bool {
        [
            &self.ca_cert,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ]
        .iter()
        .all(|p| p.exists())
    }
}

/// Writes `text` to `path` with `mode` (set before any byte is written, so
/// a key is never readable by others, even briefly).
pub fn write(path: &Path, text: &str, mode: u32) -> Result<(), DevError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(DevError::io(format!("cannot write {}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(DevError::io(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_files_once_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shardline-certs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let certs = DevCertificates::create(&dir).expect("creates");
        let mode = fs::metadata(&certs.server_key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = fs::read_to_string(&certs.ca_cert).expect("ca");
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        let again = DevCertificates::create(&dir).expect("again");
        assert_eq!(fs::read_to_string(&again.ca_cert).expect("ca"), ca, "kept");
        let _ = fs::remove_dir_all(&dir);
    }
}
