//! Authenticating clients: SCRAM-SHA-256 (the default), md5 and trust, against
//! users from the proxy's config. Passwords may be given in clear or as the
//! verifiers Postgres stores (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`,
//! `md5<hex>`), and are never logged.
//!
//! A user name that is not configured gets the same exchange as a known one
//! with a wrong password: a mock SCRAM secret (salt and keys derived from the
//! name and a per-process key, so every try for the name sees the same salt,
//! as Postgres' mock authentication does) or a mock md5 verifier, the same
//! work, and the same error. Secrets are compared in constant time (`subtle`).

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

/// SCRAM secrets of one user: all the server needs to verify a login.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA256 with one output block (SCRAM's `Hi`).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (r, x) in result.iter_mut().zip(u.iter()) {
            *r ^= x;
        }
    }
    result
}

impl ScramSecret {
    /// Derives the secret from a clear-text password with a random salt.
    pub fn from_password(password: &str) -> ScramSecret {
        let salt: [u8; 16] = rand::random();
        ScramSecret::derive(password, &salt, 4096)
    }

    fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let salted = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// Parses a verifier as Postgres stores it in `pg_authid.rolpassword`.
    pub fn parse_verifier(text: &str) -> Option<ScramSecret> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// One user the proxy accepts.
#[derive(Debug, Clone)]
pub struct User {
    pub scram: Option<ScramSecret>,
    /// `md5` + md5(password + username), as Postgres stores it.
    pub md5: Option<String>,
}

impl User {
    pub fn from_password(name: &str, password: &str) -> User {
        User {
            scram: Some(ScramSecret::from_password(password)),
            md5: Some(md5_verifier(name, password)),
        }
    }
}

pub fn md5_verifier(user: &str, password: &str) -> String {
    let mut hasher = md5::Md5::new();
    hasher.update(password.as_bytes());
    hasher.update(user.as_bytes());
    format!("md5{}", hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a client must send in response to an md5 challenge with `salt`.
pub fn md5_expected(verifier: &str, salt: [u8; 4]) -> Option<String> {
    let inner = verifier.strip_prefix("md5")?;
    let mut hasher = md5::Md5::new();
    hasher.update(inner.as_bytes());
    hasher.update(salt);
    Some(format!("md5{}", hex(&hasher.finalize())))
}

/// Whether `given` is what a client must send to answer an md5 challenge
/// with `salt` for `verifier`, compared in constant time.
pub fn md5_matches(verifier: &str, salt: [u8; 4], given: &[u8]) -> bool {
    md5_expected(verifier, salt)
        .is_some_and(|expected| bool::from(expected.as_bytes().ct_eq(given)))
}

/// SCRAM's default iteration count (Postgres' `scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The users the proxy accepts, by name, and the key of this process's mock
/// secrets for the names it does not know.
#[derive(Clone)]
pub struct Users {
    pub by_name: HashMap<String, User>,
    /// The iteration count mock SCRAM secrets advertise: the one most
    /// configured users have, so a mock salt does not stand out.
    pub mock_iterations: u32,
    mock_key: [u8; 32],
}

impl Default for Users {
    fn default() -> Users {
        Users {
            by_name: HashMap::new(),
            mock_iterations: DEFAULT_ITERATIONS,
            mock_key: rand::random(),
        }
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("by_name", &self.by_name)
            .field("mock_iterations", &self.mock_iterations)
            .finish_non_exhaustive()
    }
}

impl Users {
    /// The SCRAM iteration count most configured users have.
    pub fn usual_iterations(&self) -> u32 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for secret in self.by_name.values().filter_map(|u| u.scram.as_ref()) {
            *counts.entry(secret.iterations).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(iterations, count)| (count, iterations))
            .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations)
    }

    fn mock_part(&self, purpose: &[u8], user: &str) -> [u8; 32] {
        let mut data = purpose.to_vec();
        data.push(0);
        data.extend_from_slice(user.as_bytes());
        hmac(&self.mock_key, &data)
    }

    /// A SCRAM secret for a name that has none: stable per name for this
    /// process, matching no password anyone knows.
    pub fn mock_scram(&self, user: &str) -> ScramSecret {
        ScramSecret {
            iterations: self.mock_iterations,
            salt: self.mock_part(b"salt", user)[..16].to_vec(),
            stored_key: self.mock_part(b"stored key", user),
            server_key: self.mock_part(b"server key", user),
        }
    }

    /// An md5 verifier for a name that has none.
    pub fn mock_md5(&self, user: &str) -> String {
        format!("md5{}", hex(&self.mock_part(b"md5", user)[..16]))
    }

    /// `user`'s SCRAM secret, or a mock one (`true`) when it has none.
    pub fn scram_secret(&self, user: &str) -> (ScramSecret, bool) {
        match self.by_name.get(user).and_then(|u| u.scram.clone()) {
            Some(secret) => (secret, false),
            None => (self.mock_scram(user), true),
        }
    }

    /// `user`'s md5 verifier, or a mock one (`true`) when it has none.
    pub fn md5_verifier(&self, user: &str) -> (String, bool) {
        match self.by_name.get(user).and_then(|u| u.md5.clone()) {
            Some(verifier) => (verifier, false),
            None => (self.mock_md5(user), true),
        }
    }
}

/// A SCRAM exchange in progress, server side.
pub struct ScramServer {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("wrong password")]
    WrongProof,
}

