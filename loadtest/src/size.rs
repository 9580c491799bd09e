//! Byte sizes on the command line: `256MiB`, `16MB`, `4KiB`, plain bytes.

use anyhow::{bail, Context};

/// Parses `1024`, `4KiB`, `16MiB`, `1GiB`, `300MB` (decimal for `KB`/`MB`/`GB`).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .with_context(|| format!("size {s:?} does not start with a number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => bail!("size {s:?} has an unknown unit {other:?}"),
    };
    Ok((num * mult as f64).round() as u64)
}

/// Parses a comma-separated list of sizes; an empty string is an empty list.
pub fn parse_size_list(s: &str) -> anyhow::Result<Vec<u64>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_size)
        .collect()
}

/// `268435456` → `256.0 MiB`, for humans.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("300MB").unwrap(), 300_000_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(
            parse_size("12XB").is_err(),
            "an unknown unit should be refused"
        );
        assert_eq!(parse_size_list("1KiB,2").unwrap(), vec![1024, 2]);
        assert!(parse_size_list("").unwrap().is_empty());
    }
}
