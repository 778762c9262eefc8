//! Session settings: what the client SET (kept only if its transaction
//! commits), bringing a pooled backend's settings in line before use, and
//! the proxy's own `shardline.*` settings.

use std::collections::BTreeMap;

use tracing::debug;

use crate::analyze::lexer::LITERAL_MARKER_BASE;
use crate::analyze::{Command, Literal};
use crate::backend::Backend;
use crate::route::hint::{comment_hint, Hint};
use crate::route::RouteError;
use crate::wire::messages;

use super::client::SessionError;
use super::tx::Tx;
use super::Session;

pub(super) const SETTING_NOT_REPLAYED: &[&str] = &["application_name"];

/// Marker in a backend's settings: its state is unknown, reset it first.
const RESET_ALL: &str = "\u{0}reset all";

/// A setting of the proxy itself (`SET shardline.<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ProxySetting {
    ReadReplica(bool),
    /// `shardline.scatter`: reads across servers allowed (`None`: the proxy's default).
    Scatter(Option<bool>),
    /// `shardline.cross_server`: `2pc` (true) lets a transaction write on
    /// several servers, `refuse` keeps it on one (`None`: the proxy's default).
    CrossServer(Option<bool>),
    /// `shardline.key`: the routing hint's key, as text (`None`: no hint).
    Key(Option<String>),
    /// `shardline.group`: the routing hint's co-location group.
    Group(Option<String>),
    /// `shardline.partition`: route to this partition's server.
    Partition(Option<u32>),
    /// `shardline.server`: route to this server (maintenance sessions).
    Server(Option<String>),
}

pub(super) fn parse_proxy_setting(setting: &str, value: &str) -> Result<ProxySetting, RouteError> {
    // A quoted value comes back as an escape-string literal (E'...').
    let value = value.trim();
    let value = value
        .strip_prefix(['E', 'e'])
        .filter(|v| v.starts_with('\''))
        .unwrap_or(value);
    // Keys keep their case (text keys); the other settings do not.
    let raw = value.trim_matches('\'').to_string();
    let value = raw.to_ascii_lowercase();
    let hint_value = || (value != "default" && !raw.is_empty()).then(|| raw.clone());
    let boolean = || match value.as_str() {
        "on" | "true" | "1" | "yes" => Ok(Some(true)),
        "off" | "false" | "0" | "no" => Ok(Some(false)),
        "default" => Ok(None),
        _ => Err(RouteError::new(
            "22023",
            format!("parameter \"shardline.{setting}\" requires a Boolean value, not \"{value}\""),
            "use on or off",
        )),
    };
    match setting {
        "read_replica" => Ok(ProxySetting::ReadReplica(boolean()?.unwrap_or(false))),
        "scatter" => Ok(ProxySetting::Scatter(boolean()?)),
        "cross_server" => match value.as_str() {
            "2pc" => Ok(ProxySetting::CrossServer(Some(true))),
            "refuse" => Ok(ProxySetting::CrossServer(Some(false))),
            "default" => Ok(ProxySetting::CrossServer(None)),
            _ => Err(RouteError::new(
                "22023",
                format!("invalid value for parameter \"shardline.cross_server\": \"{value}\""),
                "use '2pc' (transactions may write on several servers, committed with two-phase commit) or 'refuse'",
            )),
        },
        "key" => Ok(ProxySetting::Key(hint_value())),
        "group" => Ok(ProxySetting::Group(hint_value())),
        "server" => Ok(ProxySetting::Server(hint_value())),
        "partition" => match hint_value() {
            None => Ok(ProxySetting::Partition(None)),
            Some(text) => text.trim().parse().map(|p| ProxySetting::Partition(Some(p))).map_err(|_| {
                RouteError::new(
                    "22023",
                    format!("invalid value for parameter \"shardline.partition\": \"{text}\""),
                    "give a partition number (`shardctl partition list`), or default",
                )
            }),
        },
        _ => Err(RouteError::new(
            "42704",
            format!("unrecognized configuration parameter \"shardline.{setting}\""),
            "shardline's own settings: shardline.read_replica, shardline.scatter, shardline.cross_server, shardline.key, shardline.group, shardline.partition, shardline.server",
        )),
    }
}

/// Whether running `command` on a backend changes its session state.
pub(super) fn changes_session(command: &Command) -> bool {
    matches!(
        command,
        Command::Set { .. } | Command::Reset { .. } | Command::Discard | Command::Deallocate { .. }
    )
}

