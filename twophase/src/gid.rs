//! Global transaction ids: the names shardline gives its prepared
//! transactions (`PREPARE TRANSACTION '<gid>'`), and reading them back.
//!
//! Format: `sl_<proxy>_<incarnation>_<seq>`.
//! - `proxy`: the writing proxy's id (its registration key in etcd). Bytes
//!   outside `[A-Za-z0-9.:-]` are written `%XX` (uppercase hex), so `_` only
//!   ever separates fields and a gid never needs quoting beyond its single
//!   quotes, whatever `standard_conforming_strings` says.
//! - `incarnation`: the etcd lease of the registration the id was made
//!   under, in lowercase hex. A restart (or a lost and renewed registration)
//!   gets a new lease, so ids never repeat across incarnations, and whether
//!   the writer is still alive is one comparison: is the proxy's key bound
//!   to this lease?
//! - `seq`: a counter of the generator, in decimal, from 1.
//!
//! Postgres allows gids of at most 199 bytes; a proxy id that would make
//! longer ones is refused when the generator is made.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every shardline gid starts with this.
pub const GID_PREFIX: &str = "sl_";

/// Postgres's limit (`GIDSIZE` is 200 bytes with the terminating zero).
pub const MAX_GID_BYTES: usize = 199;

/// The longest encoded proxy id: the prefix, two separators, 16 hex digits
/// and 20 decimal digits must still fit in [`MAX_GID_BYTES`].
pub const MAX_ENCODED_PROXY_BYTES: usize = MAX_GID_BYTES - 3 - 1 - 16 - 1 - 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GidError {
    #[error("proxy id {0:?} is too long to name prepared transactions (at most {MAX_ENCODED_PROXY_BYTES} bytes once encoded): choose a shorter --id")]
    ProxyIdTooLong(String),
    #[error("proxy id is empty: give the proxy an id")]
    EmptyProxyId,
    #[error("incarnation {0} is not an etcd lease id (must be positive)")]
    BadIncarnation(i64),
    #[error("{0:?} is not a shardline global transaction id")]
    NotShardline(String),
}

/// One global transaction id, with the fields it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gid {
    text: String,
    proxy: String,
    incarnation: i64,
    seq: u64,
}

impl Gid {
    /// The id of transaction `seq` of `proxy` in `incarnation`.
    pub fn new(proxy: &str, incarnation: i64, seq: u64) -> Result<Gid, GidError> {
        let head = head(proxy, incarnation)?;
        Ok(Gid {
            text: format!("{head}{seq}"),
            proxy: proxy.to_string(),
            incarnation,
            seq,
        })
    }

    /// Reads a gid back; only canonical ids (exactly as [`Gid::new`] writes
    /// them) are accepted, so a gid and its fields map one to one.
    pub fn parse(text: &str) -> Result<Gid, GidError> {
        let refuse = || GidError::NotShardline(text.to_string());
        let rest = text.strip_prefix(GID_PREFIX).ok_or_else(refuse)?;
        let mut fields = rest.rsplitn(3, '_');
        let (Some(seq), Some(incarnation), Some(proxy)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(refuse());
        };
        let digits = |s: &str, hex: bool| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (hex && (b'a'..=b'f').contains(&b)))
        };
        if !digits(seq, false) || !digits(incarnation, true) || incarnation.len() > 16 {
            return Err(refuse());
        }
        let seq: u64 = seq.parse().map_err(|_| refuse())?;
        let incarnation = u64::from_str_radix(incarnation, 16).map_err(|_| refuse())? as i64;
        let proxy = decode(proxy).ok_or_else(refuse)?;
        let gid = Gid::new(&proxy, incarnation, seq).map_err(|_| refuse())?;
        if gid.text != text {
            return Err(refuse());
        }
        Ok(gid)
    }

    /// The id as written in `PREPARE TRANSACTION '...'`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The id of the proxy that made it (decoded).
    pub fn proxy(&self) -> &str {
        &self.proxy
    }

    /// The etcd lease of the proxy's registration when it was made.
    pub fn incarnation(&self) -> i64 {
        self.incarnation
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// `'<gid>'`, ready for `PREPARE TRANSACTION`, `COMMIT PREPARED` and
    /// `ROLLBACK PREPARED` (the characters are restricted: nothing to escape).
    pub fn literal(&self) -> String {
        format!("'{}'", self.text)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Makes the gids of one proxy incarnation: one per transaction that
/// prepares on several servers. Shared by every serving thread.
#[derive(Debug)]
pub struct GidGenerator {
    head: String,
    proxy: String,
    incarnation: i64,
    next_seq: AtomicU64,
}

impl GidGenerator {
    /// A generator for proxy `proxy_id` registered under etcd lease
    /// `incarnation`. Fails if the id cannot make valid gids.
    pub fn new(proxy_id: &str, incarnation: i64) -> Result<GidGenerator, GidError> {
        Ok(GidGenerator {
            head: head(proxy_id, incarnation)?,
            proxy: proxy_id.to_string(),
            incarnation,
            next_seq: AtomicU64::new(1),
        })
    }

    /// Checks that `proxy_id` can name prepared transactions, before any
    /// lease is known (so a proxy can refuse to start with a bad id).
    pub fn check_proxy_id(proxy_id: &str) -> Result<(), GidError> {
        head(proxy_id, 1).map(|_| ())
    }

    /// A gid not given out before by any incarnation of any proxy.
    pub fn next(&self) -> Gid {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        Gid {
            text: format!("{}{seq}", self.head),
            proxy: self.proxy.clone(),
            incarnation: self.incarnation,
            seq,
        }
    }

    pub fn proxy_id(&self) -> &str {
        &self.proxy
    }

    pub fn incarnation(&self) -> i64 {
        self.incarnation
    }
}

/// `sl_<encoded proxy>_<incarnation>_`, validated.
fn head(proxy: &str, incarnation: i64) -> Result<String, GidError> {
    if proxy.is_empty() {
        return Err(GidError::EmptyProxyId);
    }
    if incarnation <= 0 {
        return Err(GidError::BadIncarnation(incarnation));
    }
    let encoded = encode(proxy);
    if encoded.len() > MAX_ENCODED_PROXY_BYTES {
        return Err(GidError::ProxyIdTooLong(proxy.to_string()));
    }
    Ok(format!("{GID_PREFIX}{encoded}_{:x}_", incarnation as u64))
}

fn plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b':' | b'-')
}

