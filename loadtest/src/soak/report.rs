//! What a soak shows: the checks it must pass, a text summary, the JSON of
//! everything, and an SVG of RSS, fds, throughput and cache bytes over time
//! with the faults marked, in the style of the benchmark chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::faults::{Event, LogScan, KINDS};
use super::tally::{Counts, TallyData};
use super::{Params, Sample};
use crate::compare::Machine;
use crate::procs::UpstreamUse;
use crate::report::{esc, human, Check};

/// The raw results of a run, for [`SoakReport::new`].
pub struct Parts {
    pub machine: Machine,
    pub params: Params,
    pub seed: u64,
    pub elapsed: Duration,
    pub tally: TallyData,
    pub faults: BTreeMap<String, u64>,
    pub fault_events: Vec<Event>,
    pub samples: Vec<Sample>,
    pub upstream: UpstreamUse,
    pub distinct_bytes: u64,
    pub served_bytes: u64,
    pub proxy_exits: Vec<String>,
    pub log: LogScan,
}

/// Early against late: the peaks of the second quarter to the middle, and of the second half.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Flat {
    pub early: u64,
    pub late: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub machine: Machine,
    pub params: Params,
    pub seed: u64,
    pub elapsed_s: f64,
    pub totals: Counts,
    pub tally: TallyData,
    pub faults: BTreeMap<String, u64>,
    pub fault_events: Vec<Event>,
    pub samples: Vec<Sample>,
    /// Peak `RssAnon` of one regproxy process, KiB.
    pub anon_kib: Flat,
    pub rss_kib: Flat,
    pub fds: Flat,
    pub cache_max_bytes: u64,
    pub cap_bytes: u64,
    /// What the upstream's access logs (every incarnation) say it sent.
    pub upstream: UpstreamUse,
    /// Every distinct blob byte the soak seeded.
    pub distinct_bytes: u64,
    /// Payload bytes of right responses.
    pub served_bytes: u64,
    /// Upstream blob bytes ÷ distinct blob bytes.
    pub amplification: f64,
    pub proxy_exits: Vec<String>,
    pub log: LogScan,
    /// Errors and cuts by kind that happened outside every fault's window
    /// (from its start to [`FAULT_WINDOW`] after it ended).
    pub quiet_errors: BTreeMap<String, u64>,
    /// The longest run of one-second samples without a right response, and
    /// when it began.
    pub longest_stall_s: f64,
    pub longest_stall_at_s: f64,
    pub checks: Vec<Check>,
}

/// The longest stretch of samples with no right response: (length, start).
fn stall(samples: &[Sample]) -> (f64, f64) {
    let (mut best, mut at) = (0.0, 0.0);
    let mut start: Option<f64> = None;
    let mut prev = 0.0;
    for s in samples.iter().skip(1) {
        if s.req_per_s == 0.0 {
            let b = *start.get_or_insert(prev);
            if s.t_s - b > best {
                (best, at) = (s.t_s - b, b);
            }
        } else {
            start = None;
        }
        prev = s.t_s;
    }
    (best, at)
}

/// How long after a fault ends its effects may still show: regproxy's
/// `--upstream-timeout` (10 s) plus a connection retry.
pub const FAULT_WINDOW: f64 = 12.0;

fn quiet(tally: &TallyData, events: &[Event]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (kind, times) in &tally.error_times {
        let n = times
            .iter()
            .filter(|t| {
                !events
                    .iter()
                    .any(|e| **t >= e.t_s - 0.5 && **t <= e.t_s + e.held_s + FAULT_WINDOW)
            })
            .count() as u64;
        if n > 0 {
            out.insert(kind.clone(), n);
        }
    }
    out
}

