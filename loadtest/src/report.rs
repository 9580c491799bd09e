//! What a run shows a person: one table on stdout, the checks against the
//! issue's bars, the JSON of everything, and an SVG chart.

use std::fmt::Write as _;

use serde::Serialize;

use crate::compare::{Report, Row, SCENARIOS};
use crate::targets::Kind;

const MIB: f64 = (1u64 << 20) as f64;

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

/// `256 MiB`, `512 KiB`: sizes as the labels show them.
fn short(bytes: u64) -> String {
    human(bytes).replace(".0 ", " ")
}

/// What the table and chart call a scenario, with this run's sizes.
pub fn label(report: &Report, scenario: &str) -> String {
    let p = &report.params;
    match scenario {
        "cold_concurrent" => format!("cold {}× {}", p.cold_clients, short(p.big)),
        "images_cold" => format!("images cold {}×", p.image_clients),
        "images_warm" => format!("images warm {}×", p.image_clients),
        "warm_single" => format!("warm 1× {}", short(p.big)),
        "warm_concurrent" => format!("warm {}× {}", p.warm_clients, short(p.medium)),
        "warm_single_discard" => format!("warm discard 1× {}", short(p.big)),
        "warm_concurrent_discard" => {
            format!("warm discard {}× {}", p.warm_clients, short(p.medium))
        }
        "small_requests" => format!("small req {}×", p.small_workers),
        "uplink_node1" => format!("uplink node1 {}×", p.uplink_clients),
        "uplink_node2" => format!("uplink node2 {}×", p.uplink_clients),
        other => SCENARIOS
            .iter()
            .find(|(id, _)| *id == other)
            .map(|(_, l)| l.to_string())
            .unwrap_or_else(|| other.to_string()),
    }
}

/// A label in two lines for the chart: the words before the first count
/// (`10×`, `8×`), then the rest: `cold` / `10× 256 MiB`.
fn two_lines(label: &str) -> (&str, &str) {
    let count = label.match_indices(' ').map(|(i, _)| i + 1).find(|&i| {
        label[i..]
            .split(' ')
            .next()
            .is_some_and(|w| w.contains('×'))
    });
    match count {
        Some(i) => (label[..i].trim_end(), &label[i..]),
        None => (label, ""),
    }
}

/// The speed of a row: requests per second for small requests, else MiB/s.
pub fn speed(r: &Row) -> f64 {
    if r.scenario == "small_requests" {
        r.req_per_s
    } else {
        r.mib_per_s
    }
}

/// A target's speed relative to nginx's in the same scenario.
pub fn ratio_to_nginx(report: &Report, scenario: &str, target: Kind) -> Option<f64> {
    let t = report.row(scenario, target)?;
    let n = report.row(scenario, Kind::Nginx)?;
    (speed(n) > 0.0).then(|| speed(t) / speed(n))
}

/// A target's CPU seconds per GiB relative to nginx's in the same scenario,
/// and how far off that may be because /proc counts CPU time in 10 ms
/// ticks: ± the ratio's relative error if each target's total is off by
/// two ticks (user and system time are truncated apart).
pub fn cpu_ratio_to_nginx(report: &Report, scenario: &str, target: Kind) -> Option<(f64, f64)> {
    const TWO_TICKS_S: f64 = 0.02;
    let t = report.row(scenario, target)?;
    let n = report.row(scenario, Kind::Nginx)?;
    let (tc, nc) = (t.cpu_s_per_gib?, n.cpu_s_per_gib?);
    let total = |r: &Row| r.cpu_s.unwrap_or(0.0) * r.repetitions.max(1) as f64;
    let (tt, nt) = (total(t), total(n));
    if nc <= 0.0 || tt <= 0.0 || nt <= 0.0 {
        return None;
    }
    Some((tc / nc, TWO_TICKS_S / tt + TWO_TICKS_S / nt))
}

/// The warm scenarios, whose CPU per GiB issue 15 holds regproxy to.
pub const WARM: [&str; 5] = [
    "images_warm",
    "warm_single",
    "warm_concurrent",
    "warm_single_discard",
    "warm_concurrent_discard",
];