fn encode(proxy: &str) -> String {
    let mut out = String::with_capacity(proxy.len());
    for byte in proxy.bytes() {
        if plain(byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn decode(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = encoded.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            byte if plain(byte) => {
                out.push(byte);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_of_a_plain_id() {
        let generator = GidGenerator::new("127.0.0.1:6432", 0x694d_8a1f_0c2e_7b31).expect("valid");
        let first = generator.next();
        assert_eq!(first.as_str(), "sl_127.0.0.1:6432_694d8a1f0c2e7b31_1");
        assert_eq!(generator.next().seq(), 2);
        assert_eq!(first.literal(), "'sl_127.0.0.1:6432_694d8a1f0c2e7b31_1'");
    }

    #[test]
    fn parse_gives_back_the_fields() {
        for proxy in [
            "p1",
            "proxy_with_underscores",
            "a'b\\c",
            "名前",
            "x%y",
            "-",
            "a b",
        ] {
            let gid = Gid::new(proxy, 77, 12345).expect("valid");
            assert!(gid.as_str().starts_with(GID_PREFIX));
            assert!(
                gid.as_str()
                    .bytes()
                    .all(|b| plain(b) || b == b'_' || b == b'%'),
                "{gid} holds a character that could need quoting"
            );
            let parsed = Gid::parse(gid.as_str()).expect("parses");
            assert_eq!(parsed, gid);
            assert_eq!(parsed.proxy(), proxy);
            assert_eq!(parsed.incarnation(), 77);
            assert_eq!(parsed.seq(), 12345);
        }
    }

    #[test]
    fn incarnations_and_sequences_never_collide() {
        let a = GidGenerator::new("p", 1).expect("valid");
        let b = GidGenerator::new("p", 2).expect("valid");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(a.next().as_str().to_string()));
            assert!(seen.insert(b.next().as_str().to_string()));
        }
        // An id ending in digits cannot pass for another id's incarnation.
        let tricky = Gid::new("p_1", 2, 3).expect("valid");
        assert_eq!(tricky.as_str(), "sl_p%5F1_2_3");
        assert_eq!(Gid::parse(tricky.as_str()).expect("parses").proxy(), "p_1");
    }

    #[test]
    fn longest_ids_fit_postgres() {
        let proxy = "p".repeat(MAX_ENCODED_PROXY_BYTES);
        let gid = Gid::new(&proxy, i64::MAX, u64::MAX).expect("fits");
        assert_eq!(gid.as_str().len(), MAX_GID_BYTES);
        assert_eq!(
            Gid::new(&format!("{proxy}p"), 1, 1),
            Err(GidError::ProxyIdTooLong(format!("{proxy}p")))
        );
        // Escapes count: 60 spaces are 180 bytes once encoded.
        assert!(GidGenerator::check_proxy_id(&" ".repeat(60)).is_err());
        assert!(GidGenerator::check_proxy_id("").is_err());
        assert!(GidGenerator::new("p", 0).is_err());
    }

    #[test]
    fn other_names_are_refused() {
        for text in [
            "",
            "sl_",
            "sl_p_1",
            "sl__1_1",
            "sl_p_1_",
            "sl_p__1",
            "sl_p_1_x",
            "sl_p_A_1",
            "sl_p_01_1",
            "sl_p_1_01",
            "sl_p_1_+1",
            "sl_p%5f1_1_1",
            "sl_p%5_1_1",
            "sl_p q_1_1",
            "sl_p_11111111111111111_1",
            "sl_p_0_1",
            "SL_p_1_1",
            "other_app_1",
            "sl_p_1_99999999999999999999",
        ] {
            assert!(Gid::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}
