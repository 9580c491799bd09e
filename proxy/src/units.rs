//! Sizes, rates and durations as people write them on a command line or in an env
//! var, one grammar each for regproxy and loadtest.
//!
//! A size is a whole number and an optional unit, case-insensitive, with
//! optional space between: `1048576` or `512B` (bytes), `300MB` (decimal:
//! `K`/`KB`, `M`/`MB`, `G`/`GB`, `T`/`TB` are powers of 1000, as Kubernetes
//! reads `300M`), `20GiB` (binary: `Ki`/`KiB` … `Ti`/`TiB` are powers of
//! 1024). Fractions (`1.5GiB`) and sizes past `u64` are refused.
//!
//! A duration is what [`humantime::parse_duration`] reads: `30s`, `300ms`,
//! `5m`, `1h 30m`, `24h`.

use std::time::Duration;

/// Why a size or a duration did not parse; each names the input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error("`{0}` is not a size such as 300MB, 20GiB or 1048576")]
    NotASize(String),
    #[error("unknown size unit `{0}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")]
    UnknownSizeUnit(String),
    #[error("`{0}` is too large")]
    SizeTooLarge(String),
    #[error("the size list `{0}` has an empty item")]
    EmptyListItem(String),
    #[error("`{0}` is not a rate such as 20Mbit/s, 5MiB/s or off")]
    NotARate(String),
    #[error("`{input}` is not a duration such as 30s, 300ms, 5m or 1h: {source}")]
    NotADuration {
        input: String,
        source: humantime::DurationError,
    },
}

/// Parses a size in bytes: `300MB` (decimal), `20GiB` (binary), `512` (bytes).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => UnitError::SizeTooLarge(s.into()),
            _ => UnitError::NotASize(s.into()),
        })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000u64.pow(2),
        "g" | "gb" => 1000u64.pow(3),
        "t" | "tb" => 1000u64.pow(4),
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        u if u.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(UnitError::UnknownSizeUnit(unit.trim().into()))
        }
        // `1.5GiB`, `1 2`: not a whole number and a unit.
        _ => return Err(UnitError::NotASize(s.into())),
    };
    num.checked_mul(mult)
        .ok_or_else(|| UnitError::SizeTooLarge(s.into()))
}

/// Parses a rate in bytes per second: a size per second with bits or bytes,
/// `20Mbit/s`, `800kbit/s`, `1Gbit/s` (decimal bits), `5MiB/s`, `1MB/s` (a
/// size as [`parse_size`] reads it, per second); `0`, `off` and `unlimited`
/// are 0, no limit.
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    if matches!(t.to_ascii_lowercase().as_str(), "0" | "off" | "unlimited") {
        return Ok(0);
    }
    let not_a_rate = || UnitError::NotARate(t.into());
    let per = t.strip_suffix("/s").ok_or_else(not_a_rate)?.trim_end();
    let lower = per.to_ascii_lowercase();
    if let Some(num) = lower.strip_suffix("bit") {
        let split = num.find(|c: char| !c.is_ascii_digit()).unwrap_or(num.len());
        let (n, unit) = num.split_at(split);
        let n: u64 = n.parse().map_err(|_| not_a_rate())?;
        let mult: u64 = match unit.trim() {
            "" => 1,
            "k" => 1000,
            "m" => 1000u64.pow(2),
            "g" => 1000u64.pow(3),
            _ => return Err(not_a_rate()),
        };
        let bits = n
            .checked_mul(mult)
            .ok_or_else(|| UnitError::SizeTooLarge(t.into()))?;
        return Ok(bits / 8);
    }
    parse_size(per).map_err(|e| match e {
        UnitError::SizeTooLarge(_) => e,
        _ => not_a_rate(),
    })
}

/// A rate for people: `20.0 Mbit/s` (decimal bits, as links are sold), or
/// `unlimited` for 0.
pub fn format_rate(bytes_per_s: u64) -> String {
    if bytes_per_s == 0 {
        return "unlimited".into();
    }
    let bits = bytes_per_s as f64 * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.1} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} Mbit/s", b / 1e6),
        b => format!("{:.1} kbit/s", b / 1e3),
    }
}

/// Parses a comma-separated list of sizes, `48MiB,16MiB`; an empty (or
/// blank) string is the empty list, an empty item in a list is refused.
pub fn parse_size_list(s: &str) -> Result<Vec<u64>, UnitError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|item| match item.trim() {
            "" => Err(UnitError::EmptyListItem(s.into())),
            item => parse_size(item),
        })
        .collect()
}

