//! The values of sharding keys in a statement: literals, constants and
//! Bind parameters (text or binary), and arrays of keys (`key = ANY(...)`),
//! decoded for the key column's type. Bad values are errors with the
//! SQLSTATE Postgres would give, never panics.

use std::collections::BTreeMap;

use bytes::Bytes;
use shardmap::{KeyType, KeyValue};

use super::{Params, RouteError};
use crate::analyze::statement::KeyExpr;
use crate::analyze::Literal;

pub(super) fn invalid_key(text: impl std::fmt::Display) -> RouteError {
    RouteError::new(
        "22P02",
        format!("invalid sharding key: {text}"),
        "pass a value of the key column's type",
    )
}

/// The keys a key expression stands for (several for an array); `None`
/// for a parameter not bound yet.
pub(super) fn evaluate_keys(
    expr: &KeyExpr,
    key_type: KeyType,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<Vec<KeyValue>>, RouteError> {
    let KeyExpr::Array(inner) = expr else {
        return Ok(evaluate(expr, key_type, literals, params)?.map(|key| vec![key]));
    };
    let elements: Vec<KeyValue> = match inner.as_ref() {
        KeyExpr::Literal(i) => {
            let literal = literals
                .get(*i)
                .ok_or_else(|| invalid_key(format!("literal {i} missing")))?;
            parse_text_keys(literal.text(), key_type)?
        }
        KeyExpr::Const(text) => parse_text_keys(text, key_type)?,
        KeyExpr::Param(i) => {
            let Some(params) = params else {
                return Ok(None);
            };
            let value = params
                .bind
                .params
                .get(*i)
                .ok_or_else(|| invalid_key(format!("parameter ${} was not bound", i + 1)))?;
            let Some(bytes) = value else {
                // `= ANY(NULL)` matches nothing.
                return Ok(Some(Vec::new()));
            };
            if params.bind.is_binary(*i) {
                binary_array_keys(bytes, key_type)?
            } else {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| invalid_key("parameter is not valid UTF-8"))?;
                parse_text_keys(text, key_type)?
            }
        }
        other => return Err(invalid_key(format!("ANY over {other:?}"))),
    };
    Ok(Some(elements))
}

/// The elements of an array in Postgres's text form (`{1,2,"x y"}`, with an
/// optional `[1:2]=` prefix); NULL elements match no row and are left out.
fn parse_text_keys(text: &str, key_type: KeyType) -> Result<Vec<KeyValue>, RouteError> {
    text_array_elements(text)?
        .iter()
        .map(|element| key_type.parse_value(element).map_err(invalid_key))
        .collect()
}

/// The non-NULL elements of a one-dimensional array in text form, unquoted.
fn text_array_elements(text: &str) -> Result<Vec<String>, RouteError> {
    let text = text.trim();
    let text = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let body = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| invalid_key(format!("{text:?} is not an array")))?;
    let mut elements = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            break;
        };
        let mut element = String::new();
        let quoted = first == '"';
        if first == '{' {
            return Err(invalid_key("a multidimensional array of keys"));
        }
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => element.extend(chars.next()),
                    Some('"') => break,
                    Some(c) => element.push(c),
                    None => return Err(invalid_key("unterminated quoted array element")),
                }
            }
        }
        while let Some(&c) = chars.peek() {
            if c == ',' {
                break;
            }
            chars.next();
            if !quoted {
                element.push(c);
            }
        }
        chars.next();
        let element = if quoted {
            element
        } else {
            element.trim().to_string()
        };
        if !quoted && element.eq_ignore_ascii_case("null") {
            continue;
        }
        elements.push(element);
    }
    Ok(elements)
}

