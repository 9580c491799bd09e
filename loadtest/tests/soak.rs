//! A 60-second `loadtest soak` against the real programs: Distribution as
//! the upstream behind a gate, regproxy on a tmpfs cache, mixed traffic from
//! the loadtest's clients and `skopeo`, and every fault kind at random
//! moments. Every completed response must be the truth (0 wrong), every
//! fault kind must have been injected, regproxy's memory and fds must stay
//! flat (a generous bound, not a timing) and its cache within the cap.
//!
//! The oracle and the checks have unit tests of their own with a planted
//! wrong body (`soak::oracle`, `soak::report`): one wrong response fails
//! the soak, and so this test.
//!
//! It needs root (the tmpfs), `docker-registry` and `skopeo` (installed by
//! `scripts/deps.sh`), and builds the regproxy binary itself with cargo, in
//! the profile this test was built in; `REGPROXY_BIN` overrides that. The
//! seed comes from the clock and is printed; `REGPROXY_SOAK_SEED` replays one.

mod support;

use support::regproxy_bin;

use std::process::Command;

use serde_json::Value;

#[test]
fn a_minute_of_faults_gives_no_wrong_answer() {
    let regproxy = regproxy_bin();
    let dir = tempfile::tempdir().expect("a temp dir");
    let out_dir = dir.path().join("out");
    let seed = std::env::var("REGPROXY_SOAK_SEED").unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string()
    });
    eprintln!("soak seed {seed} (replay with REGPROXY_SOAK_SEED={seed})");
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["soak", "--duration", "60s", "--seed", &seed])
        .arg("--regproxy-bin")
        .arg(&regproxy)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--out")
        .arg(&out_dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("loadtest should start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest soak should pass every check (seed {seed})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let r: Value = serde_json::from_slice(
        &std::fs::read(out_dir.join("soak.json")).expect("the JSON should be written"),
    )
    .expect("the JSON should parse");
    let t = &r["totals"];
    assert_eq!(
        t["wrong"], 0,
        "no completed response may be wrong: {:?}\n{stdout}",
        r["tally"]["wrong_examples"]
    );
    assert!(
        t["right"].as_u64().unwrap_or(0) >= 100,
        "the soak should complete requests: {t}\n{stdout}"
    );
    for kind in [
        "upstream restart",
        "gate cut",
        "corrupt upstream blob",
        "full disk",
        "regproxy rollout",
    ] {
        assert!(
            r["faults"][kind].as_u64().unwrap_or(0) >= 1,
            "the fault {kind:?} should have been injected: {}\n{stdout}",
            r["faults"]
        );
    }
    for op in [
        "docker pull",
        "containerd pull",
        "range",
        "head",
        "push",
        "hang up",
    ] {
        assert!(
            r["tally"]["by_op"][op]["right"].as_u64().unwrap_or(0) >= 1,
            "{op} should have completed at least once: {}",
            r["tally"]["by_op"]
        );
    }
    // Flat: the peak of the second half at most 1.5× that of the second
    // quarter plus room (16 MiB of anonymous memory, 32 fds).
    for (what, room) in [("anon_kib", 16 << 10), ("fds", 32)] {
        let (early, late) = (
            r[what]["early"].as_u64().unwrap(),
            r[what]["late"].as_u64().unwrap(),
        );
        assert!(
            early > 0 && late <= early + early / 2 + room,
            "regproxy's {what} should stay flat: {early} then {late}\n{stdout}"
        );
    }
    let (cache, cap) = (
        r["cache_max_bytes"].as_u64().unwrap(),
        r["cap_bytes"].as_u64().unwrap(),
    );
    assert!(
        cache > 0 && cache <= cap,
        "the cache should stay within its cap: {cache} of {cap}"
    );
    assert_eq!(
        r["log"]["panics"], 0,
        "regproxy should not panic: {}",
        r["log"]
    );
    for c in r["checks"].as_array().expect("checks") {
        assert_eq!(c["met"], true, "every check should be met: {c}");
    }
    let svg = std::fs::read_to_string(out_dir.join("soak.svg")).expect("the SVG should be written");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("polyline"),
        "the plot should be a whole SVG document with lines"
    );
}
