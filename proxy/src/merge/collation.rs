//! Which collations order text as plain bytes: the only ones under which the
//! proxy can merge text sort keys exactly. Every other collation (a libc
//! locale like en_US.utf8, any ICU collation) orders by rules the proxy does
//! not reproduce, so the caller refuses to merge by it.
//!
//! Bytes of UTF-8 in byte order are code points in code-point order, which is
//! what these collations do in Postgres 15:
//! - `"C"`, `"POSIX"`, `ucs_basic`: memcmp (Postgres's `lc_collate_is_c`);
//! - `"C.utf8"` / `C.UTF-8` (libc): strcoll under glibc's C.UTF-8, which sorts
//!   by code point (strict code-point order since glibc 2.35).
//!
//! Two conditions this function cannot see, which the caller must hold:
//! the servers' encoding is UTF8 (binary text arrives in the client encoding,
//! and only for UTF-8 is byte order the servers' order), and the database's
//! locale provider is libc (`pg_database.datlocprovider = 'c'`): an ICU
//! database still reports an `lc_collate`, but its `"default"` collation is ICU.

/// Whether text ordered under `collation` (as pg_collation_for prints it,
/// quotes included) in a database whose lc_collate is `database_collate` is
/// plain byte order of UTF-8 (C, POSIX, ucs_basic, C.UTF-8/C.utf8, "default"
/// when the database collation is one of those). Anything else: false (the
/// proxy then refuses).
///
/// `database_collate` is `SHOW lc_collate` (or `pg_database.datcollate`) of a
/// libc-provider database; for an ICU database pass its ICU locale instead,
/// which is never byte order.
pub fn collation_is_bytewise(collation: &str, database_collate: &str) -> bool {
    // pg_collation_for qualifies a name only when another collation of that
    // name comes first on the search path; one in a schema other than
    // pg_catalog is a user's, with whatever locale they gave it.
    let name = collation.strip_prefix("pg_catalog.").unwrap_or(collation);
    // Names are matched as printed (quote_identifier quotes any name that is
    // not lower case, and keywords like default), so `C` unquoted, which
    // would name a collation "c", matches nothing.
    match name {
        "\"default\"" => locale_is_bytewise(database_collate),
        "ucs_basic" => true,
        quoted => match quoted.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(inner) if !inner.contains('"') => locale_is_bytewise(inner),
            _ => false,
        },
    }
}

/// Whether a libc locale name orders strings by byte (code point) order.
fn locale_is_bytewise(locale: &str) -> bool {
    if locale == "C" || locale == "POSIX" {
        return true;
    }
    // glibc normalises a codeset by dropping punctuation and lowering case,
    // so C.UTF-8, C.utf8 and C.UTF8 are the same locale.
    match locale.strip_prefix("C.") {
        Some(codeset) => {
            let normalised: String = codeset
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .map(|c| c.to_ascii_lowercase())
                .collect();
            normalised == "utf8"
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_collations_are_accepted() {
        for collation in [
            "\"C\"",
            "\"POSIX\"",
            "ucs_basic",
            "\"C.utf8\"",
            "\"C.UTF-8\"",
            "pg_catalog.\"C\"",
            "pg_catalog.ucs_basic",
        ] {
            assert!(collation_is_bytewise(collation, "en_US.UTF-8"), "{collation}");
        }
    }

    #[test]
    fn default_follows_the_database_collation() {
        for database in ["C", "POSIX", "C.UTF-8", "C.utf8", "C.UTF8"] {
            assert!(collation_is_bytewise("\"default\"", database), "{database}");
        }
        for database in ["en_US.UTF-8", "C.ISO-8859-1", "", "c", "und-x-icu", "de_DE"] {
            assert!(!collation_is_bytewise("\"default\"", database), "{database}");
        }
    }

    #[test]
    fn other_collations_and_odd_output_are_refused() {
        for collation in [
            "\"en_US.utf8\"",
            "\"und-x-icu\"",
            "\"en-x-icu\"",
            "c",
            "C",
            "default",
            "public.\"C\"",
            "\"pg_catalog\".\"C\"",
            "pg_catalog.\"C\".x",
            "\"ucs_basic\"",
            "\"default\"\"\"",
            "\"C",
            "\"\"",
            "",
            "\"C\" ",
            "\"C\"\"\"",
        ] {
            assert!(!collation_is_bytewise(collation, "C"), "{collation}");
        }
    }
}
