//! Combining partial results on a server: the rows each server computed
//! (per-server aggregates, groups, distinct rows) become typed parameters of
//! the planner's final query, which one server runs — so the result's types,
//! formats, rounding, HAVING and ORDER BY are Postgres's own.

use bytes::{Bytes, BytesMut};

use crate::analyze::scatter::{Merge, ScatterPlan, COLLATED_TOKEN, ROWS_TOKEN};
use crate::wire::messages;
use crate::wire::rows::{self, format_of, Field};

use super::gather::{Stop, Window};
use super::scatter::{Backends, ScatterStatement};
use super::Session;

/// The first OID of objects users create: types below it are the same on
/// every server.
const FIRST_USER_OID: u32 = 16384;
/// Most parameters one statement may have (the protocol's 16-bit count).
const MAX_PARAMETERS: usize = 65_535;

/// Partial rows gathered for a combine.
pub(super) struct Partials {
    pub(super) fields: Vec<Field>,
    /// The parameter types the servers inferred for the client's statement.
    pub(super) param_types: Vec<u32>,
    pub(super) rows: Vec<Bytes>,
    /// Per partial column, the collation the servers gave it.
    pub(super) collations: Vec<Option<String>>,
}

impl Session {
    /// Runs the final query over the partial rows on one of the backends.
    pub(super) async fn combine(
        &mut self,
        backends: &mut Backends,
        plan: &ScatterPlan,
        statement: &ScatterStatement,
        partials: Partials,
        window: Window,
    ) -> Result<(), Stop> {
        let Merge::Combine { final_sql, .. } = &plan.merge else {
            return Ok(());
        };
        let client_params = statement.params.len();
        let columns = partials.fields.len();
        if let Some(field) = partials
            .fields
            .iter()
            .find(|f| f.type_oid >= FIRST_USER_OID)
        {
            let name = String::from_utf8_lossy(&field.name).into_owned();
            return self.refuse_merge(format!(
                "column \"{name}\" has a user-defined type, whose identity differs between servers"
            ));
        }
        let rows = partials.rows.len().max(1);
        if client_params + rows * columns > MAX_PARAMETERS {
            self.client.error(
                "54000",
                &format!("this read across servers gathers {} partial rows of {columns} columns, too many to combine in one statement", partials.rows.len()),
                Some("narrow the query, or group by the sharding key so groups stay on their servers"),
            );
            return Err(Stop::Failed);
        }
        let sql = match final_statement(final_sql, &partials, client_params, &window) {
            Ok(sql) => sql,
            Err(problem) => return self.refuse_merge(problem),
        };
        let mut types: Vec<u32> = (0..client_params)
            .map(|i| {
                statement
                    .param_types
                    .get(i)
                    .copied()
                    .filter(|t| *t != 0)
                    .or_else(|| partials.param_types.get(i).copied())
                    .unwrap_or(0)
            })
            .collect();
        let mut formats: Vec<i16> = (0..client_params)
            .map(|i| format_of(&statement.param_formats, i))
            .collect();
        let mut params = statement.params.clone();
        for _ in 0..rows {
            types.extend(partials.fields.iter().map(|f| f.type_oid));
        }
        formats.resize(client_params + rows * columns, 0);
        if partials.rows.is_empty() {
            params.resize(client_params + columns, None);
        }
        for row in &partials.rows {
            match rows::data_row_values(row) {
                Ok(mut values) if values.len() == 2 * columns => {
                    values.truncate(columns);
                    params.extend(values)
                }
                _ => return self.refuse_merge("a server sent a malformed partial row".into()),
            }
        }
        let index = backends
            .tx_index
            .or_else(|| backends.leases.iter().position(Option::is_some));
        let Some(lease) = index
            .and_then(|i| backends.leases.get_mut(i))
            .and_then(Option::as_mut)
        else {
            self.client.error(
                "08006",
                "no server connection is left to combine the partial results",
                Some("retry the statement"),
            );
            return Err(Stop::Failed);
        };
        let mut out = BytesMut::new();
        messages::parse("", &sql, &types, &mut out);
        rows::bind(&formats, &params, &statement.result_formats, &mut out);
        if statement.describe {
            rows::describe(b'P', &mut out);
        }
        let fetch = statement
            .fetch
            .map_or(0, |n| i32::try_from(n).unwrap_or(i32::MAX));
        rows::execute(fetch, &mut out);
        rows::sync(&mut out);
        let backend = lease.backend();
        backend.pending_sync = true;
        if let Err(e) = backend.write_all(&out).await {
            backend.broken = true;
            self.client.error(
                "08006",
                &format!("connection lost while combining partial results: {e}"),
                Some("retry the statement"),
            );
            return Err(Stop::Failed);
        }
        loop {
            let backend = lease.backend();
            let frame = match backend.read_frame().await {
                Ok(frame) => frame,
                Err(e) => {
                    backend.broken = true;
                    self.client.error(
                        "08006",
                        &format!("connection lost while combining partial results: {e}"),
                        Some("retry the statement"),
                    );
                    return Err(Stop::Failed);
                }
            };
            match frame.tag {
                b'T' | b'D' | b'C' | b'E' | b'N' | b's' => {
                    self.client.out.extend_from_slice(&frame.raw);
                    self.maybe_flush().await?;
                }
                b'Z' => {
                    let backend = lease.backend();
                    backend.status = frame.raw.get(5).copied().unwrap_or(b'I');
                    backend.pending_sync = false;
                    return Ok(());
                }
                _ => {}
            }
        }
    }
}

