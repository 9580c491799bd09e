//! The `budget` scenario of `loadtest compare`, end to end on small images:
//! a rollout pull across the shaped uplink while regproxy prefetches a
//! larger image, with no prefetch, with `--upstream-rate` and without it.
//! It checks behaviour, not timings: in every setup the rollout pull
//! verifies every blob, and every prefetch completes.
//!
//! It needs root (for `ip netns`, `tc`) and `docker-registry`, and builds
//! the regproxy binary itself (`REGPROXY_BIN` overrides that).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{compare, Compared};

fn run<'a>(budget: &'a Value, setup: &str) -> &'a Value {
    budget["runs"]
        .as_array()
        .expect("the budget report has runs")
        .iter()
        .find(|r| r["setup"] == setup)
        .unwrap_or_else(|| panic!("the budget report should have a {setup} run: {budget}"))
}

#[test]
fn a_rollout_pull_and_a_prefetch_both_complete_shaped_and_unshaped() {
    let Compared { report, stdout } = compare(
        &[
            "--scenarios",
            "budget",
            "--uplink-mbit",
            "100",
            "--budget-rollout-layers",
            "4MiB,1MiB",
            "--budget-prefetch-layers",
            "16MiB,8MiB",
            "--budget-head-start",
            "1MiB",
        ],
        "--svg",
        // About 10 s normally.
        Duration::from_secs(240),
    );
    let budget = &report["report"]["budget"];
    assert_eq!(budget["mbit"], 100, "the report should say 100 Mbit/s");
    for setup in ["no_prefetch", "shaped", "unshaped"] {
        let r = run(budget, setup);
        assert_eq!(
            r["errors"], 0,
            "{setup}: no request of the rollout pull should fail: {r}"
        );
        // The image's config and two layers, for the one client.
        assert_eq!(
            r["verified"], 4,
            "{setup}: the client should verify the manifest, the config and both layers: {r}"
        );
        assert!(
            r["pull_s"].as_f64().is_some_and(|s| s > 0.0),
            "{setup}: the pull should have a time: {r}"
        );
    }
    assert!(
        run(budget, "no_prefetch")["prefetch"].is_null(),
        "the baseline runs no prefetch"
    );
    for setup in ["shaped", "unshaped"] {
        let r = run(budget, setup);
        assert_eq!(
            r["prefetch"]["ok"], true,
            "{setup}: the prefetch should complete without an error: {r}"
        );
        // The prefetched image's two layers at least, fetched across the
        // uplink once.
        assert!(
            r["upstream"]["blob_bytes"].as_u64().unwrap_or(0) >= (29 << 20),
            "{setup}: the upstream should have sent both images' layers: {r}"
        );
    }
    assert_eq!(
        run(budget, "shaped")["rate"],
        "95Mbit/s",
        "the shaped setup's rate should default to 95 % of the uplink"
    );
    assert!(
        stdout.contains("prefetch, shaped") && stdout.contains("no prefetch"),
        "the table should be printed:\n{stdout}"
    );
}
