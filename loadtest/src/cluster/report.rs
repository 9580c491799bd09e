//! The cluster scenario for a person: its table, its checks against issue
//! 11's bars, and its chart.

use std::fmt::Write as _;

use super::{ClusterReport, Run, Setup};
use crate::compare::Machine;
use crate::report::{esc, human, Check};

const MIB: f64 = (1u64 << 20) as f64;

/// One line per setup.
pub fn table(c: &ClusterReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cluster: {} nodes × {} clients, {} ({} blobs, {} distinct), one {} Mbit/s uplink",
        c.nodes,
        c.clients_per_node,
        c.images.join(", "),
        c.blobs,
        human(c.distinct_bytes),
        c.mbit
    );
    let _ = writeln!(
        s,
        "ampl.: upstream blob bytes (its access log) ÷ distinct blob bytes; wire MiB: what the upstream's end of the uplink \
         sent (all traffic), wire×: that ÷ distinct blob bytes; pull p50/p99: per client and image; first/last s: until the \
         first/last node's clients all had the images; peer MiB, fallb: what the nodes got from peers, peer misses that fell \
         back to the upstream"
    );
    let dash = || "-".to_string();
    let _ = writeln!(
        s,
        "{:<20} {:>6} {:>7} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8} {:>8} {:>6} {:>6} {:>9} {:>5}",
        "setup",
        "ampl.",
        "up GET",
        "up MiB",
        "wire MiB",
        "wire×",
        "pull p50",
        "pull p99",
        "first s",
        "last s",
        "ok",
        "errors",
        "peer MiB",
        "fallb"
    );
    for r in &c.runs {
        let wire = r.uplink_down_bytes;
        let _ = writeln!(
            s,
            "{:<20} {:>6.2} {:>7} {:>9.1} {:>9} {:>6} {:>8.0}ms {:>8.0}ms {:>8.2} {:>8.2} {:>6} {:>6} {:>9} {:>5}",
            r.setup.label(),
            r.amplification,
            r.upstream.blob_gets,
            r.upstream.blob_bytes as f64 / MIB,
            wire.map(|b| format!("{:.1}", b as f64 / MIB)).unwrap_or_else(dash),
            wire.filter(|_| c.distinct_bytes > 0)
                .map(|b| format!("{:.2}", b as f64 / c.distinct_bytes as f64))
                .unwrap_or_else(dash),
            r.pull_p50_ms,
            r.pull_p99_ms,
            r.first_node_s,
            r.last_node_s,
            r.verified,
            r.errors,
            r.peer_bytes_received
                .map(|b| format!("{:.1}", b as f64 / MIB))
                .unwrap_or_else(dash),
            r.peer_fallbacks.map(|n| n.to_string()).unwrap_or_else(dash),
        );
    }
    for r in &c.runs {
        if let Some(k) = &r.killed {
            let _ = writeln!(
                s,
                "{}: node {} (owner of {}…) killed {}, after serving {} to its peers; its own clients saw {} errors (expected), the other nodes {}",
                r.setup.label(),
                k.node,
                &k.owner_of[..k.owner_of.len().min(19)],
                k.at_s
                    .map(|t| format!("at {t:.2}s"))
                    .unwrap_or_else(|| "never (the others finished first)".into()),
                human(k.served_bytes),
                k.errors_on_node,
                r.errors
            );
        }
    }
    s
}

/// The cluster against issue 11's bars (only what this run measured).
pub fn checks(c: &ClusterReport) -> Vec<Check> {
    let mut v = Vec::new();
    let n = c.nodes;
    if let Some(r) = c.run(Setup::Peers) {
        v.push(Check {
            what: format!("cluster {n} nodes, peers on: amplification per cluster"),
            bar: "≤ 1.05".into(),
            measured: format!("{:.2}", r.amplification),
            met: r.amplification <= 1.05 && r.errors == 0,
        });
    }
    if let Some(r) = c.run(Setup::NoPeers) {
        v.push(Check {
            what: format!("cluster {n} nodes, peers off: amplification per cluster"),
            bar: format!("≈ {n}.00"),
            measured: format!("{:.2}", r.amplification),
            met: (r.amplification - n as f64).abs() <= 0.05 * n as f64 && r.errors == 0,
        });
    }
    if let (Some(on), Some(off)) = (c.run(Setup::Peers), c.run(Setup::NoPeers)) {
        v.push(Check {
            what: "cluster: last node done, peers on vs off".into(),
            bar: "on < off".into(),
            measured: format!("{:.2}s vs {:.2}s", on.last_node_s, off.last_node_s),
            met: on.last_node_s < off.last_node_s,
        });
    }
    if let Some(r) = c.run(Setup::PeersKill) {
        let killed = r.killed.as_ref().is_some_and(|k| k.at_s.is_some());
        v.push(Check {
            what: "cluster, a node killed mid-blob: the others verify every blob".into(),
            bar: "0 errors".into(),
            measured: format!(
                "{} errors, {} verified{}",
                r.errors,
                r.verified,
                if killed { "" } else { " (no node was killed)" }
            ),
            met: killed && r.errors == 0 && r.verified > 0,
        });
    }
    v
}

/// Errors that fail the run: requests on nodes that were not killed.
pub fn errors(c: &ClusterReport) -> u64 {
    c.runs.iter().map(|r| r.errors).sum()
}

