//! Replays every checked-in fuzz input, `fuzz/corpus/<target>/*` and
//! `fuzz/regressions/<target>/*`, through the same target bodies the fuzzer
//! runs (`regproxy::fuzzing`), on stable: an input that once crashed a
//! target, or that the corpus covers, fails `cargo test` if it panics again.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_checked_in_fuzz_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    // The bodies' panics are caught and listed below, not printed one by one.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for (target, body) in regproxy::fuzzing::TARGETS {
        let corpus = inputs(&fuzz.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target}/ should hold the target's corpus (scripts/fuzz.sh makes it)"
        );
        for path in corpus
            .iter()
            .chain(&inputs(&fuzz.join("regressions").join(target)))
        {
            let data = match std::fs::read(path) {
                Ok(data) => data,
                Err(e) => {
                    failures.push(format!("{target}: {}: unreadable: {e}", path.display()));
                    continue;
                }
            };
            if let Err(panic) = std::panic::catch_unwind(|| body(&data)) {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
                    .to_owned();
                failures.push(format!("{target}: {}: {why}", path.display()));
            }
        }
    }
    std::panic::set_hook(quiet);
    let _ = std::fs::remove_dir_all(regproxy::fuzzing::workdir());
    assert!(
        failures.is_empty(),
        "every checked-in fuzz input should pass its target; these panicked:\n{}",
        failures.join("\n")
    );
}
