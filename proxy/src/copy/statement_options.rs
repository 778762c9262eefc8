//! COPY options as Postgres 15's `ProcessCopyOptions` takes them (for COPY
//! FROM): duplicates, values and combinations it rejects get its own
//! SQLSTATE and words; then the options the proxy cannot split exactly are
//! refused with 0A000 and what to do instead.

use super::statement::{Arg, Opt};
use super::{ColumnSet, CopyFormat, CopyOptions, CopyRefusal};

#[derive(Default)]
struct Given {
    format: Option<CopyFormat>,
    freeze: Option<bool>,
    delimiter: Option<String>,
    null: Option<String>,
    header: Option<Header>,
    quote: Option<String>,
    escape: Option<String>,
    force_quote: bool,
    force_not_null: Option<ColumnSet>,
    force_null: Option<ColumnSet>,
    encoding: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Header {
    No,
    Yes,
    Match,
}

fn postgres(code: &'static str, message: impl Into<String>) -> CopyRefusal {
    CopyRefusal {
        code,
        message: message.into(),
        hint: None,
    }
}

fn unsupported(message: &str, hint: &str) -> CopyRefusal {
    CopyRefusal {
        code: "0A000",
        message: message.to_string(),
        hint: Some(hint.to_string()),
    }
}

fn redundant() -> CopyRefusal {
    postgres("42601", "conflicting or redundant options")
}

/// Postgres's `defGetString`.
fn string(opt: &Opt) -> Result<String, CopyRefusal> {
    match &opt.arg {
        Arg::None => Err(postgres(
            "42601",
            format!("{} requires a parameter", opt.name),
        )),
        Arg::Word(s) | Arg::Str(s) | Arg::Num(s) => Ok(s.clone()),
        Arg::Star => Ok("*".to_string()),
        Arg::List(items) => Ok(items.join(".")),
    }
}

/// Postgres's `defGetBoolean`.
fn boolean(opt: &Opt) -> Result<bool, CopyRefusal> {
    let value = match &opt.arg {
        Arg::None => return Ok(true),
        Arg::Num(n) => match n.as_str() {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        },
        _ => match string(opt)?.to_ascii_lowercase().as_str() {
            "true" | "on" => Some(true),
            "false" | "off" => Some(false),
            _ => None,
        },
    };
    value.ok_or_else(|| postgres("42601", format!("{} requires a Boolean value", opt.name)))
}

/// Postgres 15's `defGetCopyHeaderChoice` (COPY FROM).
fn header(opt: &Opt) -> Result<Header, CopyRefusal> {
    let value = match &opt.arg {
        Arg::None => Some(Header::Yes),
        Arg::Num(n) => match n.as_str() {
            "0" => Some(Header::No),
            "1" => Some(Header::Yes),
            _ => None,
        },
        _ => match string(opt)?.to_ascii_lowercase().as_str() {
            "true" | "on" => Some(Header::Yes),
            "false" | "off" => Some(Header::No),
            "match" => Some(Header::Match),
            _ => None,
        },
    };
    value.ok_or_else(|| {
        postgres(
            "42601",
            format!("{} requires a Boolean value or \"match\"", opt.name),
        )
    })
}

fn columns(opt: &Opt) -> Result<ColumnSet, CopyRefusal> {
    match &opt.arg {
        Arg::List(names) => Ok(ColumnSet::Columns(names.clone())),
        _ => Err(postgres(
            "22023",
            format!(
                "argument to option \"{}\" must be a list of column names",
                opt.name
            ),
        )),
    }
}

fn set<T>(slot: &mut Option<T>, value: T) -> Result<(), CopyRefusal> {
    if slot.is_some() {
        return Err(redundant());
    }
    *slot = Some(value);
    Ok(())
}

/// The options of a COPY FROM, checked, with defaults filled in.
pub(super) fn process(options: Vec<Opt>) -> Result<CopyOptions, CopyRefusal> {
    let mut given = Given::default();
    for opt in &options {
        match opt.name.as_str() {
            "format" => {
                let name = string(opt)?;
                let format = match name.as_str() {
                    "text" => CopyFormat::Text,
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    _ => {
                        return Err(postgres(
                            "22023",
                            format!("COPY format \"{name}\" not recognized"),
                        ))
                    }
                };
                set(&mut given.format, format)?;
            }
            "freeze" => set(&mut given.freeze, boolean(opt)?)?,
            "delimiter" => set(&mut given.delimiter, string(opt)?)?,
            "null" => set(&mut given.null, string(opt)?)?,
            "header" => set(&mut given.header, header(opt)?)?,
            "quote" => set(&mut given.quote, string(opt)?)?,
            "escape" => set(&mut given.escape, string(opt)?)?,
            "force_quote" => {
                if given.force_quote {
                    return Err(redundant());
                }
                given.force_quote = true;
            }
            "force_not_null" => set(&mut given.force_not_null, columns(opt)?)?,
            "force_null" => set(&mut given.force_null, columns(opt)?)?,
            "encoding" => set(&mut given.encoding, string(opt)?)?,
            "default" | "on_error" | "log_verbosity" | "reject_limit" => {
                return Err(unsupported(
                    &format!(
                        "COPY option {} is not supported by shardline",
                        opt.name.to_uppercase()
                    ),
                    "leave the option out (the servers run Postgres 15)",
                ))
            }
            other => {
                return Err(postgres(
                    "42601",
                    format!("option \"{other}\" not recognized"),
                ))
            }
        }
    }
    check(given)
}

fn check(given: Given) -> Result<CopyOptions, CopyRefusal> {
    let format = given.format.unwrap_or(CopyFormat::Text);
    let (binary, csv) = (format == CopyFormat::Binary, format == CopyFormat::Csv);
    if binary && given.delimiter.is_some() {
        return Err(postgres("42601", "cannot specify DELIMITER in BINARY mode"));
    }
    if binary && given.null.is_some() {
        return Err(postgres("42601", "cannot specify NULL in BINARY mode"));
    }
    let delimiter = given
        .delimiter
        .unwrap_or_else(|| if csv { "," } else { "\t" }.to_string());
    let null = given
        .null
        .unwrap_or_else(|| if csv { "" } else { "\\N" }.to_string());
    if delimiter.len() != 1 {
        return Err(postgres(
            "0A000",
            "COPY delimiter must be a single one-byte character",
        ));
    }
    let delim = delimiter.as_bytes()[0];
    if delim == b'\r' || delim == b'\n' {
        return Err(postgres(
            "22023",
            "COPY delimiter cannot be newline or carriage return",
        ));
    }
    if null.contains(['\r', '\n']) {
        return Err(postgres(
            "22023",
            "COPY null representation cannot use newline or carriage return",
        ));
    }
    if !csv && b"\\.abcdefghijklmnopqrstuvwxyz0123456789".contains(&delim) {
        return Err(postgres(
            "22023",
            format!("COPY delimiter cannot be \"{delimiter}\""),
        ));
    }
    let header = given.header.unwrap_or(Header::No);
    if binary && header != Header::No {
        return Err(postgres("0A000", "cannot specify HEADER in BINARY mode"));
    }
    if !csv && given.quote.is_some() {
        return Err(postgres("0A000", "COPY quote available only in CSV mode"));
    }
    let quote = given.quote.unwrap_or_else(|| "\"".to_string());
    if csv && quote.len() != 1 {
        return Err(postgres(
            "0A000",
            "COPY quote must be a single one-byte character",
        ));
    }
    let quote = quote.as_bytes().first().copied().unwrap_or(b'"');
    if csv && delim == quote {
        return Err(postgres(
            "22023",
            "COPY delimiter and quote must be different",
        ));
    }
    if !csv && given.escape.is_some() {
        return Err(postgres("0A000", "COPY escape available only in CSV mode"));
    }
    let escape = given
        .escape
        .unwrap_or_else(|| char::from(quote).to_string());
    if csv && escape.len() != 1 {
        return Err(postgres(
            "0A000",
            "COPY escape must be a single one-byte character",
        ));
    }
    let escape = escape.as_bytes().first().copied().unwrap_or(quote);
    if given.force_quote {
        if !csv {
            return Err(postgres(
                "0A000",
                "COPY force quote available only in CSV mode",
            ));
        }
        return Err(postgres(
            "0A000",
            "COPY force quote only available using COPY TO",
        ));
    }
    if !csv && given.force_not_null.is_some() {
        return Err(postgres(
            "0A000",
            "COPY force not null available only in CSV mode",
        ));
    }
    if !csv && given.force_null.is_some() {
        return Err(postgres(
            "0A000",
            "COPY force null available only in CSV mode",
        ));
    }
    if !binary && null.as_bytes().contains(&delim) {
        return Err(postgres(
            "0A000",
            "COPY delimiter must not appear in the NULL specification",
        ));
    }
    if csv && null.as_bytes().contains(&quote) {
        return Err(postgres(
            "0A000",
            "CSV quote character must not appear in the NULL specification",
        ));
    }
    // What Postgres accepts but the proxy cannot split exactly.
    if given.freeze == Some(true) {
        return Err(unsupported(
            "COPY FREEZE is not supported for sharded tables",
            "leave FREEZE out",
        ));
    }
    if header == Header::Match {
        return Err(unsupported(
            "COPY with HEADER MATCH is not supported for sharded tables",
            "use HEADER true (the header line is then skipped without being checked)",
        ));
    }
    if let Some(encoding) = &given.encoding {
        let cleaned: String = encoding
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase();
        if cleaned != "utf8" && cleaned != "unicode" {
            return Err(unsupported(
                &format!("COPY with ENCODING '{encoding}' is not supported for sharded tables"),
                "convert the data to UTF8 and leave ENCODING out",
            ));
        }
    }
    Ok(CopyOptions {
        format,
        delimiter: delim,
        null,
        header: header == Header::Yes,
        quote,
        escape,
        force_not_null: given.force_not_null.unwrap_or_default(),
        force_null: given.force_null.unwrap_or_default(),
    })
}
