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
