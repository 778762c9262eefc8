//! Routing hints: the key an application names beside its SQL when the SQL
//! cannot name it — a child table read by its own id, a procedure call, a
//! migration tool's statement. A hint comes from the session
//! (`SET shardline.key = '42'`, `SET shardline.group = 'users'`) or from a
//! comment in the statement (`/* shardline.key: 42 */`,
//! `/* shardline.key=42, shardline.group=users */`), which wins for the
//! fields it names. The key is typed by the key type of the co-location
//! group of the table it routes (or of `shardline.group` when the statement
//! touches no sharded table) and routes like a key in the SQL; a key in the
//! SQL that falls in another partition is an error, never a silent choice.
//! For operators, `shardline.partition` names a partition directly and
//! `shardline.server` a server (maintenance: VACUUM, inspecting a leaf):
//! a sharded table without a key then means that server's partitions, and
//! a key served elsewhere is refused.

use shardmap::{model::group_partition, ClusterMap};

use super::RouteError;

/// A key (and the group it belongs to, for statements that touch no
/// sharded table), as text until a group types it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hint {
    pub key: Option<String>,
    pub group: Option<String>,
    pub partition: Option<u32>,
    pub server: Option<String>,
}

impl Hint {
    pub fn is_empty(&self) -> bool {
        self.key.is_none()
            && self.group.is_none()
            && self.partition.is_none()
            && self.server.is_none()
    }

    /// `self`'s fields where it has them, else `fallback`'s.
    pub fn or(&self, fallback: &Hint) -> Hint {
        Hint {
            key: self.key.clone().or_else(|| fallback.key.clone()),
            group: self.group.clone().or_else(|| fallback.group.clone()),
            partition: self.partition.or(fallback.partition),
            server: self.server.clone().or_else(|| fallback.server.clone()),
        }
    }

    /// The hinted partition of a table of `group`: `shardline.partition`,
    /// or the hinted key's partition in `group` (both: they must agree).
    pub(super) fn partition(
        &self,
        map: &ClusterMap,
        group: &str,
    ) -> Result<Option<u32>, RouteError> {
        let by_key = self.key_partition(map, group)?;
        let Some(partition) = self.checked_partition(map)? else {
            return Ok(by_key);
        };
        if by_key.is_some_and(|k| k != partition) {
            return Err(RouteError::new(
                "22023",
                format!("routing hints disagree: shardline.partition = {partition}, but shardline.key is in another partition"),
                "set only one of them",
            ));
        }
        Ok(Some(partition))
    }

    /// `shardline.partition`, checked against the map.
    fn checked_partition(&self, map: &ClusterMap) -> Result<Option<u32>, RouteError> {
        match self.partition {
            Some(p) if p >= map.partitions => Err(RouteError::new(
                "22023",
                format!(
                    "routing hint shardline.partition = {p}, but the map has partitions 0 to {}",
                    map.partitions.saturating_sub(1)
                ),
                "name a partition that `shardctl partition list` shows",
            )),
            other => Ok(other),
        }
    }

    /// `shardline.server`, checked against the map: a server that serves.
    pub(super) fn server<'h>(&'h self, map: &ClusterMap) -> Result<Option<&'h str>, RouteError> {
        let Some(server) = self.server.as_deref() else {
            return Ok(None);
        };
        match map.servers.get(server) {
            Some(s) if s.state.serves() => Ok(Some(server)),
            Some(s) => Err(RouteError::new(
                "55000",
                format!(
                    "routing hint shardline.server = '{server}': that server is {}",
                    s.state
                ),
                "name a serving server (`shardctl server list`)",
            )),
            None => Err(RouteError::new(
                "42704",
                format!(
                    "routing hint shardline.server = '{server}': no server of that name in the map"
                ),
                "name a server that `shardctl server list` shows",
            )),
        }
    }

    /// The hinted key's partition in `group`, if there is a hinted key.
    fn key_partition(&self, map: &ClusterMap, group: &str) -> Result<Option<u32>, RouteError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let definition = map.groups.get(group).ok_or_else(|| {
            RouteError::new(
                "42704",
                format!("co-location group \"{group}\" of the routing hint does not exist"),
                "name a group that `shardctl group list` shows",
            )
        })?;
        let value = definition.key_type.parse_value(key).map_err(|e| {
            RouteError::new(
                "22P02",
                format!(
                    "routing hint shardline.key = '{key}' is not a key of group \"{group}\": {e}"
                ),
                format!("give a {} key", definition.key_type),
            )
        })?;
        group_partition(definition, map.partitions, &value)
            .map(Some)
            .map_err(|e| {
                RouteError::new(
                    "22023",
                    format!("routing hint shardline.key = '{key}' has no partition in group \"{group}\": {e}"),
                    "check the key value",
                )
            })
    }

    /// The partition of a statement that touches no sharded table, when the
    /// hint names a group and a key.
    pub(super) fn group_partition(&self, map: &ClusterMap) -> Result<Option<u32>, RouteError> {
        if let Some(partition) = self.checked_partition(map)? {
            return Ok(Some(partition));
        }
        match (&self.group, &self.key) {
            (Some(group), Some(_)) => self.partition(map, group),
            // A group without a key routes nothing (yet): the key may be
            // set next.
            _ => Ok(None),
        }
    }
}