fn flat(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> Flat {
    let end = samples.last().map_or(0.0, |s| s.t_s);
    let peak = |lo: f64, hi: f64| {
        samples
            .iter()
            .filter(|s| s.t_s >= lo * end && s.t_s <= hi * end)
            .map(&f)
            .max()
            .unwrap_or(0)
    };
    Flat {
        early: peak(0.25, 0.5),
        late: peak(0.5, 1.0),
    }
}

impl SoakReport {
    pub fn new(p: Parts) -> SoakReport {
        let cap_bytes = p
            .samples
            .iter()
            .filter_map(|s| s.cap_bytes)
            .max()
            .unwrap_or(p.params.cache_size);
        let mut r = SoakReport {
            totals: p.tally.total(),
            anon_kib: flat(&p.samples, |s| s.anon_kib),
            rss_kib: flat(&p.samples, |s| s.rss_kib),
            fds: flat(&p.samples, |s| s.fds),
            cache_max_bytes: p
                .samples
                .iter()
                .filter_map(|s| s.cache_bytes)
                .max()
                .unwrap_or(0),
            cap_bytes,
            amplification: p.upstream.blob_bytes as f64 / p.distinct_bytes.max(1) as f64,
            machine: p.machine,
            params: p.params,
            seed: p.seed,
            elapsed_s: p.elapsed.as_secs_f64(),
            tally: p.tally,
            faults: p.faults,
            fault_events: p.fault_events,
            samples: p.samples,
            upstream: p.upstream,
            distinct_bytes: p.distinct_bytes,
            served_bytes: p.served_bytes,
            proxy_exits: p.proxy_exits,
            log: p.log,
            quiet_errors: BTreeMap::new(),
            longest_stall_s: 0.0,
            longest_stall_at_s: 0.0,
            checks: Vec::new(),
        };
        (r.longest_stall_s, r.longest_stall_at_s) = stall(&r.samples);
        r.quiet_errors = quiet(&r.tally, &r.fault_events);
        r.checks = checks(&r);
        r
    }
}

/// Grows by at most half, plus `room`, from the first half to the second.
fn flat_check(what: &str, f: Flat, room: u64, unit: &str, div: f64) -> Check {
    let bar = f.early + f.early / 2 + room;
    Check {
        what: format!("{what}: peak of the 2nd half vs the 2nd quarter"),
        bar: format!("≤ {:.1}{unit}", bar as f64 / div),
        measured: format!(
            "{:.1} → {:.1}{unit}",
            f.early as f64 / div,
            f.late as f64 / div
        ),
        met: f.late <= bar && f.early > 0,
    }
}

/// What a soak must show; the run fails unless all are met.
pub fn checks(r: &SoakReport) -> Vec<Check> {
    let t = &r.totals;
    let mut v = vec![
        Check {
            what: "completed responses that were wrong".into(),
            bar: "= 0".into(),
            measured: t.wrong.to_string(),
            met: t.wrong == 0,
        },
        Check {
            what: "right responses".into(),
            bar: "≥ 100".into(),
            measured: t.right.to_string(),
            met: t.right >= 100,
        },
    ];
    let missing: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| r.faults.get(*k).copied().unwrap_or(0) == 0)
        .collect();
    v.push(Check {
        what: "fault kinds injected".into(),
        bar: format!("all {}", KINDS.len()),
        measured: if missing.is_empty() {
            format!("all {}", KINDS.len())
        } else {
            format!("missing {}", missing.join(", "))
        },
        met: missing.is_empty(),
    });
    v.push(flat_check(
        "regproxy RssAnon",
        r.anon_kib,
        16 << 10,
        " MiB",
        1024.0,
    ));
    v.push(flat_check("regproxy open fds", r.fds, 32, "", 1.0));
    v.push(Check {
        what: "cache bytes, highest sample".into(),
        bar: format!("≤ cap {}", human(r.cap_bytes)),
        measured: human(r.cache_max_bytes),
        met: r.cache_max_bytes <= r.cap_bytes && r.cache_max_bytes > 0,
    });
    let unclean: Vec<&String> = r
        .proxy_exits
        .iter()
        .filter(|e| !e.ends_with("exit status: 0"))
        .collect();
    v.push(Check {
        what: "regproxy processes that exited unclean after SIGTERM".into(),
        bar: "= 0".into(),
        measured: if unclean.is_empty() {
            format!("0 of {}", r.proxy_exits.len())
        } else {
            unclean
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        },
        met: unclean.is_empty(),
    });
    v.push(Check {
        what: "panics in regproxy's logs".into(),
        bar: "= 0".into(),
        measured: r.log.panics.to_string(),
        met: r.log.panics == 0,
    });
    v
}