/// Parses a duration: `30s`, `300ms`, `5m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s).map_err(|source| UnitError::NotADuration {
        input: s.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_bits_and_bytes_per_second() {
        assert_eq!(parse_rate("20Mbit/s"), Ok(2_500_000));
        assert_eq!(parse_rate("800kbit/s"), Ok(100_000));
        assert_eq!(parse_rate("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse_rate("5MiB/s"), Ok(5 << 20));
        assert_eq!(parse_rate("1MB/s"), Ok(1_000_000));
        assert_eq!(parse_rate(" 10 Mbit/s "), Ok(1_250_000));
        assert_eq!(parse_rate("off"), Ok(0));
        assert_eq!(parse_rate("0"), Ok(0));
        for bad in ["20Mbit", "fast", "1.5MiB/s", "5Xbit/s", "/s", "-1MiB/s", ""] {
            assert!(parse_rate(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(format_rate(2_500_000), "20.0 Mbit/s");
        assert_eq!(format_rate(0), "unlimited");
    }

    #[test]
    fn sizes_parse_decimal_binary_and_plain() {
        assert_eq!(parse_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_size("300M"), Ok(300_000_000));
        assert_eq!(parse_size("4k"), Ok(4_000));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("20Gi"), Ok(20 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("10 KB"), Ok(10_000));
        assert_eq!(parse_size(" 3MiB "), Ok(3 << 20));
    }

    #[test]
    fn every_size_the_repo_writes_parses() {
        // README, deploy/, scripts/, BENCHMARKS.md, the tests, loadtest's defaults.
        for s in [
            "10GiB", "20GiB", "1GiB", "300MB", "256MiB", "48MiB", "24MiB", "16MiB", "12MiB",
            "4MiB", "3MiB", "2MiB", "1MiB", "512KiB", "256KiB", "4KiB", "1048576",
        ] {
            assert!(parse_size(s).is_ok(), "{s} should parse");
        }
    }

    #[test]
    fn sizes_that_are_not_sizes_are_refused() {
        assert_eq!(parse_size("MB"), Err(UnitError::NotASize("MB".into())));
        assert_eq!(parse_size(""), Err(UnitError::NotASize("".into())));
        assert_eq!(parse_size("lots"), Err(UnitError::NotASize("lots".into())));
        assert_eq!(parse_size("-1"), Err(UnitError::NotASize("-1".into())));
        assert_eq!(
            parse_size("5XB"),
            Err(UnitError::UnknownSizeUnit("XB".into())),
            "unknown units are refused"
        );
        assert_eq!(
            parse_size("1.5GiB"),
            Err(UnitError::NotASize("1.5GiB".into())),
            "fractions are refused"
        );
        assert!(parse_size("10 K B").is_err());
        assert!(parse_size("1PB").is_err(), "past TB there is no unit");
    }

    #[test]
    fn sizes_past_u64_are_refused_not_wrapped() {
        assert_eq!(parse_size(&u64::MAX.to_string()), Ok(u64::MAX));
        assert_eq!(
            parse_size("99999999999TiB"),
            Err(UnitError::SizeTooLarge("99999999999TiB".into()))
        );
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(UnitError::SizeTooLarge("18446744073709551616".into()))
        );
        assert!(
            parse_size("16777216TiB").is_err(),
            "2^64 bytes is one too many"
        );
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215 << 40));
    }

    #[test]
    fn size_lists_are_comma_separated() {
        assert_eq!(parse_size_list("1KiB,2"), Ok(vec![1024, 2]));
        assert_eq!(
            parse_size_list("24MiB, 4MiB ,512KiB"),
            Ok(vec![24 << 20, 4 << 20, 512 << 10])
        );
        assert_eq!(parse_size_list(""), Ok(vec![]));
        assert_eq!(parse_size_list(" "), Ok(vec![]));
        assert_eq!(
            parse_size_list("1KiB,,2"),
            Err(UnitError::EmptyListItem("1KiB,,2".into())),
            "an empty item is refused"
        );
        assert!(
            parse_size_list("1KiB,").is_err(),
            "a trailing comma is refused"
        );
        assert!(parse_size_list("1KiB,5XB").is_err());
    }

    #[test]
    fn durations_parse_as_humantime_reads_them() {
        let secs = Duration::from_secs;
        assert_eq!(parse_duration("0s"), Ok(secs(0)));
        assert_eq!(parse_duration("30s"), Ok(secs(30)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("5m"), Ok(secs(300)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        assert_eq!(parse_duration("24h"), Ok(secs(86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(secs(5400)));
        assert_eq!(parse_duration("2min"), Ok(secs(120)));
    }

    #[test]
    fn every_duration_the_repo_writes_parses() {
        for s in [
            "0s", "1s", "2s", "3s", "5s", "10s", "25s", "30s", "60s", "120s", "300s", "300ms",
            "5m", "1h", "24h",
        ] {
            assert!(parse_duration(s).is_ok(), "{s} should parse");
        }
    }

    #[test]
    fn durations_that_are_not_durations_are_refused() {
        for s in ["", "30", "s", "soon", "30 parsecs", "-1s", "1.5.5s"] {
            let err = parse_duration(s).expect_err(s);
            assert!(
                err.to_string().contains(&format!("`{s}`")),
                "the error should name the input: {err}"
            );
        }
    }

    #[test]
    fn durations_past_duration_are_refused() {
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(UnitError::NotADuration {
                source: humantime::DurationError::NumberOverflow,
                ..
            })
        ));
        assert!(parse_duration("18446744073709551615s 1s").is_err());
    }
}
