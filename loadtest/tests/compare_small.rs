//! A short `loadtest compare` on small blobs, against the real programs:
//! Distribution as the upstream, regproxy, Distribution's proxy mode, nginx
//! and direct, plus the shaped uplink in a network namespace. It checks that
//! the harness works and that regproxy is correct (every blob verified, no
//! errors, one upstream fetch for concurrent cold clients, amplification 1.00
//! on the uplink), not how fast anything is.
//!
//! It needs root (for `ip netns`), `docker-registry` and `nginx` (installed
//! by `scripts/deps.sh`), and builds the regproxy binary itself with cargo,
//! in the profile this test was built in (`target/debug/regproxy` under
//! `cargo test`); `REGPROXY_BIN` overrides that.

mod support;

use support::{compare, Compared};

use std::time::Duration;

use serde_json::Value;

fn rows<'a>(report: &'a Value, scenario: &str) -> Vec<&'a Value> {
    report["report"]["rows"]
        .as_array()
        .expect("the JSON has rows")
        .iter()
        .filter(|r| r["scenario"] == scenario)
        .collect()
}

fn row<'a>(report: &'a Value, scenario: &str, target: &str) -> &'a Value {
    rows(report, scenario)
        .into_iter()
        .find(|r| r["target"] == target)
        .unwrap_or_else(|| panic!("the report should have a {scenario} row for {target}"))
}

#[test]
fn a_short_compare_verifies_everything_and_regproxy_fetches_once() {
    let Compared { report, stdout } = compare(
        &[
            "--targets",
            "regproxy,nginx,distribution,direct",
            // Every scenario but `cluster`, which tests/cluster.rs runs.
            "--scenarios",
            "cold_concurrent,images_cold,images_warm,warm_single,warm_concurrent,\
             warm_single_discard,warm_concurrent_discard,small_requests,uplink_node1,\
             uplink_node2",
            "--big",
            "2MiB",
            "--medium",
            "512KiB",
            "--cold-clients",
            "10",
            "--cold-repeat",
            "2",
            "--warm-clients",
            "8",
            // 4 GETs of the 2 MiB blob in a row; 2 each for 8 clients of 512 KiB.
            "--discard-bytes",
            "8MiB",
            "--repeat",
            "1",
            "--images",
            "2",
            "--shared-layers",
            "1MiB",
            "--unique-layers",
            "512KiB,4KiB",
            "--image-clients",
            "3",
            "--small-workers",
            "4",
            "--small-duration",
            "300ms",
            "--uplink-mbit",
            "400",
            "--uplink-images",
            "2",
            "--uplink-shared",
            "1MiB",
            "--uplink-unique",
            "256KiB",
            "--uplink-clients",
            "4",
        ],
        "--svg",
        // 40 rows of up to --scenario-timeout 60s each would take 40 minutes.
        Duration::from_secs(600),
    );
    assert!(
        stdout.contains("regproxy") && stdout.contains("×nginx"),
        "the table should be printed:\n{stdout}"
    );

    let all = report["report"]["rows"].as_array().expect("rows");
    assert_eq!(
        all.len(),
        4 * 10,
        "every target should report all ten scenarios"
    );
    for r in all {
        assert_eq!(
            r["errors"], 0,
            "no request should fail or fail to verify: {r}"
        );
        assert!(
            r["verified"].as_u64().unwrap_or(0) > 0,
            "every scenario should verify responses: {r}"
        );
        assert_eq!(
            r["verified"], r["requests"],
            "every request should have been verified: {r}"
        );
    }

    let cold = row(&report, "cold_concurrent", "regproxy");
    assert_eq!(
        cold["repetitions"], 2,
        "the cold scenario should run once per fresh blob"
    );
    assert_eq!(
        cold["verified"], 10,
        "ten cold clients should each get the verified blob"
    );
    assert_eq!(
        cold["upstream"]["max_gets_per_blob"], 1,
        "ten concurrent cold clients through regproxy should make exactly one upstream GET per blob: {cold}"
    );
    assert_eq!(
        cold["upstream"]["blob_gets"], 2,
        "two cold blobs through regproxy should make two upstream GETs in all: {cold}"
    );
    assert_eq!(
        cold["proxy_upstream_bytes"], cold["upstream"]["blob_bytes"],
        "regproxy's regproxy_upstream_bytes_total should agree with the upstream's access log: {cold}"
    );
    let direct = row(&report, "cold_concurrent", "direct");
    assert_eq!(
        direct["upstream"]["blob_gets"], 20,
        "the upstream access log should count ten direct GETs of each blob (else the counter is broken): {direct}"
    );
    for node in ["uplink_node1", "uplink_node2"] {
        let r = row(&report, node, "regproxy");
        let amp = r["amplification"].as_f64().expect("amplification");
        assert!(
            (amp - 1.0).abs() < 1e-9,
            "regproxy on {node} should fetch each distinct blob exactly once, amplification {amp}: {r}"
        );
    }
    for scenario in ["cold_concurrent", "warm_concurrent"] {
        let r = row(&report, scenario, "regproxy");
        assert!(
            r["memory"]["rss_kib"].as_u64().unwrap_or(0) > 0,
            "regproxy's memory should have been sampled in {scenario}: {r}"
        );
    }
    // The peers' own behaviour is reported, not asserted: this suite tests
    // regproxy and the harness.
    for (scenario, gets) in [("warm_single_discard", 4), ("warm_concurrent_discard", 16)] {
        for target in ["regproxy", "nginx", "distribution", "direct"] {
            let r = row(&report, scenario, target);
            assert_eq!(
                r["requests"], gets,
                "each discarding client should GET its blob until the total is moved: {r}"
            );
        }
    }
    for scenario in [
        "images_warm",
        "warm_single",
        "warm_concurrent",
        "warm_single_discard",
        "warm_concurrent_discard",
    ] {
        let r = row(&report, scenario, "regproxy");
        assert_eq!(
            r["upstream"]["blob_gets"], 0,
            "a warm blob should come from regproxy's cache in {scenario}: {r}"
        );
    }
}