fn color(s: Setup) -> &'static str {
    match s {
        Setup::Peers => "#d95f02",
        Setup::NoPeers => "#7570b3",
        Setup::Direct => "#9a9a9a",
        Setup::PeersKill => "#e6ab02",
    }
}

/// Two panels: amplification per setup, and per-node completion times
/// (every node a dot, the last node's time as the bar).
pub fn svg(c: &ClusterReport, m: &Machine) -> String {
    let (w, h) = (1000.0, 530.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="18" font-weight="bold">regproxy cluster: {} nodes behind one {} Mbit/s uplink, {} clients per node</text>"#,
        c.nodes, c.mbit, c.clients_per_node
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="48" font-size="12" fill="#444">{} ({} distinct) · {} · {} cores · {:.0} GiB · {}</text>"##,
        esc(&c.images.join(", ")),
        human(c.distinct_bytes),
        esc(&m.cpu),
        m.nproc,
        m.mem_total_gib,
        esc(&m.started_utc)
    );
    let runs: Vec<&Run> = c.runs.iter().collect();
    let slot_labels = |s: &mut String, x0: f64, slot: f64, y: f64| {
        for (i, r) in runs.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{y}" font-size="11.5" text-anchor="middle">{}</text>"#,
                x0 + i as f64 * slot + slot / 2.0,
                esc(r.setup.label())
            );
        }
    };

    // Panel 1: amplification, log2 scale so 1.00 and N×clients both read.
    let (ax, ay, aw, ah) = (70.0, 110.0, 400.0, 330.0);
    let tallest = runs
        .iter()
        .map(|r| r.amplification)
        .fold(c.nodes as f64, f64::max)
        .max(2.0);
    // Room above the tallest bar for its label.
    let top = (tallest * 1.3).log2().ceil();
    let y_of = |v: f64| ay + ah - (v.max(0.5).log2() + 1.0) / (top + 1.0) * ah;
    let _ = writeln!(
        s,
        r#"<text x="{ax}" y="{}" font-size="14" font-weight="bold">Upstream ÷ distinct blob bytes (log scale)</text>"#,
        ay - 24.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{ax}" y="{}" font-size="11" fill="#555">lower is better; 1.00 = each blob crossed the uplink once per cluster</text>"##,
        ay - 10.0
    );
    let mut e = -1.0;
    while e <= top + 1e-9 {
        let v = 2f64.powf(e);
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{ax}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            ax + aw,
            ax - 6.0,
            y + 4.0,
            if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
        e += 1.0;
    }
    let slot = aw / runs.len().max(1) as f64;
    for (i, r) in runs.iter().enumerate() {
        let x = ax + i as f64 * slot + slot * 0.2;
        let y = y_of(r.amplification);
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.2}</text>"#,
            slot * 0.6,
            (ay + ah - y).max(1.5),
            color(r.setup),
            x + slot * 0.3,
            y - 4.0,
            r.amplification
        );
    }
    slot_labels(&mut s, ax, slot, ay + ah + 16.0);

    // Panel 2: time until each node had the images.
    let (tx, ty, tw, th) = (560.0, 110.0, 410.0, 330.0);
    let tmax = runs.iter().map(|r| r.last_node_s).fold(1.0, f64::max) * 1.12;
    let t_of = |v: f64| ty + th - v / tmax * th;
    let _ = writeln!(
        s,
        r#"<text x="{tx}" y="{}" font-size="14" font-weight="bold">Until each node had the images, s</text>"#,
        ty - 24.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{tx}" y="{}" font-size="11" fill="#555">bar: the last node; dots: every node (killed node left out); lower is better</text>"##,
        ty - 10.0
    );
    let step = nice_step(tmax / 5.0);
    let decimals = if step >= 1.0 { 0 } else { 1 };
    for i in 0.. {
        let t = i as f64 * step;
        if t > tmax {
            break;
        }
        let y = t_of(t);
        let _ = writeln!(
            s,
            r##"<line x1="{tx}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{t:.decimals$}</text>"##,
            tx + tw,
            tx - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{tx}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
        ty + th,
        tx + tw,
        ty + th
    );
    let slot = tw / runs.len().max(1) as f64;
    for (i, r) in runs.iter().enumerate() {
        let x = tx + i as f64 * slot + slot * 0.2;
        let y = t_of(r.last_node_s);
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}" opacity="0.8"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.1}</text>"#,
            slot * 0.6,
            (ty + th - y).max(1.5),
            color(r.setup),
            x + slot * 0.3,
            y - 8.0,
            r.last_node_s
        );
        for t in r.node_s.iter().flatten() {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="black"/>"#,
                x + slot * 0.3,
                t_of(*t)
            );
        }
    }
    slot_labels(&mut s, tx, slot, ty + th + 16.0);
    let _ = writeln!(
        s,
        r##"<text x="20" y="{}" font-size="10.5" fill="#555">Every node a network namespace with its own regproxy and empty cache, on one bridge; the upstream (Distribution 2.8) behind one veth shaped with tc tbf.</text>"##,
        h - 30.0
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="{}" font-size="10.5" fill="#555">Each setup on fresh caches, one after the other, same run; every blob verified by sha256 at the client; amplification from the upstream's access log.</text>"##,
        h - 14.0
    );
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.max(1e-3).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_one_two_or_five() {
        assert_eq!(nice_step(0.9), 1.0);
        assert_eq!(nice_step(1.07), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(12.0), 20.0);
    }
}