/// The whole table, one line per scenario and target.
pub fn table(report: &Report) -> String {
    let mut s = String::new();
    let m = &report.machine;
    let _ = writeln!(
        s,
        "machine: {} × {} · {:.1} GiB · Linux {} · {}",
        m.nproc, m.cpu, m.mem_total_gib, m.kernel, m.started_utc
    );
    if report.rows.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "up GET, up MiB: successful blob GETs the upstream served and bytes it sent, per repetition; \
         ampl.: upstream blob bytes ÷ distinct blob bytes; \
         CPU s/GiB: the target's CPU seconds per GiB served; ×nginx: speed ÷ nginx's (MiB/s; small: req/s)"
    );
    let _ = writeln!(
        s,
        "{:<24} {:<12} {:>4} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>9} {:>6} {:>8} {:>8} {:>9} {:>6}",
        "scenario", "target", "cli", "wall s", "MiB/s", "req/s", "p50 ms", "p99 ms", "ttfb p99", "img p99", "ok", "errors", "up GET",
        "up MiB", "ampl.", "RSS MiB", "anon MiB", "CPU s/GiB", "×nginx"
    );
    for (id, _) in SCENARIOS {
        for r in report.rows.iter().filter(|r| r.scenario == id) {
            let mem = |f: fn(&crate::procs::MemPeak) -> u64| {
                r.memory
                    .as_ref()
                    .map(|p| format!("{:.1}", f(p) as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into())
            };
            let _ = writeln!(
                s,
                "{:<24} {:<12} {:>4} {:>8.2} {:>9.1} {:>8.0} {:>9.1} {:>9.1} {:>9} {:>9} {:>6} {:>6} {:>6} {:>9.1} {:>6} {:>8} {:>8} {:>9} {:>6}",
                label(report, id),
                r.target.to_string(),
                r.clients,
                r.wall_s,
                r.mib_per_s,
                r.req_per_s,
                r.p50_ms,
                r.p99_ms,
                r.ttfb_p99_ms.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
                r.image_p99_ms.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
                r.verified,
                r.errors,
                per_rep(r.upstream.blob_gets, r.repetitions),
                r.upstream.bytes as f64 / MIB / r.repetitions.max(1) as f64,
                if r.distinct_bytes > 0 { format!("{:.2}", r.amplification) } else { "-".into() },
                mem(|p| p.rss_kib),
                mem(|p| p.anon_kib),
                r.cpu_s_per_gib.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into()),
                ratio_to_nginx(report, id, r.target).map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into()),
            );
        }
    }
    s
}

/// Upstream GETs per repetition: `1`, or `1.33` when repetitions differed.
fn per_rep(n: u64, reps: usize) -> String {
    let reps = reps.max(1) as u64;
    let (whole, rest) = (n / reps, n % reps);
    if rest == 0 {
        whole.to_string()
    } else {
        format!("{:.2}", n as f64 / reps as f64)
    }
}

/// One of the issue's bars, as met or missed in this run.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub bar: String,
    pub measured: String,
    pub met: bool,
}