/// An array parameter's elements split by the server that owns each key,
/// each part re-encoded in the parameter's own format (text or binary), so
/// every server gets only its own keys. NULL elements are dropped (they
/// match no row). `None` when a key has no owner.
pub(super) fn split_array(
    bytes: &[u8],
    binary: bool,
    key_type: KeyType,
    owner: impl Fn(&KeyValue) -> Option<String>,
) -> Result<Option<BTreeMap<String, Bytes>>, RouteError> {
    let mut parts: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let element_type = if binary {
        let (element_type, elements) = binary_array_elements(bytes)?;
        for element in elements {
            let key = decode_binary(element, key_type)?;
            let Some(server) = owner(&key) else {
                return Ok(None);
            };
            parts.entry(server).or_default().push(element.to_vec());
        }
        element_type
    } else {
        let text =
            std::str::from_utf8(bytes).map_err(|_| invalid_key("parameter is not valid UTF-8"))?;
        for element in text_array_elements(text)? {
            let key = key_type.parse_value(&element).map_err(invalid_key)?;
            let Some(server) = owner(&key) else {
                return Ok(None);
            };
            parts.entry(server).or_default().push(element.into_bytes());
        }
        0
    };
    Ok(Some(
        parts
            .into_iter()
            .map(|(server, elements)| {
                let encoded = if binary {
                    encode_binary_array(element_type, &elements)
                } else {
                    encode_text_array(&elements)
                };
                (server, Bytes::from(encoded))
            })
            .collect(),
    ))
}

fn encode_text_array(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        for &b in element {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
    out.push(b'}');
    out
}

fn encode_binary_array(element_type: u32, elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for word in [1i32, 0] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&element_type.to_be_bytes());
    out.extend_from_slice(&(elements.len() as i32).to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    for element in elements {
        out.extend_from_slice(&(element.len() as i32).to_be_bytes());
        out.extend_from_slice(element);
    }
    out
}

/// The elements of an array in Postgres's binary form (one dimension);
/// NULL elements are left out.
fn binary_array_keys(bytes: &[u8], key_type: KeyType) -> Result<Vec<KeyValue>, RouteError> {
    binary_array_elements(bytes)?
        .1
        .into_iter()
        .map(|element| decode_binary(element, key_type))
        .collect()
}

/// The element type and the non-NULL elements of a binary array.
fn binary_array_elements(bytes: &[u8]) -> Result<(u32, Vec<&[u8]>), RouteError> {
    let malformed = || invalid_key("malformed binary array");
    let word = |at: usize| -> Result<i32, RouteError> {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(malformed)
    };
    let dimensions = word(0)?;
    let element_type = word(8)? as u32;
    match dimensions {
        0 => return Ok((element_type, Vec::new())),
        1 => {}
        _ => return Err(invalid_key("a multidimensional array of keys")),
    }
    let count = usize::try_from(word(12)?).map_err(|_| malformed())?;
    let mut at = 20;
    let mut elements = Vec::with_capacity(count.min(bytes.len() / 4));
    for _ in 0..count {
        let len = word(at)?;
        at += 4;
        if len < 0 {
            continue;
        }
        let end = at.checked_add(len as usize).ok_or_else(malformed)?;
        elements.push(bytes.get(at..end).ok_or_else(malformed)?);
        at = end;
    }
    Ok((element_type, elements))
}

/// The value of a key expression; `None` for a parameter not bound yet.
fn evaluate(
    expr: &KeyExpr,
    key_type: KeyType,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<KeyValue>, RouteError> {
    match expr {
        KeyExpr::Literal(i) => {
            let literal = literals
                .get(*i)
                .ok_or_else(|| invalid_key(format!("literal {i} missing")))?;
            key_type
                .parse_value(literal.text())
                .map(Some)
                .map_err(invalid_key)
        }
        KeyExpr::Const(text) => key_type.parse_value(text).map(Some).map_err(invalid_key),
        KeyExpr::Array(_) => Err(invalid_key("an array where one key was expected")),
        KeyExpr::Negate(inner) => match evaluate(inner, key_type, literals, params)? {
            None => Ok(None),
            Some(KeyValue::Int(v)) => v
                .checked_neg()
                .map(|v| Some(KeyValue::Int(v)))
                .ok_or_else(|| invalid_key("out of range")),
            Some(other) => Err(invalid_key(format!("-{other}"))),
        },
        KeyExpr::Param(i) => {
            let Some(params) = params else {
                return Ok(None);
            };
            let value = params
                .bind
                .params
                .get(*i)
                .ok_or_else(|| invalid_key(format!("parameter ${} was not bound", i + 1)))?;
            let Some(bytes) = value else {
                return Err(RouteError::new(
                    "22004",
                    format!("the sharding key (parameter ${}) is NULL", i + 1),
                    "pass a non-NULL key",
                ));
            };
            let declared = params.types.get(*i).copied().unwrap_or(0);
            let textual_type = matches!(declared, 25 | 1043 | 19 | 705);
            if params.bind.is_binary(*i) && !textual_type {
                decode_binary(bytes, key_type).map(Some)
            } else {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| invalid_key("parameter is not valid UTF-8"))?;
                key_type.parse_value(text).map(Some).map_err(invalid_key)
            }
        }
    }
}

pub(crate) fn decode_binary(bytes: &[u8], key_type: KeyType) -> Result<KeyValue, RouteError> {
    let wrong = || {
        invalid_key(format!(
            "a {}-byte binary value for a {key_type} key",
            bytes.len()
        ))
    };
    let value = match key_type {
        KeyType::Smallint | KeyType::Int | KeyType::Bigint => match bytes.len() {
            2 => KeyValue::Int(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
            4 => KeyValue::Int(i64::from(i32::from_be_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]))),
            8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                KeyValue::Int(i64::from_be_bytes(b))
            }
            _ => return Err(wrong()),
        },
        KeyType::Text => KeyValue::Text(String::from_utf8(bytes.to_vec()).map_err(|_| wrong())?),
        KeyType::Uuid => KeyValue::Uuid(uuid_from(bytes).ok_or_else(wrong)?),
    };
    if key_type.accepts(&value) {
        Ok(value)
    } else {
        Err(invalid_key(format!(
            "{value} is out of range for {key_type}"
        )))
    }
}

