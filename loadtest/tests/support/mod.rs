//! What the loadtest's black-box tests share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds regproxy next to the loadtest binary under test and returns its path.
pub fn regproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REGPROXY_BIN") {
        return PathBuf::from(p);
    }
    let loadtest = Path::new(env!("CARGO_BIN_EXE_loadtest"));
    let dir = loadtest
        .parent()
        .expect("the loadtest binary has a directory");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ is in the workspace");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace)
        .args(["build", "-p", "regproxy", "--bin", "regproxy"]);
    if dir.ends_with("release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("cargo should start");
    assert!(
        status.success(),
        "building the regproxy binary should succeed"
    );
    let bin = dir.join("regproxy");
    assert!(bin.is_file(), "cargo should have built {}", bin.display());
    bin
}

/// What a `loadtest compare` run left: its JSON report and its table.
#[allow(dead_code)] // soak.rs shares this module.
pub struct Compared {
    pub report: serde_json::Value,
    pub stdout: String,
}

/// Runs `loadtest compare` with `args` (its scenarios and their sizes) and
/// the flags every test run shares (regproxy as built here, a temp work
/// dir, short timeouts), writing its chart with `svg_flag`. Asserts that it
/// finished without errors, within `bound`, and that the chart is a whole
/// SVG document. `bound` is not a measure of speed (the machine may be
/// loaded): a bound far above a normal run that still catches a harness
/// waiting out its timeouts instead of finishing.
#[allow(dead_code)] // soak.rs shares this module.
pub fn compare(args: &[&str], svg_flag: &str, bound: std::time::Duration) -> Compared {
    let regproxy = regproxy_bin();
    let dir = tempfile::tempdir().expect("a temp dir");
    let (json, svg) = (dir.path().join("report.json"), dir.path().join("chart.svg"));
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("compare")
        .args(args)
        .args(["--timeout", "30s", "--scenario-timeout", "60s"])
        .arg("--regproxy-bin")
        .arg(&regproxy)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .arg("--json")
        .arg(&json)
        .arg(svg_flag)
        .arg(&svg)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("loadtest should start");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadtest compare {args:?} should finish without errors\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        started.elapsed() < bound,
        "a short compare should stay short, took {:?}",
        started.elapsed()
    );
    let chart = std::fs::read_to_string(&svg).expect("the chart should be written");
    assert!(
        chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"),
        "the chart should be a whole SVG document"
    );
    let report = std::fs::read(&json).expect("the JSON should be written");
    Compared {
        report: serde_json::from_slice(&report).expect("the JSON should parse"),
        stdout,
    }
}