/// The summary a person reads.
pub fn text(r: &SoakReport) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let t = &r.totals;
    let _ = writeln!(
        s,
        "soak: {:.0}s, seed {}, {} clients · {} × {} · {:.1} GiB · Linux {} · {}",
        r.elapsed_s,
        r.seed,
        r.params.clients,
        m.nproc,
        m.cpu,
        m.mem_total_gib,
        m.kernel,
        m.started_utc
    );
    let _ = writeln!(
        s,
        "requests {}: right {} (tags stale during an upstream outage {}), WRONG {}, cut {}, errors {}",
        t.requests, t.right, t.stale_during_outage, t.wrong, t.cut, t.errors
    );
    let _ = writeln!(
        s,
        "{:<24} {:>8} {:>8} {:>6} {:>6} {:>7}",
        "operation", "requests", "right", "wrong", "cut", "errors"
    );
    for (op, c) in &r.tally.by_op {
        let _ = writeln!(
            s,
            "{op:<24} {:>8} {:>8} {:>6} {:>6} {:>7}",
            c.requests, c.right, c.wrong, c.cut, c.errors
        );
    }
    let faults: Vec<String> = r.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(s, "faults: {}", faults.join(", "));
    let errors: Vec<String> = r
        .tally
        .errors_by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(s, "errors by kind: {}", errors.join(", "));
    let quiet: Vec<String> = r
        .quiet_errors
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(
        s,
        "errors and cuts outside every fault's window (start to {FAULT_WINDOW:.0} s after): {}",
        if quiet.is_empty() {
            "none".to_string()
        } else {
            quiet.join(", ")
        }
    );
    for w in &r.tally.wrong_examples {
        let _ = writeln!(s, "WRONG: {w}");
    }
    let _ = writeln!(
        s,
        "longest stretch without a right response: {:.0} s, from {:.0} s",
        r.longest_stall_s, r.longest_stall_at_s
    );
    let _ = writeln!(
        s,
        "regproxy per process, peak (2nd quarter → 2nd half): RssAnon {:.1} → {:.1} MiB, VmRSS {:.1} → {:.1} MiB, fds {} → {}",
        r.anon_kib.early as f64 / 1024.0,
        r.anon_kib.late as f64 / 1024.0,
        r.rss_kib.early as f64 / 1024.0,
        r.rss_kib.late as f64 / 1024.0,
        r.fds.early,
        r.fds.late
    );
    let _ = writeln!(
        s,
        "cache: highest {} of cap {}; served {} right; upstream sent {} of blobs in {} GETs ({} requests); \
         amplification {:.2} (upstream blob bytes ÷ {} distinct)",
        human(r.cache_max_bytes),
        human(r.cap_bytes),
        human(r.served_bytes),
        human(r.upstream.blob_bytes),
        r.upstream.blob_gets,
        r.upstream.requests,
        r.amplification,
        human(r.distinct_bytes)
    );
    let _ = writeln!(
        s,
        "regproxy logs: {} panics, {} ERROR, {} WARN lines, {} corrupted fills refused; exits: {}",
        r.log.panics,
        r.log.error_lines,
        r.log.warn_lines,
        r.log.digest_mismatches,
        r.proxy_exits.join("; ")
    );
    let _ = write!(s, "{}", crate::report::checks_text(&r.checks));
    s
}

