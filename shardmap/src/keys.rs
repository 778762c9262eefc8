//! Sharding-key types and values: what a key column can be, and how a key
//! given as text (a SQL literal, a CLI argument, a map rule) becomes a value.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Re-exported so users of key values need no direct uuid dependency.
pub use uuid::Uuid;

/// Postgres type of a sharding-key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Smallint,
    Int,
    Bigint,
    Text,
    Uuid,
}

impl KeyType {
    /// The name Postgres uses for the type in DDL.
    pub fn sql_name(self) -> &'static str {
        match self {
            KeyType::Smallint => "smallint",
            KeyType::Int => "integer",
            KeyType::Bigint => "bigint",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }

    /// Parses a type name as Postgres spells it, with its common aliases.
    pub fn parse(name: &str) -> Option<KeyType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "smallint" | "int2" => Some(KeyType::Smallint),
            "int" | "integer" | "int4" => Some(KeyType::Int),
            "bigint" | "int8" => Some(KeyType::Bigint),
            "text" | "varchar" | "character varying" => Some(KeyType::Text),
            "uuid" => Some(KeyType::Uuid),
            _ => None,
        }
    }

    /// Parses `text` as a value of this type, as Postgres's input function would
    /// (integers are range-checked for the column's width).
    pub fn parse_value(self, text: &str) -> Result<KeyValue, KeyError> {
        let bad = |why: &str| KeyError::Invalid {
            key_type: self,
            input: text.to_string(),
            why: why.to_string(),
        };
        match self {
            KeyType::Smallint | KeyType::Int | KeyType::Bigint => {
                let value: i64 = text.trim().parse().map_err(|_| bad("not an integer"))?;
                let fits = match self {
                    KeyType::Smallint => i16::try_from(value).is_ok(),
                    KeyType::Int => i32::try_from(value).is_ok(),
                    _ => true,
                };
                if fits {
                    Ok(KeyValue::Int(value))
                } else {
                    Err(bad("out of range for the column type"))
                }
            }
            KeyType::Text => Ok(KeyValue::Text(text.to_string())),
            KeyType::Uuid => uuid::Uuid::parse_str(text.trim())
                .map(KeyValue::Uuid)
                .map_err(|_| bad("not a valid uuid")),
        }
    }

    /// Whether `value` is a value of this type (an integer key must also fit).
    pub fn accepts(self, value: &KeyValue) -> bool {
        match (self, value) {
            (KeyType::Smallint, KeyValue::Int(v)) => i16::try_from(*v).is_ok(),
            (KeyType::Int, KeyValue::Int(v)) => i32::try_from(*v).is_ok(),
            (KeyType::Bigint, KeyValue::Int(_)) => true,
            (KeyType::Text, KeyValue::Text(_)) => true,
            (KeyType::Uuid, KeyValue::Uuid(_)) => true,
            _ => false,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql_name())
    }
}

/// One sharding-key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Int(i64),
    Text(String),
    Uuid(uuid::Uuid),
}

impl KeyValue {
    /// Orders two values of the same kind the way Postgres orders them for
    /// range partitioning (text compared bytewise, as under the C collation).
    pub fn compare(&self, other: &KeyValue) -> Option<Ordering> {
        match (self, other) {
            (KeyValue::Int(a), KeyValue::Int(b)) => Some(a.cmp(b)),
            (KeyValue::Text(a), KeyValue::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (KeyValue::Uuid(a), KeyValue::Uuid(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            _ => None,
        }
    }
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(v) => write!(f, "{v}"),
            KeyValue::Uuid(v) => write!(f, "{v}"),
        }
    }
}

/// Why a key could not be turned into a partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid input for {key_type} key {input:?}: {why}")]
    Invalid {
        key_type: KeyType,
        input: String,
        why: String,
    },
    #[error("key {key} has the wrong type for a {expected} key column")]
    WrongType { key: KeyValue, expected: KeyType },
    #[error("no range of group {group:?} contains key {key}: add a range rule covering it")]
    NoRange { group: String, key: KeyValue },
    #[error("no list rule of group {group:?} holds value {key} and the group has no default partition: add the value to a list rule")]
    NotListed { group: String, key: KeyValue },
    #[error("id {id} is not a shardline embedded id (negative, or its partition bits exceed the cluster's partition count)")]
    NotEmbeddedId { id: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_widths_are_checked() {
        assert_eq!(KeyType::Int.parse_value("12"), Ok(KeyValue::Int(12)));
        assert!(KeyType::Int.parse_value("3000000000").is_err());
        assert!(KeyType::Smallint.parse_value("40000").is_err());
        assert_eq!(
            KeyType::Bigint.parse_value("-9223372036854775808"),
            Ok(KeyValue::Int(i64::MIN))
        );
        assert!(KeyType::Bigint.parse_value("12abc").is_err());
    }

    #[test]
    fn uuid_and_aliases_parse() {
        assert!(KeyType::Uuid
            .parse_value("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
            .is_ok());
        assert!(KeyType::Uuid.parse_value("nope").is_err());
        assert_eq!(KeyType::parse("INT8"), Some(KeyType::Bigint));
        assert_eq!(KeyType::parse("float"), None);
    }
}