/// Replaces literal markers in shape text by the literals, quoted as SQL.
pub(super) fn render(shape: &str, literals: &[Literal]) -> String {
    if !shape.contains('$') {
        return shape.to_string();
    }
    let mut out = String::with_capacity(shape.len());
    let mut rest = shape;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let number: Option<usize> = after[..digits].parse().ok();
        match number
            .filter(|n| *n >= LITERAL_MARKER_BASE)
            .and_then(|n| literals.get(n - LITERAL_MARKER_BASE))
        {
            Some(Literal::Number(n)) => out.push_str(n),
            Some(Literal::String(s)) => out.push_str(&quote_literal(s)),
            None => {
                out.push('$');
                out.push_str(&after[..digits]);
            }
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// SQL bringing a backend's settings to the client's, if they differ.
pub(super) fn settings_sync_sql(
    client: &BTreeMap<String, String>,
    backend: &BTreeMap<String, String>,
) -> Option<String> {
    let mut statements = Vec::new();
    // A backend whose state is unknown starts from the server defaults.
    let reset_all = backend.contains_key(RESET_ALL);
    if reset_all {
        statements.push("RESET ALL".to_string());
    }
    for (name, value) in client {
        if SETTING_NOT_REPLAYED.contains(&name.as_str()) {
            continue;
        }
        if reset_all || backend.get(name) != Some(value) {
            statements.push(format!("SET {} TO {}", quote_ident(name), value));
        }
    }
    if !reset_all {
        for name in backend.keys() {
            if !client.contains_key(name) {
                statements.push(format!("RESET {}", quote_ident(name)));
            }
        }
    }
    if statements.is_empty() {
        None
    } else {
        debug!(count = statements.len(), "replaying session settings");
        Some(statements.join("; "))
    }
}

/// SQL bringing `backend`'s settings to the client's, if they differ. A
/// connection whose settings are unknown (see `Backend::settings_unknown`)
/// starts from the server defaults: RESET ALL, then the client's settings.
/// The caller records `replayed_settings` once the SQL is applied, or sent
/// ahead of the request it precedes.
pub(super) fn backend_settings_sql(
    client: &BTreeMap<String, String>,
    backend: &mut Backend,
) -> Option<String> {
    if backend.settings_unknown() {
        backend.record_settings(BTreeMap::from([(RESET_ALL.to_string(), String::new())]));
    }
    settings_sync_sql(client, backend.settings())
}

/// The settings a backend carries after a replay.
pub(super) fn replayed_settings(client: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    client
        .iter()
        .filter(|(k, _)| !SETTING_NOT_REPLAYED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A string as an escape-string literal: means the same whatever the
/// session's standard_conforming_strings.
pub fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

pub(super) fn quote_ident(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

impl Session {
    pub(super) fn record_setting(&mut self, name: String, value: Option<String>) {
        if matches!(self.tx, Tx::Bound | Tx::Deferred { .. }) {
            self.tx_settings.push((name, value));
            return;
        }
        match value {
            Some(value) => {
                self.settings.insert(name, value);
            }
            None => {
                self.settings.remove(&name);
            }
        }
    }

    pub(super) fn apply_tx_settings(&mut self, committed: bool) {
        let changes = std::mem::take(&mut self.tx_settings);
        if committed {
            for (name, value) in changes {
                match value {
                    Some(value) => {
                        self.settings.insert(name, value);
                    }
                    None => {
                        self.settings.remove(&name);
                    }
                }
            }
        }
    }

    /// `SET shardline.<setting>`: settings of the proxy itself.
    pub(super) async fn proxy_setting(
        &mut self,
        setting: &str,
        value: &str,
    ) -> Result<(), SessionError> {
        match parse_proxy_setting(setting, value) {
            Ok(setting) => {
                self.apply_proxy_setting(setting);
                messages::command_complete("SET", &mut self.client.out);
            }
            Err(e) => self.route_error(&e),
        }
        self.ready().await
    }

    pub(super) fn apply_proxy_setting(&mut self, setting: ProxySetting) {
        match setting {
            ProxySetting::ReadReplica(on) => self.read_replica = on,
            ProxySetting::Scatter(on) => self.scatter = on,
            ProxySetting::CrossServer(on) => self.cross_server = on,
            ProxySetting::Key(key) => self.session_hint().key = key,
            ProxySetting::Group(group) => self.session_hint().group = group,
            ProxySetting::Partition(partition) => self.session_hint().partition = partition,
            ProxySetting::Server(server) => self.session_hint().server = server,
        }
    }

    /// The session's routing hint, made on first use (most sessions never
    /// set one, and an idle session should stay small).
    fn session_hint(&mut self) -> &mut Hint {
        self.hint.get_or_insert_with(Box::default)
    }

    /// `SET LOCAL shardline.key | shardline.group`: for the rest of the
    /// transaction (false for another setting, which is not local here).
    pub(super) fn apply_local_hint(&mut self, setting: ProxySetting) -> bool {
        let hint = self.tx_hint.get_or_insert_with(Box::default);
        match setting {
            ProxySetting::Key(key) => hint.key = key,
            ProxySetting::Group(group) => hint.group = group,
            ProxySetting::Partition(partition) => hint.partition = partition,
            ProxySetting::Server(server) => hint.server = server,
            _ => return false,
        }
        true
    }

    /// The routing hint of a statement: its comment's, filled in by the
    /// transaction's (`SET LOCAL`) and then the session's.
    pub(super) fn hint_for(&self, sql: &str) -> Result<Hint, RouteError> {
        let session = self.hint.as_deref().cloned().unwrap_or_default();
        let inherited = match (&self.tx_hint, &self.tx) {
            (Some(local), tx) if *tx != Tx::Idle => local.or(&session),
            _ => session,
        };
        Ok(match comment_hint(sql)? {
            Some(comment) => comment.or(&inherited),
            None => inherited,
        })
    }

    /// Whether reads across servers are allowed in this session now.
    pub(super) fn scatter_allowed(&self) -> bool {
        self.scatter.unwrap_or(self.shared.config.scatter.enabled)
    }

    pub(super) async fn show_proxy_setting(&mut self, name: &str) -> Result<(), SessionError> {
        let value = match name {
            "shardline.version" => Some(env!("CARGO_PKG_VERSION").to_string()),
            "shardline.read_replica" => {
                Some(if self.read_replica { "on" } else { "off" }.to_string())
            }
            "shardline.scatter" => {
                Some(if self.scatter_allowed() { "on" } else { "off" }.to_string())
            }
            "shardline.cross_server" => Some(
                if self.cross_server_allowed() {
                    "2pc"
                } else {
                    "refuse"
                }
                .to_string(),
            ),
            "shardline.key" | "shardline.group" | "shardline.partition" | "shardline.server" => {
                let hint = self.hint_for("").unwrap_or_default();
                let value = match name {
                    "shardline.key" => hint.key,
                    "shardline.group" => hint.group,
                    "shardline.partition" => hint.partition.map(|p| p.to_string()),
                    _ => hint.server,
                };
                Some(value.unwrap_or_default())
            }
            "shardline.map_version" => self
                .shared
                .map
                .borrow()
                .as_ref()
                .map(|v| v.map.version.to_string()),
            _ => None,
        };
        match value {
            Some(value) => {
                messages::row_description(&[name], &mut self.client.out);
                messages::data_row(&[Some(&value)], &mut self.client.out);
                messages::command_complete("SHOW", &mut self.client.out);
            }
            None => self.client.error(
                "42704",
                &format!("unrecognized configuration parameter \"{name}\""),
                None,
            ),
        }
        self.ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn render_puts_literals_back() {
        let literals = vec![Literal::String("it's".into()), Literal::Number("5".into())];
        assert_eq!(
            render("SET a TO $100001, $100002, $1", &literals),
            "SET a TO E'it''s', 5, $1"
        );
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }

    #[test]
    fn settings_sync_only_differences() {
        let mut client = BTreeMap::new();
        client.insert("search_path".to_string(), "app".to_string());
        client.insert("application_name".to_string(), "'x'".to_string());
        let mut backend = BTreeMap::new();
        backend.insert("timezone".to_string(), "'UTC'".to_string());
        assert_eq!(
            settings_sync_sql(&client, &backend).as_deref(),
            Some("SET search_path TO app; RESET timezone")
        );
        backend.clear();
        backend.insert("search_path".to_string(), "app".to_string());
        assert_eq!(settings_sync_sql(&client, &backend), None);
    }
}
