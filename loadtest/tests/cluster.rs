//! The `cluster` scenario of `loadtest compare`, end to end on a small
//! image: 3 nodes (network namespaces, each with its own regproxy and
//! cache) on one bridge behind one shaped uplink to a Distribution upstream.
//! It checks behaviour, not timings: with peers on each blob crosses the
//! uplink about once per cluster, with peers off once per node, direct once
//! per client; and with the owner of the largest layer killed mid-blob the
//! other nodes still verify every blob, and that layer crosses the uplink
//! once more, not once per node.
//!
//! It needs root (for `ip netns`, `tc`) and `docker-registry`, and builds
//! the regproxy binary itself (`REGPROXY_BIN` overrides that).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{compare, Compared};

const NODES: u64 = 3;
const CLIENTS: u64 = 2;

fn run<'a>(cluster: &'a Value, setup: &str) -> &'a Value {
    cluster["runs"]
        .as_array()
        .expect("the cluster report has runs")
        .iter()
        .find(|r| r["setup"] == setup)
        .unwrap_or_else(|| panic!("the cluster report should have a {setup} run: {cluster}"))
}

fn amplification(r: &Value) -> f64 {
    r["amplification"]
        .as_f64()
        .expect("a run has an amplification")
}

#[test]
fn peers_fetch_each_blob_once_per_cluster_and_survive_a_killed_node() {
    let nodes = NODES.to_string();
    let clients = CLIENTS.to_string();
    let Compared { report, stdout } = compare(
        &[
            "--scenarios",
            "cluster",
            "--cluster-nodes",
            &nodes,
            "--cluster-clients",
            &clients,
            "--cluster-layers",
            "8MiB,1MiB",
            "--cluster-unique",
            "64KiB",
            "--cluster-mbit",
            "100",
            "--cluster-setups",
            "peers,no-peers,direct,peers-kill",
        ],
        "--cluster-svg",
        // About 20 s normally.
        Duration::from_secs(300),
    );
    let cluster = &report["report"]["cluster"];
    assert_eq!(cluster["nodes"], NODES, "the report should say 3 nodes");

    for setup in ["peers", "no_peers", "direct", "peers_kill"] {
        let r = run(cluster, setup);
        assert_eq!(
            r["errors"], 0,
            "{setup}: no request on a surviving node should fail: {r}"
        );
        assert!(
            r["verified"].as_u64().unwrap_or(0) > 0,
            "{setup}: the clients should have verified blobs: {r}"
        );
    }
    for setup in ["peers", "peers_kill"] {
        let r = run(cluster, setup);
        assert!(
            r["peers_live_s"].is_number(),
            "{setup}: every node should have seen the other {} live before the pulls: {r}",
            NODES - 1
        );
    }

    let on = run(cluster, "peers");
    assert!(
        amplification(on) <= 1.05,
        "with peers on each blob should cross the uplink about once per cluster: {on}"
    );
    assert!(
        on["peer_bytes_received"].as_u64().unwrap_or(0) > 0,
        "with peers on the nodes should have received bytes from each other: {on}"
    );
    let off = run(cluster, "no_peers");
    assert!(
        (amplification(off) - NODES as f64).abs() <= 0.05,
        "with peers off each blob should cross the uplink once per node ({NODES}): {off}"
    );
    let direct = run(cluster, "direct");
    assert!(
        (amplification(direct) - (NODES * CLIENTS) as f64).abs() < 1e-9,
        "direct, the upstream's access log should count every client's GET of every blob: {direct}"
    );

    let kill = run(cluster, "peers_kill");
    let killed = &kill["killed"];
    assert!(
        killed["at_s"].is_number(),
        "the owner of the largest layer should have been killed while it served it: {kill}"
    );
    // The dead owner's partial fetch plus one resume of the rest, by the
    // layer's next owner: 1 + 8 MiB / 9.1 MiB at most; once per surviving
    // node would be up to 2.8.
    assert!(
        amplification(kill) < 2.0,
        "a blob whose owner died mid-blob should cross the uplink once more, not once per node: {kill}"
    );
    let victim = killed["node"].as_u64().expect("the killed node") as usize;
    let node_s = kill["node_s"].as_array().expect("per-node times");
    for (i, t) in node_s.iter().enumerate() {
        assert_eq!(
            t.is_number(),
            i != victim,
            "every node but the killed one should have finished its pull: {kill}"
        );
    }

    assert!(
        stdout.contains("peers on") && stdout.contains("peers off"),
        "the table should be printed:\n{stdout}"
    );
}
