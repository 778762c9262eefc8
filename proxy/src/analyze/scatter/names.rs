//! The names Postgres gives result columns (its `FigureColname`): a bare
//! name in ORDER BY matches them before input columns, and a combining
//! query must label its columns with them so the client sees the names one
//! server would have sent (`count`, `sum`, `?column?`, ...).

use sqlparser::ast::{ArrayElemTypeDef, DataType, Expr, ObjectNamePart, SelectItem, SetExpr};

use super::exprs::{function_name, ident_name};

/// Name of an expression that Postgres could not name.
const UNNAMED: &str = "?column?";

/// The output name of a select item; `None` for `*` and `t.*`.
pub(super) fn output_name(item: &SelectItem) -> Option<String> {
    match item {
        SelectItem::ExprWithAlias { alias, .. } => Some(ident_name(alias)),
        SelectItem::UnnamedExpr(expr) => Some(expr_name(expr)),
        _ => None,
    }
}

pub(super) fn expr_name(expr: &Expr) -> String {
    figure(expr).map_or_else(|| UNNAMED.to_string(), |(name, _)| name)
}

/// A name and how strongly it names the expression (Postgres: 2 for a real
/// name, 1 for a fallback such as a cast's type or `case`).
fn figure(expr: &Expr) -> Option<(String, u8)> {
    Some(match expr {
        Expr::Identifier(ident) => (ident_name(ident), 2),
        Expr::CompoundIdentifier(parts) => (ident_name(parts.last()?), 2),
        Expr::Function(function) => (function_name(function), 2),
        Expr::Nested(inner) | Expr::Collate { expr: inner, .. } => return figure(inner),
        Expr::Cast {
            expr, data_type, ..
        } => match figure(expr) {
            Some((name, 2)) => (name, 2),
            _ => (type_name(data_type)?, 1),
        },
        Expr::TypedString(typed) => (type_name(&typed.data_type)?, 1),
        Expr::Case { else_result, .. } => match else_result.as_deref().and_then(figure) {
            Some((name, 2)) => (name, 2),
            _ => ("case".into(), 1),
        },
        Expr::Exists { .. } => ("exists".into(), 2),
        Expr::Array(_) => ("array".into(), 2),
        Expr::Tuple(_) => ("row".into(), 2),
        Expr::Extract { .. } => ("extract".into(), 2),
        Expr::Substring { .. } => ("substring".into(), 2),
        Expr::Position { .. } => ("position".into(), 2),
        Expr::Overlay { .. } => ("overlay".into(), 2),
        Expr::Ceil { .. } => ("ceil".into(), 2),
        Expr::Floor { .. } => ("floor".into(), 2),
        Expr::Trim { .. } => ("btrim".into(), 2),
        Expr::Subquery(query) => match query.body.as_ref() {
            SetExpr::Select(select) => match select.projection.first()? {
                SelectItem::ExprWithAlias { alias, .. } => (ident_name(alias), 2),
                SelectItem::UnnamedExpr(inner) => figure(inner)?,
                _ => return None,
            },
            _ => return None,
        },
        _ => return None,
    })
}

/// The last part of a type's name as Postgres stores it (`integer` → `int4`).
fn type_name(data_type: &DataType) -> Option<String> {
    Some(
        match data_type {
            DataType::SmallInt(_) | DataType::Int2(_) => "int2",
            DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) => "int4",
            DataType::BigInt(_) | DataType::Int8(_) => "int8",
            DataType::Real | DataType::Float4 => "float4",
            DataType::DoublePrecision | DataType::Float8 | DataType::Double(_) => "float8",
            DataType::Float(_) => "float8",
            DataType::Numeric(_) | DataType::Decimal(_) | DataType::Dec(_) => "numeric",
            DataType::Bool | DataType::Boolean => "bool",
            DataType::Text => "text",
            DataType::Varchar(_)
            | DataType::CharacterVarying(_)
            | DataType::CharVarying(_) => "varchar",
            DataType::Char(_) | DataType::Character(_) => "bpchar",
            DataType::Date => "date",
            DataType::Uuid => "uuid",
            DataType::Bytea => "bytea",
            DataType::JSON => "json",
            DataType::JSONB => "jsonb",
            DataType::Regclass => "regclass",
            DataType::Interval { .. } => "interval",
            DataType::Timestamp(_, tz) => {
                if tz.to_string().contains("WITH TIME ZONE") || tz.to_string().contains("TZ") {
                    "timestamptz"
                } else {
                    "timestamp"
                }
            }
            DataType::Time(_, tz) => {
                if tz.to_string().contains("WITH TIME ZONE") || tz.to_string().contains("TZ") {
                    "timetz"
                } else {
                    "time"
                }
            }
            DataType::Array(
                ArrayElemTypeDef::SquareBracket(inner, _)
                | ArrayElemTypeDef::AngleBracket(inner)
                | ArrayElemTypeDef::Parenthesis(inner),
            ) => return type_name(inner),
            DataType::Custom(name, _) => {
                return match name.0.last()? {
                    ObjectNamePart::Identifier(ident) => Some(ident_name(ident)),
                    ObjectNamePart::Function(f) => Some(ident_name(&f.name)),
                };
            }
            other => {
                let text = other.to_string().to_lowercase();
                let end = text.find(['(', ' ', '[']).unwrap_or(text.len());
                return Some(text[..end].to_string());
            }
        }
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn name(text: &str) -> String {
        let expr = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(text)
            .and_then(|mut p| p.parse_expr())
            .expect("test expression parses");
        expr_name(&expr)
    }

    #[test]
    fn names_match_what_postgres_calls_the_columns() {
        assert_eq!(name("count(*)"), "count");
        assert_eq!(name("Photos.User_Id"), "user_id");
        assert_eq!(name("\"Mixed\""), "Mixed");
        assert_eq!(name("pg_catalog.SUM(x)"), "sum");
        assert_eq!(name("a + 1"), "?column?");
        assert_eq!(name("x::int"), "x");
        assert_eq!(name("(a + b)::integer"), "int4");
        assert_eq!(name("'a'::text"), "text");
        assert_eq!(name("CAST(1 AS bigint)"), "int8");
        assert_eq!(name("CASE WHEN a THEN 1 ELSE b END"), "b");
        assert_eq!(name("CASE WHEN a THEN 1 END"), "case");
        assert_eq!(name("(count(*))"), "count");
        assert_eq!(name("EXISTS (SELECT 1)"), "exists");
        assert_eq!(name("DATE '2024-01-01'"), "date");
        assert_eq!(name("ts::timestamp with time zone"), "ts");
        assert_eq!(name("1::timestamp with time zone"), "timestamptz");
    }
}