fn uuid_from(bytes: &[u8]) -> Option<shardmap::keys::Uuid> {
    let array: [u8; 16] = bytes.try_into().ok()?;
    Some(shardmap::keys::Uuid::from_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_split_by_owner_in_their_own_format() {
        let owner = |key: &KeyValue| match key {
            KeyValue::Int(k) => Some(if k % 2 == 0 { "even" } else { "odd" }.to_string()),
            _ => None,
        };
        let split = split_array(b"{1,2,3,NULL,4}", false, KeyType::Bigint, owner)
            .expect("splits")
            .expect("owned");
        assert_eq!(split["even"], Bytes::from_static(b"{\"2\",\"4\"}"));
        assert_eq!(split["odd"], Bytes::from_static(b"{\"1\",\"3\"}"));
        let binary = encode_binary_array(
            20,
            &[5i64.to_be_bytes().to_vec(), 6i64.to_be_bytes().to_vec()],
        );
        let split = split_array(&binary, true, KeyType::Bigint, owner)
            .expect("splits")
            .expect("owned");
        assert_eq!(
            binary_array_keys(&split["odd"], KeyType::Bigint),
            Ok(vec![KeyValue::Int(5)])
        );
        assert_eq!(
            binary_array_keys(&split["even"], KeyType::Bigint),
            Ok(vec![KeyValue::Int(6)])
        );
        assert!(split_array(b"{x}", false, KeyType::Bigint, owner).is_err());
    }

    #[test]
    fn arrays_of_keys_parse_in_text_and_binary() {
        assert_eq!(
            parse_text_keys("{1, \"2\",NULL}", KeyType::Bigint),
            Ok(vec![KeyValue::Int(1), KeyValue::Int(2)])
        );
        assert!(parse_text_keys("{{1}}", KeyType::Bigint).is_err());
        assert!(parse_text_keys("1,2", KeyType::Bigint).is_err());
        let mut binary = Vec::new();
        for word in [1i32, 0, 20, 2, 1] {
            binary.extend_from_slice(&word.to_be_bytes());
        }
        for key in [7i64, -9] {
            binary.extend_from_slice(&8i32.to_be_bytes());
            binary.extend_from_slice(&key.to_be_bytes());
        }
        assert_eq!(
            binary_array_keys(&binary, KeyType::Bigint),
            Ok(vec![KeyValue::Int(7), KeyValue::Int(-9)])
        );
        assert!(binary_array_keys(&binary[..30], KeyType::Bigint).is_err());
    }

    #[test]
    fn binary_params_decode_by_width() {
        assert_eq!(
            decode_binary(&42i64.to_be_bytes(), KeyType::Bigint),
            Ok(KeyValue::Int(42))
        );
        assert_eq!(
            decode_binary(&(-3i32).to_be_bytes(), KeyType::Bigint),
            Ok(KeyValue::Int(-3))
        );
        assert!(decode_binary(&[1, 2, 3], KeyType::Bigint).is_err());
        assert!(decode_binary(&i64::MAX.to_be_bytes(), KeyType::Int).is_err());
        assert!(decode_binary(&[0u8; 15], KeyType::Uuid).is_err());
    }
}