/// The error for a key in the SQL that disagrees with the hint.
pub(super) fn conflict(table: &str, hinted: u32, found: &[u32]) -> RouteError {
    RouteError::new(
        "22023",
        format!(
            "the routing hint shardline.key routes to partition {hinted}, but the statement's key of \"{table}\" is in partition{} {}",
            if found.len() == 1 { "" } else { "s" },
            found
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "drop the hint (RESET shardline.key) or make it name the statement's key",
    )
}

/// The error for a partition served by another server than the hinted one.
pub(super) fn elsewhere(partition: u32, owner: &str, server: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!("partition {partition} is served by server {owner}, not by {server} (the routing hint shardline.server)"),
        "RESET shardline.server to route by the key, or name the partition's server",
    )
}

/// The hint in a statement's comments, if any: `/* shardline.key: 42 */`,
/// `/* shardline.key=42, shardline.group=users */` (values may be quoted).
/// Comments inside string literals and quoted identifiers are not hints.
pub fn comment_hint(sql: &str) -> Result<Option<Hint>, RouteError> {
    if !sql.contains("shardline.") {
        return Ok(None);
    }
    let mut hint = Hint::default();
    let bytes = sql.as_bytes();
    let mut at = 0;
    let mut found = false;
    while at < bytes.len() {
        match bytes[at] {
            quote @ (b'\'' | b'"') => {
                // Skip to the closing quote (a doubled quote stays inside).
                at += 1;
                while at < bytes.len() {
                    if bytes[at] == quote {
                        if bytes.get(at + 1) == Some(&quote) {
                            at += 2;
                            continue;
                        }
                        break;
                    }
                    at += 1;
                }
                at += 1;
            }
            b'-' if bytes.get(at + 1) == Some(&b'-') => {
                while at < bytes.len() && bytes[at] != b'\n' {
                    at += 1;
                }
            }
            b'/' if bytes.get(at + 1) == Some(&b'*') => {
                let start = at + 2;
                let end = sql[start..].find("*/").map_or(sql.len(), |e| start + e);
                found |= read_comment(&sql[start..end], &mut hint)?;
                at = end + 2;
            }
            _ => at += 1,
        }
    }
    Ok(found.then_some(hint))
}

/// Reads `shardline.NAME = VALUE` items (`:` or `=`, separated by commas)
/// of one comment into `hint`; true if the comment had any.
fn read_comment(comment: &str, hint: &mut Hint) -> Result<bool, RouteError> {
    if !comment.trim_start().starts_with("shardline.") {
        return Ok(false);
    }
    for item in comment.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((name, value)) = item.split_once([':', '=']) else {
            return Err(bad_comment(item));
        };
        let value = value
            .trim()
            .trim_matches('\'')
            .trim_matches('"')
            .to_string();
        if value.is_empty() {
            return Err(bad_comment(item));
        }
        match name.trim() {
            "shardline.key" => hint.key = Some(value),
            "shardline.group" => hint.group = Some(value),
            _ => return Err(bad_comment(item)),
        }
    }
    Ok(true)
}

fn bad_comment(item: &str) -> RouteError {
    RouteError::new(
        "22023",
        format!("cannot read the routing hint \"{item}\" in this statement's comment"),
        "write /* shardline.key: 42 */ or /* shardline.key=42, shardline.group=users */",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(key: Option<&str>, group: Option<&str>) -> Option<Hint> {
        Some(Hint {
            key: key.map(Into::into),
            group: group.map(Into::into),
            ..Hint::default()
        })
    }

    #[test]
    fn comment_hints_are_read_where_they_are_comments() {
        assert_eq!(comment_hint("SELECT 1"), Ok(None));
        assert_eq!(
            comment_hint("/* shardline.key: 42 */ SELECT * FROM t"),
            Ok(hint(Some("42"), None))
        );
        assert_eq!(
            comment_hint("SELECT * FROM t /* shardline.key=42, shardline.group=users */"),
            Ok(hint(Some("42"), Some("users")))
        );
        assert_eq!(
            comment_hint("CALL f() /* shardline.key = 'a-b' */"),
            Ok(hint(Some("a-b"), None))
        );
        // In a string or an identifier it is data, not a hint.
        assert_eq!(
            comment_hint("SELECT '/* shardline.key: 1 */', \"/* shardline.key: 2 */\""),
            Ok(None)
        );
        // Other comments are left alone.
        assert_eq!(comment_hint("SELECT 1 /* about shardline.key */"), Ok(None));
        assert_eq!(comment_hint("SELECT 1 -- /* shardline.key: 3 */"), Ok(None));
        assert!(comment_hint("/* shardline.colour: 3 */ SELECT 1").is_err());
        assert!(comment_hint("/* shardline.key */ SELECT 1").is_err());
        assert!(comment_hint("/* shardline.key: */ SELECT 1").is_err());
    }

    #[test]
    fn session_hint_fills_in_what_a_comment_leaves_out() {
        let session = Hint {
            key: Some("1".into()),
            group: Some("users".into()),
            ..Hint::default()
        };
        let comment = Hint {
            key: Some("2".into()),
            ..Hint::default()
        };
        assert_eq!(
            comment.or(&session),
            Hint {
                key: Some("2".into()),
                group: Some("users".into()),
                ..Hint::default()
            }
        );
    }
}