/// A round step (1, 2, 2.5 or 5 × 10ⁿ) that divides `0..=max` into at most 5.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-6);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|st| *st >= raw)
        .unwrap_or(10.0 * mag)
}

fn fault_color(kind: &str) -> &'static str {
    match kind {
        "upstream restart" => "#d95f02",
        "gate cut" => "#7570b3",
        "corrupt upstream blob" => "#e7298a",
        "full disk" => "#66a61e",
        _ => "#1b9e77",
    }
}

/// Line charts over time, one panel each, faults as vertical marks.
pub fn svg(r: &SoakReport) -> String {
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Sample) -> Option<f64> + 'a>);
    let panels: Vec<(&str, Vec<Series>)> = vec![
        (
            "regproxy memory per process, MiB (peak of the processes alive)",
            vec![
                (
                    "VmRSS",
                    "#d95f02",
                    Box::new(|s: &Sample| Some(s.rss_kib as f64 / 1024.0)),
                ),
                (
                    "RssAnon",
                    "#7570b3",
                    Box::new(|s: &Sample| Some(s.anon_kib as f64 / 1024.0)),
                ),
            ],
        ),
        (
            "regproxy open fds per process",
            vec![("fds", "#1b9e77", Box::new(|s: &Sample| Some(s.fds as f64)))],
        ),
        (
            "right responses per second",
            vec![("req/s", "#444", Box::new(|s: &Sample| Some(s.req_per_s)))],
        ),
        (
            "verified MiB per second",
            vec![("MiB/s", "#e6ab02", Box::new(|s: &Sample| Some(s.mib_per_s)))],
        ),
        (
            "cache MiB (and its cap)",
            vec![
                (
                    "cache",
                    "#66a61e",
                    Box::new(|s: &Sample| s.cache_bytes.map(|b| b as f64 / (1u64 << 20) as f64)),
                ),
                (
                    "cap",
                    "#999",
                    Box::new(|s: &Sample| s.cap_bytes.map(|b| b as f64 / (1u64 << 20) as f64)),
                ),
            ],
        ),
    ];
    let (w, ph, top) = (1000.0, 130.0, 96.0);
    let h = top + panels.len() as f64 * (ph + 44.0) + 30.0;
    let (px, pw) = (70.0, 900.0);
    let t_end = r.samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let x = |t: f64| px + pw * t / t_end;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let t = &r.totals;
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="18" font-weight="bold">regproxy soak: {} min, {} requests, {} wrong, {} faults</text>"#,
        if r.elapsed_s < 600.0 {
            format!("{:.1}", r.elapsed_s / 60.0)
        } else {
            format!("{:.0}", r.elapsed_s / 60.0)
        },
        t.requests,
        t.wrong,
        r.faults.values().sum::<u64>()
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        r##"<text x="20" y="48" font-size="12" fill="#444">{} · {} cores · {:.0} GiB · {} · seed {} · {} clients</text>"##,
        esc(&m.cpu),
        m.nproc,
        m.mem_total_gib,
        esc(&m.started_utc),
        r.seed,
        r.params.clients
    );
    for (i, k) in KINDS.iter().enumerate() {
        let lx = 20.0 + i as f64 * 180.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="60" width="3" height="14" fill="{}"/><text x="{}" y="72" font-size="12">{k} ({})</text>"#,
            fault_color(k),
            lx + 8.0,
            r.faults.get(*k).copied().unwrap_or(0)
        );
    }
    for (i, (title, series)) in panels.iter().enumerate() {
        let py = top + i as f64 * (ph + 44.0) + 18.0;
        let _ = writeln!(
            s,
            r#"<text x="{px}" y="{}" font-size="13" font-weight="bold">{}</text>"#,
            py - 6.0,
            esc(title)
        );
        let max = r
            .samples
            .iter()
            .flat_map(|smp| series.iter().filter_map(move |(_, _, f)| f(smp)))
            .fold(0.0_f64, f64::max);
        let step = nice_step(max);
        let hi = (max / step).ceil().max(1.0) * step;
        let y = |v: f64| py + ph - ph * v / hi;
        let mut v = 0.0;
        while v <= hi + step / 2.0 {
            let _ = writeln!(
                s,
                r##"<line x1="{px}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                px + pw,
                px - 6.0,
                y(v) + 3.0,
                if step >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                },
                y = y(v)
            );
            v += step;
        }
        for e in &r.fault_events {
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{py}" x2="{x:.1}" y2="{}" stroke="{}" stroke-opacity="0.5"><title>{} at {:.0}s: {}</title></line>"#,
                py + ph,
                fault_color(e.kind),
                e.kind,
                e.t_s,
                esc(&e.detail),
                x = x(e.t_s)
            );
        }
        for (j, (name, color, f)) in series.iter().enumerate() {
            let pts: Vec<String> = r
                .samples
                .iter()
                .filter_map(|smp| f(smp).map(|v| format!("{:.1},{:.1}", x(smp.t_s), y(v))))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                pts.join(" ")
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="11" fill="{color}" text-anchor="end">{name}</text>"#,
                px + pw - j as f64 * 70.0,
                py - 6.0
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{}" x2="{}" y2="{}" stroke="#888"/>"##,
            py + ph,
            px + pw,
            py + ph
        );
    }
    let axis_y = top + panels.len() as f64 * (ph + 44.0) + 4.0;
    let step = [10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|st| t_end / st <= 12.0)
        .unwrap_or(900.0);
    let mut tk = 0.0;
    while tk <= t_end {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{axis_y}" font-size="10" text-anchor="middle">{}</text>"#,
            x(tk),
            if step >= 60.0 {
                format!("{:.0} min", tk / 60.0)
            } else {
                format!("{tk:.0} s")
            }
        );
        tk += step;
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::oracle::Verdict;
    use crate::soak::tally::Tally;

    fn report(wrong: bool) -> SoakReport {
        let tally = Tally::default();
        for _ in 0..200 {
            tally.verdict("get", Verdict::Right, 1);
        }
        if wrong {
            tally.verdict("get", Verdict::Wrong("a planted wrong body".into()), 1);
        }
        let samples = (0..60)
            .map(|i| Sample {
                t_s: i as f64,
                procs: 1,
                rss_kib: 20_000,
                anon_kib: 10_000,
                fds: 40,
                cache_bytes: Some(1 << 20),
                cap_bytes: Some(32 << 20),
                req_per_s: 10.0,
                mib_per_s: 1.0,
            })
            .collect();
        let params = <Params as clap::FromArgMatches>::from_arg_matches(
            &<Params as clap::Args>::augment_args(clap::Command::new("t")).get_matches_from(["t"]),
        )
        .unwrap();
        SoakReport::new(Parts {
            machine: Machine::detect(),
            params,
            seed: 1,
            elapsed: Duration::from_secs(60),
            tally: tally.snapshot(),
            faults: KINDS.iter().map(|k| (k.to_string(), 1)).collect(),
            fault_events: vec![],
            samples,
            upstream: UpstreamUse::default(),
            distinct_bytes: 1,
            served_bytes: 1,
            proxy_exits: vec!["regproxy-1: exit status: 0".into()],
            log: LogScan::default(),
        })
    }

    #[test]
    fn one_wrong_response_fails_the_soak() {
        let good = report(false);
        assert!(good.checks.iter().all(|c| c.met), "{:?}", good.checks);
        assert_eq!(good.longest_stall_s, 0.0);
        let bad = report(true);
        let failed: Vec<_> = bad.checks.iter().filter(|c| !c.met).collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].what.contains("wrong"));
        assert!(text(&bad).contains("WRONG: get: a planted wrong body"));
        assert!(svg(&bad).trim_end().ends_with("</svg>"));
    }
}
