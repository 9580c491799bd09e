//! The budget scenario for a person: its table and its checks.

use std::fmt::Write as _;

use super::{BudgetReport, Setup};
use crate::report::{human, Check};

const MIB: f64 = (1u64 << 20) as f64;

/// The rollout pull's time in `setup` ÷ its time without a prefetch.
pub fn ratio(b: &BudgetReport, setup: Setup) -> Option<f64> {
    let base = b.run(Setup::NoPrefetch)?.pull_s;
    let r = b.run(setup)?;
    (base > 0.0 && r.errors == 0).then(|| r.pull_s / base)
}

/// One line per setup.
pub fn table(b: &BudgetReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "budget: a rollout of {} ({}, {} client{}) while {} ({}) is prefetched, one {} Mbit/s uplink",
        b.rollout,
        human(b.rollout_bytes),
        b.clients,
        if b.clients == 1 { "" } else { "s" },
        b.prefetch,
        human(b.prefetch_bytes),
        b.mbit
    );
    let _ = writeln!(
        s,
        "pull s: the rollout pull (every client, every blob verified); ×alone: that ÷ the pull without a prefetch; \
         pull Mbit/s: the rollout's bytes over that time; pf MiB: what regproxy took from the upstream beyond the \
         rollout's blobs (the prefetch's share) while the pull ran; pf s: until the prefetch's answer ended (! failed); \
         up MiB: blob bytes the upstream sent in the setup (its access log)"
    );
    let _ = writeln!(
        s,
        "{:<20} {:>12} {:>8} {:>7} {:>11} {:>10} {:>10} {:>8} {:>11} {:>6} {:>6}",
        "setup",
        "rate",
        "pull s",
        "×alone",
        "pull Mbit/s",
        "pull p99",
        "pf MiB",
        "pf s",
        "up MiB",
        "ok",
        "errors"
    );
    let dash = || "-".to_string();
    for r in &b.runs {
        let _ = writeln!(
            s,
            "{:<20} {:>12} {:>8.2} {:>7} {:>11.1} {:>8.0}ms {:>10.1} {:>8} {:>11.1} {:>6} {:>6}",
            r.setup.label(),
            r.rate.clone().unwrap_or_else(|| "none".into()),
            r.pull_s,
            ratio(b, r.setup)
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(dash),
            r.pull_bit_s / 1e6,
            r.pull_p99_ms,
            r.prefetch_bytes_during_pull as f64 / MIB,
            r.prefetch
                .as_ref()
                .map(|f| format!("{:.2}{}", f.s, if f.ok { "" } else { "!" }))
                .unwrap_or_else(dash),
            r.upstream.blob_bytes as f64 / MIB,
            r.verified,
            r.errors,
        );
    }
    for r in &b.runs {
        if let Some(e) = r.prefetch.as_ref().and_then(|f| f.error.as_ref()) {
            let _ = writeln!(s, "{}: the prefetch failed: {e}", r.setup.label());
        }
        if let Some(e) = r.first_errors.first() {
            let _ = writeln!(s, "{}: the pull failed: {e}", r.setup.label());
        }
    }
    s
}

/// The rollout pulled whole in every setup, every prefetch completed, and
/// the shaped prefetch cost the pull less than the unshaped one.
pub fn checks(b: &BudgetReport) -> Vec<Check> {
    let mut v = Vec::new();
    for r in &b.runs {
        v.push(Check {
            what: format!("budget, {}: the rollout pull verifies", r.setup.label()),
            bar: "0 errors".into(),
            measured: format!("{} errors, {} verified", r.errors, r.verified),
            met: r.errors == 0 && r.verified > 0,
        });
        if let Some(f) = &r.prefetch {
            v.push(Check {
                what: format!("budget, {}: the prefetch completes", r.setup.label()),
                bar: "ok".into(),
                measured: if f.ok {
                    format!("ok in {:.2} s", f.s)
                } else {
                    "failed".into()
                },
                met: f.ok,
            });
        }
    }
    if let (Some(shaped), Some(unshaped)) = (ratio(b, Setup::Shaped), ratio(b, Setup::Unshaped)) {
        v.push(Check {
            what: "budget: pull time with a prefetch ÷ alone, shaped vs unshaped".into(),
            bar: "shaped lower".into(),
            measured: format!("{shaped:.2} vs {unshaped:.2}"),
            met: shaped < unshaped,
        });
    }
    v
}

/// Failed requests and prefetches.
pub fn errors(b: &BudgetReport) -> u64 {
    b.runs
        .iter()
        .map(|r| r.errors + r.prefetch.as_ref().map_or(0, |f| u64::from(!f.ok)))
        .sum()
}