/// The final query of a combine: rows as typed parameters after the
/// client's own, the planner's type tokens resolved, LIMIT/OFFSET appended.
fn final_statement(
    template: &str,
    partials: &Partials,
    client_params: usize,
    window: &Window,
) -> Result<String, String> {
    let columns = partials.fields.len();
    let mut values = String::new();
    let mut next = client_params + 1;
    let rows = partials.rows.len().max(1);
    for row in 0..rows {
        if row > 0 {
            values.push_str(", ");
        }
        values.push('(');
        for column in 0..columns {
            if column > 0 {
                values.push_str(", ");
            }
            values.push('$');
            values.push_str(&next.to_string());
            next += 1;
        }
        values.push(')');
    }
    if partials.rows.is_empty() {
        // No partial rows: one row of NULLs, skipped.
        values.push_str(" OFFSET 1");
    }
    let mut sql = template.replace(ROWS_TOKEN, &values);
    let mut collated = Vec::with_capacity(columns);
    for column in 0..columns {
        let name = format!("c{}", column + 1);
        match partials.collations.get(column).cloned().flatten() {
            Some(collation) if collation != "\"default\"" => {
                if !is_collation_name(&collation) {
                    return Err(format!("a server reported the collation {collation:?}, which is not a collation name"));
                }
                collated.push(format!("{name} COLLATE {collation} AS {name}"));
            }
            _ => collated.push(name),
        }
    }
    sql = sql.replace(COLLATED_TOKEN, &collated.join(", "));
    for (i, field) in partials.fields.iter().enumerate().rev() {
        let column = format!("c{}", i + 1);
        let token = format!("__SL_TYPE_{column}__");
        if sql.contains(&token) {
            let name = builtin_type_name(field.type_oid).ok_or_else(|| {
                format!(
                    "a partial sum has a type (oid {}) the proxy does not know",
                    field.type_oid
                )
            })?;
            sql = sql.replace(&token, name);
        }
    }
    while let Some(start) = sql.find("__SL_AVG_") {
        let Some(len) = sql[start + 9..].find("__") else {
            return Err("malformed average in the combining query".into());
        };
        let inner = &sql[start + 9..start + 9 + len];
        let Some((sum, count)) = inner.split_once('_') else {
            return Err("malformed average in the combining query".into());
        };
        let sum_type = sum
            .strip_prefix('c')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| partials.fields.get(n.wrapping_sub(1)))
            .map(|f| f.type_oid)
            .ok_or_else(|| "malformed average in the combining query".to_string())?;
        let expression = match sum_type {
            700 | 701 => format!("(sum({sum})::float8 / NULLIF(sum({count}), 0)::float8)"),
            1186 => format!("(sum({sum}) / NULLIF(sum({count}), 0)::float8)"),
            20 | 21 | 23 | 1700 => {
                format!("(sum({sum})::numeric / NULLIF(sum({count}), 0)::numeric)")
            }
            other => {
                return Err(format!(
                    "an average over a type (oid {other}) the proxy does not know"
                ))
            }
        };
        sql.replace_range(start..start + 9 + len + 2, &expression);
    }
    if let Some(limit) = window.left {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    if window.skip > 0 {
        sql.push_str(&format!(" OFFSET {}", window.skip));
    }
    Ok(sql)
}

/// Whether `name` is a collation name as `pg_collation_for` prints it: a
/// plain or double-quoted identifier, optionally schema-qualified (so it can
/// go into the final query as it is).
fn is_collation_name(name: &str) -> bool {
    fn identifier(part: &str) -> bool {
        if let Some(inner) = part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            !inner.is_empty() && !inner.replace("\"\"", "").contains('"')
        } else {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        }
    }
    // A dot inside quotes belongs to the name.
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in name.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                parts.push(&name[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&name[start..]);
    !quoted && parts.len() <= 2 && parts.iter().all(|p| identifier(p))
}

/// Names of the built-in types a combining query may cast to.
fn builtin_type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        700 => "float4",
        701 => "float8",
        790 => "money",
        1082 => "date",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1700 => "numeric",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::is_collation_name;

    #[test]
    fn only_collation_names_go_into_the_final_query() {
        for name in [
            "\"C\"",
            "\"en-x-icu\"",
            "pg_catalog.\"C\"",
            "\"a.b\"",
            "public.my_coll",
        ] {
            assert!(is_collation_name(name), "{name}");
        }
        for name in [
            "\"C\"; DROP TABLE t",
            "x\"",
            "\"\"",
            "a.b.c",
            "\"C\" COLLATE \"POSIX\"",
            "",
        ] {
            assert!(!is_collation_name(name), "{name}");
        }
    }
}