impl ScramServer {
    /// Handles client-first-message; returns the exchange and server-first-message.
    pub fn start(
        secret: ScramSecret,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        // gs2-header: "n,," or "y,," (client supports binding, server does not); "p=" asks for it.
        let (gs2_header, bare) = if let Some(rest) = text.strip_prefix("n,,") {
            ("n,,", rest)
        } else if let Some(rest) = text.strip_prefix("y,,") {
            ("y,,", rest)
        } else if text.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed);
        };
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed)?;
        let server_part: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_part));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        Ok((
            ScramServer {
                secret,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
                gs2_header: gs2_header.to_string(),
            },
            server_first,
        ))
    }

    /// Checks client-final-message; returns server-final-message.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        if channel != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed);
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed)?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !bool::from(stored.ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn scram_round_trip_with_a_real_client() {
        let secret = ScramSecret::from_password("s3cret");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (server, server_first) =
            ScramServer::start(secret, client.message()).expect("client-first");
        client
            .update(server_first.as_bytes())
            .expect("server-first accepted");
        let server_final = server.finish(client.message()).expect("proof accepted");
        client
            .finish(server_final.as_bytes())
            .expect("server signature verified");
    }

    #[test]
    fn scram_rejects_a_wrong_password() {
        let secret = ScramSecret::from_password("right");
        let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let (server, server_first) =
            ScramServer::start(secret, client.message()).expect("client-first");
        client
            .update(server_first.as_bytes())
            .expect("server-first accepted");
        assert_eq!(server.finish(client.message()), Err(ScramError::WrongProof));
    }

    #[test]
    fn verifiers_parse_like_postgres_stores_them() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let secret = ScramSecret::parse_verifier(&verifier).expect("parses");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let (server, server_first) = ScramServer::start(secret, client.message()).expect("start");
        client.update(server_first.as_bytes()).expect("update");
        assert!(server.finish(client.message()).is_ok());
        assert!(ScramSecret::parse_verifier("SCRAM-SHA-256$x").is_none());
    }

    #[test]
    fn md5_matches_libpq() {
        let salt = [1, 2, 3, 4];
        let client = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
        assert_eq!(
            md5_expected(&md5_verifier("alice", "pw"), salt),
            Some(client)
        );
    }

    #[test]
    fn md5_comparison_accepts_only_the_right_answer() {
        let verifier = md5_verifier("alice", "pw");
        let salt = [9, 8, 7, 6];
        let right = postgres_protocol::authentication::md5_hash(b"alice", b"pw", salt);
        let wrong = postgres_protocol::authentication::md5_hash(b"alice", b"pX", salt);
        assert!(md5_matches(&verifier, salt, right.as_bytes()));
        assert!(!md5_matches(&verifier, salt, wrong.as_bytes()));
        assert!(!md5_matches(&verifier, salt, &right.as_bytes()[..10]));
        assert!(!md5_matches("not a verifier", salt, right.as_bytes()));
    }

    #[test]
    fn unknown_users_get_a_stable_mock_exchange_that_fails_like_a_wrong_password() {
        let mut users = Users::default();
        users
            .by_name
            .insert("app".into(), User::from_password("app", "pw"));
        users.mock_iterations = users.usual_iterations();
        let (mock, is_mock) = users.scram_secret("ghost");
        assert!(is_mock);
        assert_eq!(mock, users.mock_scram("ghost"), "same salt on every try");
        assert_ne!(mock.salt, users.mock_scram("ghost2").salt);
        assert_eq!(mock.salt.len(), 16, "as long as a real salt");
        let (real, _) = users.scram_secret("app");
        assert_eq!(mock.iterations, real.iterations);
        let other_process = Users::default();
        assert_ne!(other_process.mock_scram("ghost").salt, mock.salt);

        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let (server, server_first) = ScramServer::start(mock, client.message()).expect("start");
        client
            .update(server_first.as_bytes())
            .expect("a real client accepts the mock server-first");
        assert_eq!(server.finish(client.message()), Err(ScramError::WrongProof));

        let (md5, is_mock) = users.md5_verifier("ghost");
        assert!(is_mock && md5.starts_with("md5") && md5.len() == 35);
        assert_eq!(md5, users.mock_md5("ghost"));
        let debug = format!("{users:?}");
        assert!(!debug.contains("mock_key"), "{debug}");
    }

    #[test]
    fn the_mock_iteration_count_follows_the_configured_users() {
        let mut users = Users::default();
        assert_eq!(users.usual_iterations(), DEFAULT_ITERATIONS);
        for (name, iterations) in [("a", 10_000), ("b", 10_000), ("c", 4096)] {
            let secret = ScramSecret::derive("pw", b"salt", iterations);
            users.by_name.insert(
                name.into(),
                User {
                    scram: Some(secret),
                    md5: None,
                },
            );
        }
        assert_eq!(users.usual_iterations(), 10_000);
    }

    #[test]
    fn malformed_client_messages_are_refused() {
        let secret = ScramSecret::from_password("pw");
        assert!(ScramServer::start(secret.clone(), b"garbage").is_err());
        assert!(ScramServer::start(secret.clone(), b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramServer::start(secret.clone(), b"n,,n=,r=").is_err());
        let (server, _) = ScramServer::start(secret, b"n,,n=,r=abc").expect("start");
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
        assert!(server.finish(b"\xff").is_err());
    }
}