/// regproxy against the bars of issues 5 and 15 (only what this run
/// measured).
pub fn checks(report: &Report) -> Vec<Check> {
    let mut v = Vec::new();
    let mut ratio = |scenario: &str, min: f64, issue: &str| {
        if let Some(x) = ratio_to_nginx(report, scenario, Kind::Regproxy) {
            v.push(Check {
                what: format!("{}: regproxy speed ÷ nginx{issue}", label(report, scenario)),
                bar: format!("≥ {min:.2}"),
                measured: format!("{x:.2}"),
                met: x >= min,
            });
        }
    };
    ratio("warm_single", 0.9, "");
    ratio("warm_concurrent", 0.9, "");
    ratio("cold_concurrent", 1.0, "");
    // Issue 15: hits at sendfile cost.
    ratio("warm_single", 1.2, " (i15)");
    ratio("warm_single_discard", 1.2, " (i15)");
    ratio("warm_concurrent", 1.1, " (i15)");
    ratio("warm_concurrent_discard", 1.1, " (i15)");
    for scenario in WARM {
        if let Some((x, err)) = cpu_ratio_to_nginx(report, scenario, Kind::Regproxy) {
            v.push(Check {
                what: format!(
                    "{}: regproxy CPU s/GiB ÷ nginx's (i15)",
                    label(report, scenario)
                ),
                bar: "≤ 1.10".into(),
                measured: format!("{x:.3} (ticks ±{:.1} %)", err * 100.0),
                met: x <= 1.1,
            });
        }
    }
    if let Some(r) = report.row("cold_concurrent", Kind::Regproxy) {
        let reps = r.repetitions.max(1) as u64;
        v.push(Check {
            what: format!(
                "{}: regproxy upstream GETs of each blob ({reps} cold blobs)",
                label(report, "cold_concurrent")
            ),
            bar: "= 1".into(),
            measured: format!(
                "max {} ({} GETs for {reps} blobs)",
                r.upstream.max_gets_per_blob, r.upstream.blob_gets
            ),
            met: r.upstream.max_gets_per_blob == 1 && r.upstream.blob_gets == reps,
        });
    }
    let anon = report
        .rows
        .iter()
        .filter(|r| r.target == Kind::Regproxy)
        .filter_map(|r| r.memory.map(|m| m.anon_kib))
        .max();
    if let Some(a) = anon {
        v.push(Check {
            what: "regproxy peak RssAnon, any scenario".into(),
            bar: "≤ 64 MiB".into(),
            measured: format!("{:.1} MiB", a as f64 / 1024.0),
            met: a <= 64 * 1024,
        });
    }
    for node in ["uplink_node1", "uplink_node2"] {
        if let Some(r) = report.row(node, Kind::Regproxy) {
            v.push(Check {
                what: format!("{}: regproxy upstream amplification", label(report, node)),
                bar: "= 1.00".into(),
                measured: format!("{:.2}", r.amplification),
                met: (r.amplification - 1.0).abs() < 0.005,
            });
        }
    }
    v
}

pub fn checks_text(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let _ = writeln!(
            s,
            "{} {:<52} bar {:<9} measured {}",
            if c.met { "MET " } else { "MISS" },
            c.what,
            c.bar,
            c.measured
        );
    }
    s
}

