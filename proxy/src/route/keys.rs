//! The values of sharding keys in a statement: literals, constants and
//! Bind parameters (text or binary), and arrays of keys (`key = ANY(...)`),
//! decoded for the key column's type. Bad values are errors with the
//! SQLSTATE Postgres would give, never panics.

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
    let text = text.trim();
    let text = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let body = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| invalid_key(format!("{text:?} is not an array")))?;
    let mut keys = Vec::new();
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
        let element = if quoted { element.as_str() } else { element.trim() };
        if !quoted && element.eq_ignore_ascii_case("null") {
            continue;
        }
        keys.push(key_type.parse_value(element).map_err(invalid_key)?);
    }
    Ok(keys)
}

/// The elements of an array in Postgres's binary form (one dimension);
/// NULL elements are left out.
fn binary_array_keys(bytes: &[u8], key_type: KeyType) -> Result<Vec<KeyValue>, RouteError> {
    let malformed = || invalid_key("malformed binary array");
    let word = |at: usize| -> Result<i32, RouteError> {
        bytes
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(malformed)
    };
    let dimensions = word(0)?;
    match dimensions {
        0 => return Ok(Vec::new()),
        1 => {}
        _ => return Err(invalid_key("a multidimensional array of keys")),
    }
    let count = usize::try_from(word(12)?).map_err(|_| malformed())?;
    let mut at = 20;
    let mut keys = Vec::with_capacity(count.min(bytes.len() / 4));
    for _ in 0..count {
        let len = word(at)?;
        at += 4;
        if len < 0 {
            continue;
        }
        let end = at.checked_add(len as usize).ok_or_else(malformed)?;
        let element = bytes.get(at..end).ok_or_else(malformed)?;
        keys.push(decode_binary(element, key_type)?);
        at = end;
    }
    Ok(keys)
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

fn decode_binary(bytes: &[u8], key_type: KeyType) -> Result<KeyValue, RouteError> {
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
