//! How shardctl prints: human tables by default, JSON with `--json`.

use comfy_table::{presets, ContentArrangement, Table};
use serde::Serialize;

/// A table with shardctl's look (psql-like, no outer border).
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_BORDERS_ONLY_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    table
}

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Compresses sorted partition numbers into ranges: `0-3,8,10-11`.
pub fn ranges(partitions: &[u32]) -> String {
    let mut out = Vec::new();
    let mut iter = partitions.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// Like [`ranges`], cut to about `max` characters for a table cell.
pub fn ranges_short(partitions: &[u32], max: usize) -> String {
    let full = ranges(partitions);
    if full.len() <= max {
        return full;
    }
    let cut = full[..max].rfind(',').unwrap_or(max);
    format!("{},… (--json for all)", &full[..cut])
}

/// Bytes in the largest unit that keeps the number at least 1: `1.5 kB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GB");
    }

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(ranges(&[]), "-");
        assert_eq!(
            ranges_short(&[0, 2, 4, 6, 8, 10, 12], 7),
            "0,2,4,… (--json for all)"
        );
    }
}