fn color(k: Kind) -> &'static str {
    match k {
        Kind::Regproxy => "#d95f02",
        Kind::Nginx => "#1b9e77",
        Kind::Distribution => "#7570b3",
        Kind::Direct => "#9a9a9a",
    }
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A bar chart of the run: speed relative to nginx per scenario, peak
/// anonymous memory per proxy, and upstream amplification on the uplink.
pub fn svg(report: &Report) -> String {
    let (w, h) = (1000.0, 760.0);
    let targets: Vec<Kind> = report.params.targets.clone();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let m = &report.machine;
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="18" font-weight="bold">regproxy vs nginx proxy_cache, Distribution proxy, direct — one run</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="48" font-size="12" fill="#444">{} · {} cores · {:.0} GiB · {}</text>"##,
        esc(&m.cpu),
        m.nproc,
        m.mem_total_gib,
        esc(&m.started_utc)
    );
    // Legend, under the title.
    for (i, k) in targets.iter().enumerate() {
        let x = 20.0 + i as f64 * 110.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="58" width="14" height="14" fill="{}"/><text x="{}" y="70" font-size="13">{k}</text>"#,
            color(*k),
            x + 18.0
        );
    }

    // Panel 1: speed relative to nginx, log2 scale, bars grow from 1.0 up
    // (faster than nginx) or down (slower).
    let scen: Vec<&str> = SCENARIOS
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| report.rows.iter().any(|r| r.scenario == *id))
        .collect();
    let (px, py, pw, ph) = (70.0, 112.0, 900.0, 310.0);
    let ratios: Vec<f64> = scen
        .iter()
        .flat_map(|id| {
            targets
                .iter()
                .filter_map(move |k| ratio_to_nginx(report, id, *k))
        })
        .filter(|v| *v > 0.0)
        .collect();
    let hi = ratios
        .iter()
        .map(|v| v.log2())
        .fold(1.0_f64, f64::max)
        .ceil();
    let lo = ratios
        .iter()
        .map(|v| v.log2())
        .fold(-1.0_f64, f64::min)
        .floor()
        .max(-7.0);
    let _ = writeln!(
        s,
        r#"<text x="{px}" y="{}" font-size="14" font-weight="bold">Speed ÷ nginx's in the same scenario (log scale; above the line = faster than nginx)</text>"#,
        py - 14.0
    );
    let y_of = |v: f64| py + (hi - v.log2().clamp(lo, hi)) / (hi - lo) * ph;
    let mut e = lo;
    while e <= hi + 1e-9 {
        let v = 2f64.powf(e);
        let y = y_of(v);
        let text = if v >= 1.0 {
            format!("{v:.0}×")
        } else {
            format!("1/{:.0}×", 1.0 / v)
        };
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{text}</text>"##,
            px + pw,
            px - 6.0,
            y + 4.0
        );
        e += 1.0;
    }
    let base = y_of(1.0);
    let gw = pw / scen.len().max(1) as f64;
    let bw = (gw - 14.0) / targets.len().max(1) as f64;
    for (gi, id) in scen.iter().enumerate() {
        let gx = px + gi as f64 * gw + 7.0;
        for (ti, k) in targets.iter().enumerate() {
            let Some(v) = ratio_to_nginx(report, id, *k).filter(|v| *v > 0.0) else {
                continue;
            };
            let x = gx + ti as f64 * bw;
            let y = y_of(v);
            let (top, height) = if y < base {
                (y, base - y)
            } else {
                (base, y - base)
            };
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{k}: {v:.2}× nginx</title></rect>"#,
                bw - 2.0,
                height.max(1.5),
                color(*k)
            );
            let ty = if y <= base { y - 3.0 } else { y + 11.0 };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{ty:.1}" font-size="9.5" text-anchor="middle">{v:.2}</text>"#,
                x + (bw - 2.0) / 2.0
            );
        }
        let cx = gx + (gw - 14.0) / 2.0;
        let name = label(report, id);
        let (first, second) = two_lines(&name);
        for (line, text) in [first, second].into_iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{cx:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
                py + ph + 16.0 + line as f64 * 13.0,
                esc(text)
            );
        }
        if let Some(r) = report.row(id, Kind::Nginx) {
            let a = if *id == "small_requests" {
                format!("nginx {:.0} req/s", r.req_per_s)
            } else {
                format!("nginx {:.0} MiB/s", r.mib_per_s)
            };
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{}" font-size="10" fill="#555" text-anchor="middle">{}</text>"##,
                py + ph + 43.0,
                esc(&a)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<line x1="{px}" y1="{base:.1}" x2="{}" y2="{base:.1}" stroke="#1b9e77" stroke-width="1.5"/>"##,
        px + pw
    );

    // Panel 2: peak anonymous memory per proxy.
    let (qx, qy, qw, qh) = (70.0, 520.0, 400.0, 190.0);
    let peaks: Vec<(Kind, f64, f64)> = targets
        .iter()
        .filter_map(|k| {
            let mems: Vec<_> = report
                .rows
                .iter()
                .filter(|r| r.target == *k)
                .filter_map(|r| r.memory)
                .collect();
            (!mems.is_empty()).then(|| {
                (
                    *k,
                    mems.iter().map(|m| m.anon_kib).max().unwrap_or(0) as f64 / 1024.0,
                    mems.iter().map(|m| m.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
                )
            })
        })
        .collect();
    let mtop = peaks.iter().map(|p| p.1).fold(80.0, f64::max) * 1.15;
    let _ = writeln!(
        s,
        r#"<text x="{qx}" y="{}" font-size="14" font-weight="bold">Peak anonymous memory (RssAnon), MiB, any scenario</text>"#,
        qy - 22.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{qx}" y="{}" font-size="11" fill="#555">lower is better; dashed: the 64 MiB bar; (RSS) also counts mapped cache files</text>"##,
        qy - 8.0
    );
    let my = |v: f64| qy + qh - v / mtop * qh;
    let _ = writeln!(
        s,
        r##"<line x1="{qx}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
        qy + qh,
        qx + qw,
        qy + qh
    );
    let _ = writeln!(
        s,
        r##"<line x1="{qx}" y1="{y}" x2="{}" y2="{y}" stroke="#d95f02" stroke-dasharray="6,4"/><text x="{}" y="{}" font-size="10" fill="#d95f02" text-anchor="end">64 MiB</text>"##,
        qx + qw,
        qx - 4.0,
        my(64.0) + 4.0,
        y = my(64.0)
    );
    let slot = qw / peaks.len().max(1) as f64;
    for (i, (k, anon, rss)) in peaks.iter().enumerate() {
        let x = qx + i as f64 * slot + slot * 0.2;
        let y = my(*anon);
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="middle">{anon:.1} (RSS {rss:.0})</text><text x="{:.1}" y="{}" font-size="11.5" text-anchor="middle">{k}</text>"#,
            slot * 0.6,
            qy + qh - y,
            color(*k),
            x + slot * 0.3,
            y - 4.0,
            x + slot * 0.3,
            qy + qh + 15.0
        );
    }

    // Panel 3: uplink amplification.
    let (ux, uy, uw, uh) = (560.0, 520.0, 410.0, 190.0);
    let amps: Vec<(Kind, f64, f64)> = targets
        .iter()
        .filter_map(|k| {
            let a = report.row("uplink_node1", *k)?.amplification;
            let b = report
                .row("uplink_node2", *k)
                .map(|r| r.amplification)
                .unwrap_or(0.0);
            Some((*k, a, b))
        })
        .collect();
    if !amps.is_empty() {
        let atop = (amps.iter().map(|a| a.1.max(a.2)).fold(2.0, f64::max) * 1.15).ceil();
        let ay = |v: f64| uy + uh - v / atop * uh;
        let _ = writeln!(
            s,
            r#"<text x="{ux}" y="{}" font-size="14" font-weight="bold">Uplink ({} Mbit/s): upstream ÷ distinct bytes</text>"#,
            uy - 22.0,
            report.params.uplink_mbit
        );
        let _ = writeln!(
            s,
            r##"<text x="{ux}" y="{}" font-size="11" fill="#555">{} clients per node; lower is better, 1.00 = each blob once; node 1 | node 2</text>"##,
            uy - 8.0,
            report.params.uplink_clients
        );
        let _ = writeln!(
            s,
            r##"<line x1="{ux}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
            uy + uh,
            ux + uw,
            uy + uh
        );
        let _ = writeln!(
            s,
            r##"<line x1="{ux}" y1="{y}" x2="{}" y2="{y}" stroke="#555" stroke-dasharray="6,4"/><text x="{}" y="{}" font-size="10" text-anchor="end">1.00</text>"##,
            ux + uw,
            ux - 4.0,
            ay(1.0) + 4.0,
            y = ay(1.0)
        );
        let slot = uw / amps.len() as f64;
        for (i, (k, a, b)) in amps.iter().enumerate() {
            for (j, v) in [a, b].into_iter().enumerate() {
                let x = ux + i as f64 * slot + slot * 0.15 + j as f64 * slot * 0.36;
                let y = ay(*v);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}" opacity="{}"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{v:.2}</text>"#,
                    slot * 0.33,
                    uy + uh - y,
                    color(*k),
                    if j == 0 { "1" } else { "0.65" },
                    x + slot * 0.165,
                    y - 3.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" font-size="11.5" text-anchor="middle">{k}</text>"#,
                ux + i as f64 * slot + slot * 0.5,
                uy + uh + 15.0
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="20" y="{}" font-size="10.5" fill="#555">Every blob verified at the client (sha256; discard: its length). A fresh cache per target; upstream: Distribution 2.8, a process per target, one storage; one machine, one run.</text>"##,
        h - 14.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::compare::{Machine, Params};
    use crate::procs::UpstreamUse;
    use clap::Parser;

    /// `loadtest compare`'s defaults.
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        params: Params,
    }

    /// A row of `scenario` on `target`: 11 repetitions at `mib_per_s`, each
    /// costing `cpu_s` for 1 GiB.
    fn row(scenario: &'static str, target: Kind, mib_per_s: f64, cpu_s: f64) -> Row {
        Row {
            scenario,
            target,
            clients: 1,
            wall_s: 1024.0 / mib_per_s,
            mib_per_s,
            req_per_s: 1.0,
            p50_ms: 1.0,
            p99_ms: 1.0,
            ttfb_p50_ms: None,
            ttfb_p99_ms: None,
            image_p50_ms: None,
            image_p99_ms: None,
            repetitions: 11,
            requests: 1,
            verified: 1,
            errors: 0,
            first_errors: Vec::new(),
            upstream: UpstreamUse::default(),
            distinct_bytes: 1 << 30,
            amplification: 0.0,
            memory: None,
            proxy_upstream_bytes: None,
            proxy_sendfile_bytes: None,
            cpu_s: Some(cpu_s),
            cpu_s_per_gib: Some(cpu_s),
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            machine: Machine {
                nproc: 2,
                cpu: "test".into(),
                mem_total_gib: 1.0,
                kernel: "test".into(),
                started_utc: "now".into(),
            },
            params: Defaults::parse_from(["compare"]).params,
            rows,
            cluster: None,
            budget: None,
        }
    }

    fn check<'a>(checks: &'a [Check], what: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.what.starts_with(what))
            .unwrap_or_else(|| panic!("a check {what:?} among {checks:#?}"))
    }

    #[test]
    fn issue_15_holds_warm_hits_to_nginx_speed_and_cpu() {
        let r = report(vec![
            row("warm_single_discard", Kind::Regproxy, 3000.0, 0.105),
            row("warm_single_discard", Kind::Nginx, 2500.0, 0.1),
            row("warm_concurrent_discard", Kind::Regproxy, 2150.0, 0.2),
            row("warm_concurrent_discard", Kind::Nginx, 2000.0, 0.1),
            // No nginx row: no ratio, no check.
            row("warm_single", Kind::Regproxy, 1000.0, 0.1),
        ]);
        let c = checks(&r);
        let single = "warm discard 1× 256 MiB: regproxy ";
        let speed = check(&c, &format!("{single}speed ÷ nginx (i15)"));
        assert_eq!(
            (speed.bar.as_str(), speed.measured.as_str()),
            ("≥ 1.20", "1.20")
        );
        assert!(speed.met, "1.20× nginx meets the 1.2 bar: {speed:?}");
        let cpu = check(&c, &format!("{single}CPU s/GiB"));
        assert!(cpu.met, "1.05× nginx's CPU is within 1.1×: {cpu:?}");
        assert_eq!(
            cpu.measured, "1.050 (ticks ±3.5 %)",
            "0.02 s of 1.155 and 1.1 s"
        );
        let many = "warm discard 32× 16 MiB: regproxy ";
        let speed = check(&c, &format!("{many}speed"));
        assert!(!speed.met, "1.08× misses the 1.1 bar: {speed:?}");
        let cpu = check(&c, &format!("{many}CPU s/GiB"));
        assert!(!cpu.met, "2× nginx's CPU misses the bar: {cpu:?}");
        assert!(
            !c.iter().any(|c| c.what.starts_with("warm 1× 256 MiB")),
            "a scenario without nginx has no ratio to check: {c:#?}"
        );
    }

    #[test]
    fn the_cpu_ratio_says_how_coarse_the_ticks_were() {
        // 0.1 s of CPU in all: two 10 ms ticks are 20 % of each side.
        let r = report(vec![
            row("warm_single", Kind::Regproxy, 1.0, 0.1 / 11.0),
            row("warm_single", Kind::Nginx, 1.0, 0.1 / 11.0),
        ]);
        let (x, err) = cpu_ratio_to_nginx(&r, "warm_single", Kind::Regproxy).unwrap();
        assert!(
            (x - 1.0).abs() < 1e-9 && (err - 0.4).abs() < 1e-9,
            "{x} ± {err}"
        );
    }

    #[test]
    fn chart_labels_break_before_the_count() {
        assert_eq!(two_lines("cold 10× 256 MiB"), ("cold", "10× 256 MiB"));
        assert_eq!(
            two_lines("warm discard 32× 16 MiB"),
            ("warm discard", "32× 16 MiB")
        );
        assert_eq!(two_lines("uplink node1 6×"), ("uplink node1", "6×"));
        assert_eq!(two_lines("no count"), ("no count", ""));
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(256 << 20), "256.0 MiB");
        assert_eq!(short(512 << 10), "512 KiB");
        assert_eq!(short(3 << 29), "1.5 GiB");
    }
}
