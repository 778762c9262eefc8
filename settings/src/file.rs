//! Reading a binary's TOML config file. Config types deny unknown keys, so
//! a misspelt setting stops the program with the key and its line instead of
//! being silently ignored.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file that cannot be used, saying which and why.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // `error` is deliberately not a `source`: it is in the message already,
    // and a source would print it twice in an error chain.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {}: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
}

/// Reads and decodes the TOML file at `path`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|error| FileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse_toml(&text).map_err(|why| FileError::Invalid {
        path: path.to_path_buf(),
        why,
    })
}

/// Decodes TOML `text`; the error is one line: where, what, and the keys
/// that would be accepted there (toml names them for unknown fields).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end();
        match e.span() {
            Some(span) => format!("line {}: {message}", line_of(text, span.start)),
            None => message.to_string(),
        }
    })
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        cluster: Option<String>,
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let error = parse_toml::<Example>("cluster = \"a\"\nclustr = \"b\"\n").expect_err("typo");
        assert!(error.starts_with("line 2: "), "{error}");
        assert!(
            error.contains("clustr") && error.contains("`cluster`"),
            "{error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        let missing = read_toml::<Example>(&path).expect_err("no file");
        assert!(missing.to_string().contains("c.toml"), "{missing}");
        std::fs::write(&path, "clustr = 1\n").expect("write");
        let invalid = read_toml::<Example>(&path).expect_err("typo");
        let text = invalid.to_string();
        assert!(text.contains("c.toml") && text.contains("clustr"), "{text}");
    }
}
