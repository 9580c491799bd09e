//! The `cluster` scenario: N nodes, each a network namespace with its own
//! regproxy and cache, on one LAN behind ONE shaped uplink to the upstream;
//! every node pulls the same images at once with several clients each.
//!
//! Four setups, each on fresh caches and an upstream process of its own (so
//! its access log holds that setup's requests only):
//! - **peers on**: every node gets the same `--peers` list (its own address
//!   included, which regproxy skips), `--peer-listen <LAN IP>:5001` and one
//!   `--peer-secret-file`; pulls start once every node reports
//!   `regproxy_peers_live` = N-1;
//! - **peers off**: today's regproxy on every node;
//! - **direct**: the clients pull from the upstream themselves, across the
//!   same uplink;
//! - **peers on, a node killed**: as peers on, and the regproxy that owns
//!   the largest layer (rendezvous hashing over the nodes' peer addresses,
//!   as regproxy computes it) is killed with SIGKILL while it streams that
//!   layer to the others.
//!
//! Amplification is counted on the upstream's side: the successful blob
//! GETs in the upstream registry's access log and their bytes (what the
//! upstream sent for them), divided by the distinct blob bytes. The bytes
//! the uplink's far end transmitted (headers and manifests included) are
//! recorded next to it as a cross-check.
//!
//! - [`net`]: the namespaces, the bridge and the shaped uplink.
//! - [`report`]: the table, the checks and the chart of this scenario.

pub mod net;
pub mod report;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use regproxy::units::{parse_size, parse_size_list};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::procs::{Proc, UpstreamUse};
use crate::registry::regproxy_metric;
use crate::stats::Latencies;
use crate::synth::{self, ImageSetShape, ImageSpec};
use crate::targets::{start_upstream, wait_ready, Tools};
use crate::workload::{self, ImageRef, Outcome};
use net::ClusterNet;

/// The `cluster` scenario's flags (part of `loadtest compare`'s).
//
// The size list is spelt `std::vec::Vec` so that clap takes it as one value.
#[derive(Debug, Clone, Serialize, clap::Args)]
#[group(id = "cluster-params")]
pub struct Params {
    /// Nodes in the cluster scenario, each a network namespace with its own regproxy.
    #[arg(long, default_value_t = 4)]
    pub cluster_nodes: usize,
    /// Clients on each node pulling the cluster's images at once.
    #[arg(long, default_value_t = 4)]
    pub cluster_clients: usize,
    /// Images every node pulls, `bench/cluster-<i>:v1`.
    #[arg(long, default_value_t = 1)]
    pub cluster_images: usize,
    /// Layers of the cluster's images (all images share them), comma-separated sizes.
    #[arg(long, default_value = "20MiB,8MiB,2MiB,512KiB", value_parser = parse_size_list)]
    pub cluster_layers: std::vec::Vec<u64>,
    /// A layer of each cluster image's own.
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    pub cluster_unique: u64,
    /// The shared uplink's rate in Mbit/s, each way.
    #[arg(long, default_value_t = 100)]
    pub cluster_mbit: u32,
    /// Setups of the cluster scenario, in run order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "peers,no-peers,direct,peers-kill"
    )]
    pub cluster_setups: Vec<Setup>,
    /// Longest wait for every node to see the others live before a run.
    #[arg(long, default_value = "30s", value_parser = regproxy::units::parse_duration)]
    #[serde(skip)]
    pub cluster_peer_wait: Duration,
}

/// One way of running the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// regproxy on every node with `--peers`.
    Peers,
    /// regproxy on every node without peers (today).
    NoPeers,
    /// No proxy: the clients pull from the upstream across the uplink.
    Direct,
    /// Peers on, and the owner of the largest layer killed mid-blob.
    PeersKill,
}

impl Setup {
    pub fn label(self) -> &'static str {
        match self {
            Setup::Peers => "peers on",
            Setup::NoPeers => "peers off",
            Setup::Direct => "direct",
            Setup::PeersKill => "peers on, 1 killed",
        }
    }

    fn peers(self) -> bool {
        matches!(self, Setup::Peers | Setup::PeersKill)
    }
}

/// The node that was killed in a [`Setup::PeersKill`] run.
#[derive(Debug, Clone, Serialize)]
pub struct Killed {
    pub node: usize,
    /// The layer it owned (the largest).
    pub owner_of: String,
    /// Since the pulls started; `None` when every other node finished first.
    pub at_s: Option<f64>,
    /// Its `regproxy_peer_bytes_served_total` when it was killed.
    pub served_bytes: u64,
    /// Requests of its own clients that failed (expected: its proxy is gone).
    pub errors_on_node: u64,
}

/// One setup of the cluster, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub setup: Setup,
    /// Successful blob GETs of the images' blobs at the upstream, and their bytes.
    pub upstream: UpstreamUse,
    /// Upstream blob bytes ÷ distinct blob bytes.
    pub amplification: f64,
    /// What the upstream's end of the uplink transmitted (all traffic).
    pub uplink_down_bytes: Option<u64>,
    /// Per client and image (tag to last verified blob), nodes that were not killed.
    pub pull_p50_ms: f64,
    pub pull_p99_ms: f64,
    /// Per node: from the common start until its last client had every
    /// image; `None` for the killed node.
    pub node_s: Vec<Option<f64>>,
    pub first_node_s: f64,
    /// Time until the last (surviving) node had the images.
    pub last_node_s: f64,
    pub verified: u64,
    /// Failed or unverified requests on nodes that were not killed.
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// Seconds until every node saw N-1 peers live (peers on only).
    pub peers_live_s: Option<f64>,
    /// What the nodes' regproxy metrics grew by during the pulls, summed
    /// over the nodes that were not killed: bytes from the upstream, bytes
    /// from peers, fallbacks to the upstream. `None` for direct.
    pub proxy_upstream_bytes: Option<u64>,
    pub peer_bytes_received: Option<u64>,
    pub peer_fallbacks: Option<u64>,
    pub killed: Option<Killed>,
}

/// Everything the cluster scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub nodes: usize,
    pub clients_per_node: usize,
    pub mbit: u32,
    pub images: Vec<String>,
    pub blobs: usize,
    pub distinct_bytes: u64,
    pub runs: Vec<Run>,
}

impl ClusterReport {
    pub fn run(&self, setup: Setup) -> Option<&Run> {
        self.runs.iter().find(|r| r.setup == setup)
    }
}

/// The cluster's images, hashed before anything starts.
pub fn images(p: &Params) -> Vec<ImageSpec> {
    synth::image_set(&ImageSetShape {
        prefix: "bench/cluster".into(),
        images: p.cluster_images,
        shared_layers: p.cluster_layers.clone(),
        unique_layers: vec![p.cluster_unique]
            .into_iter()
            .filter(|s| *s > 0)
            .collect(),
        seed: 30,
    })
}

/// The setups' upstreams listen on 5010, 5011, … (one each).
const UPSTREAM_PORT: u16 = 5010;
const CLIENT_PORT: u16 = 5000;
const PEER_PORT: u16 = 5001;
const ADMIN_PORT: u16 = 9090;

/// The rendezvous weight regproxy gives `peer` for `digest` (issue 11's
/// design): the first 8 bytes of sha256("<digest>\n<ip:port>").
pub fn weight(digest: &str, peer: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(digest.as_bytes());
    h.update(b"\n");
    h.update(peer.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Which of `peers` owns `digest` when all are live.
pub fn owner(digest: &str, peers: &[String]) -> usize {
    (0..peers.len())
        .max_by_key(|&i| weight(digest, &peers[i]))
        .unwrap_or(0)
}

/// What the scenario needs from the rest of the run.
pub struct Env<'a> {
    pub tools: &'a Tools,
    pub work: &'a Path,
    /// The seeded upstream storage.
    pub storage: &'a Path,
    pub timeout: Duration,
    pub scenario_timeout: Duration,
    pub layer_concurrency: usize,
}

/// Runs every setup of the cluster scenario on one network, created here and
/// removed when it returns (also on failure).
pub async fn run(p: &Params, images: &[ImageSpec], env: &Env<'_>) -> anyhow::Result<ClusterReport> {
    let net = ClusterNet::create(p.cluster_nodes, p.cluster_mbit)?;
    let digests: Vec<String> = {
        let mut d: Vec<String> = images
            .iter()
            .flat_map(|i| {
                std::iter::once(i.config.digest.clone())
                    .chain(i.layers.iter().map(|l| l.digest.clone()))
            })
            .collect();
        d.sort();
        d.dedup();
        d
    };
    let distinct = synth::distinct_blob_bytes(images);
    let largest = images
        .iter()
        .flat_map(|i| &i.layers)
        .max_by_key(|l| l.size)
        .map(|l| (l.digest.clone(), l.size));
    let refs: Vec<ImageRef> = images
        .iter()
        .map(|i| ImageRef {
            name: i.name.clone(),
            tag: i.tag.clone(),
        })
        .collect();
    // A fixed secret: the LAN is the run's own, and nothing else listens there.
    let secret = env.work.join("cluster-peer-secret");
    std::fs::write(&secret, "loadtest-cluster-peer-secret-0123456789\n")?;
    let mut runs = Vec::new();
    for (idx, &setup) in p.cluster_setups.iter().enumerate() {
        eprintln!("  cluster: {} …", setup.label());
        let ctx = SetupCtx {
            p,
            env,
            net: &net,
            refs: &refs,
            digests: &digests,
            distinct,
            largest: largest.clone(),
            secret: &secret,
            port: UPSTREAM_PORT + idx as u16,
        };
        let r = ctx.run(setup).await?;
        eprintln!(
            "  cluster {:<18} ampl. {:>5.2}  upstream GETs {:>3}  last node {:>6.2}s  pull p50 {:>7.0} ms p99 {:>7.0} ms  errors {}{}",
            setup.label(),
            r.amplification,
            r.upstream.blob_gets,
            r.last_node_s,
            r.pull_p50_ms,
            r.pull_p99_ms,
            r.errors,
            r.first_errors.first().map(|e| format!(" ({e})")).unwrap_or_default()
        );
        runs.push(r);
    }
    Ok(ClusterReport {
        nodes: p.cluster_nodes,
        clients_per_node: p.cluster_clients,
        mbit: p.cluster_mbit,
        images: images.iter().map(ImageSpec::reference).collect(),
        blobs: digests.len(),
        distinct_bytes: distinct,
        runs,
    })
}

struct SetupCtx<'a> {
    p: &'a Params,
    env: &'a Env<'a>,
    net: &'a ClusterNet,
    refs: &'a [ImageRef],
    digests: &'a [String],
    distinct: u64,
    largest: Option<(String, u64)>,
    secret: &'a Path,
    /// The upstream's port for this setup.
    port: u16,
}

/// A node's regproxy; stopped and its cache removed on drop.
struct NodeProxy {
    /// `None` once dropped (stopped: SIGTERM, then SIGKILL).
    proc: Option<Proc>,
    addr: String,
    admin: String,
    cache: std::path::PathBuf,
}

impl Drop for NodeProxy {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

/// The regproxy metrics a run reads before and after the pulls, by index.
const METRICS: [&str; 4] = [
    "regproxy_upstream_bytes_total",
    "regproxy_peer_bytes_received_total",
    "regproxy_peer_fallbacks_total",
    "regproxy_upstream_requests_total",
];
const UPSTREAM_BYTES: usize = 0;
const PEER_BYTES: usize = 1;
const FALLBACKS: usize = 2;
const REQUESTS: usize = 3;

/// [`METRICS`] of every node (`None` where a node does not answer).
async fn snapshot(nodes: &[NodeProxy]) -> Vec<[Option<u64>; 4]> {
    let mut v = Vec::new();
    for n in nodes {
        let mut m = [None; 4];
        for (slot, name) in m.iter_mut().zip(METRICS) {
            *slot = regproxy_metric(&n.admin, name).await.ok();
        }
        v.push(m);
    }
    v
}

impl SetupCtx<'_> {
    async fn start_node(
        &self,
        i: usize,
        setup: Setup,
        upstream: &str,
    ) -> anyhow::Result<NodeProxy> {
        let node = &self.net.nodes[i];
        // Logs stay in the work dir (kept with `--work-dir`); the cache goes
        // when the node does.
        let dir = self.env.work.join(format!("cluster-{setup:?}-n{i}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let cache = dir.join("cache");
        let addr = format!("{}:{CLIENT_PORT}", node.ip);
        let admin = format!("{}:{ADMIN_PORT}", node.ip);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns])
            .arg(&self.env.tools.regproxy)
            .arg("serve")
            .args(["--listen", &addr])
            .args(["--upstream", &format!("http://{upstream}")])
            .arg("--cache-dir")
            .arg(&cache)
            .args(["--cache-size", "20GiB"])
            .args(["--admin-listen", &admin])
            .env("RUST_LOG", "info");
        if setup.peers() {
            cmd.args(["--peers", &self.peer_list().join(",")])
                .args(["--peer-listen", &format!("{}:{PEER_PORT}", node.ip)])
                .arg("--peer-secret-file")
                .arg(self.secret);
        }
        let mut proc = Proc::spawn("regproxy", cmd, &dir)?;
        wait_ready(&mut proc, &addr)
            .await
            .with_context(|| format!("starting regproxy on node {i} ({})", node.ns))?;
        Ok(NodeProxy {
            proc: Some(proc),
            addr,
            admin,
            cache,
        })
    }

    /// Every node's peer address, the same list for all.
    fn peer_list(&self) -> Vec<String> {
        self.net
            .nodes
            .iter()
            .map(|n| format!("{}:{PEER_PORT}", n.ip))
            .collect()
    }

    /// Waits (bounded) until every node sees the other N-1 live.
    async fn wait_peers_live(&self, nodes: &[NodeProxy]) -> Result<f64, String> {
        let want = nodes.len() as u64 - 1;
        let start = Instant::now();
        let deadline = start + self.p.cluster_peer_wait;
        loop {
            let mut seen = Vec::new();
            for n in nodes {
                seen.push(regproxy_metric(&n.admin, "regproxy_peers_live").await.ok());
            }
            if seen.iter().all(|s| *s == Some(want)) {
                return Ok(start.elapsed().as_secs_f64());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not every node saw {want} peers live within {:?}: regproxy_peers_live per node {seen:?}",
                    self.p.cluster_peer_wait
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(&self, setup: Setup) -> anyhow::Result<Run> {
        let up_addr = format!("{}:{}", self.net.upstream_ip, self.port);
        let upstream = start_upstream(
            self.env.tools,
            self.env.work,
            self.env.storage,
            &up_addr,
            Some(&self.net.up_ns),
        )
        .await?;
        let mut nodes = Vec::new();
        if setup != Setup::Direct {
            for i in 0..self.net.nodes.len() {
                nodes.push(self.start_node(i, setup, &up_addr).await?);
            }
        }
        let mut setup_errors = Vec::new();
        let peers_live_s = if setup.peers() && nodes.len() > 1 {
            match self.wait_peers_live(&nodes).await {
                Ok(s) => Some(s),
                Err(e) => {
                    setup_errors.push(e);
                    None
                }
            }
        } else {
            None
        };
        // The node to kill: the owner of the largest layer when all are live.
        let victim = match (setup, &self.largest) {
            (Setup::PeersKill, Some((digest, size))) => {
                Some((owner(digest, &self.peer_list()), digest.clone(), *size))
            }
            _ => None,
        };

        let before = snapshot(&nodes).await;
        let mark = upstream.log.mark();
        let wire_before = self.net.uplink_down_bytes().ok();

        // Every node's clients start at once.
        let start = Instant::now();
        let (to, clients, lc) = (
            self.env.timeout,
            self.p.cluster_clients,
            self.env.layer_concurrency,
        );
        let tasks: Vec<_> = (0..self.net.nodes.len())
            .map(|i| {
                let addr = match nodes.get(i) {
                    Some(n) => n.addr.clone(),
                    None => up_addr.clone(),
                };
                let refs = self.refs.to_vec();
                let limit = self.env.scenario_timeout;
                tokio::spawn(async move {
                    let out = tokio::time::timeout(
                        limit,
                        workload::pull_images(&addr, to, &refs, clients, lc),
                    )
                    .await
                    .unwrap_or_else(|_| Outcome {
                        errors: 1,
                        first_errors: vec![format!("node pull did not finish within {limit:?}")],
                        ..Outcome::default()
                    });
                    (out, start.elapsed())
                })
            })
            .collect();
        let mut killed = None;
        if let Some((v, digest, size)) = victim {
            killed = Some(
                self.kill_mid_blob(&mut nodes[v], v, digest, size, &tasks, start)
                    .await,
            );
        }
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(match t.await {
                Ok(o) => o,
                Err(e) => (
                    Outcome {
                        errors: 1,
                        first_errors: vec![format!("node task failed: {e}")],
                        ..Outcome::default()
                    },
                    start.elapsed(),
                ),
            });
        }

        // What reached the upstream: wait for its log lines (one per request
        // the surviving proxies or the direct clients sent), then for quiet.
        let killed_node = killed.as_ref().map(|k: &Killed| k.node);
        let after = snapshot(&nodes).await;
        let proxied = !nodes.is_empty();
        // Sums over the nodes that were not killed (a killed node's
        // counters are gone with it).
        let delta = |m: usize| -> Option<u64> {
            let mut sum = 0;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if Some(i) != killed_node {
                    sum += a[m]?.saturating_sub(b[m]?);
                }
            }
            proxied.then_some(sum)
        };
        let expected = if setup == Setup::Direct {
            Some(outs.iter().map(|(o, _)| o.requests).sum::<u64>())
        } else {
            // At least the survivors' requests; a killed node's are unknown.
            delta(REQUESTS)
        };
        let log = upstream.log.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(n) = expected {
                log.wait_entries(mark, n, Duration::from_secs(30));
            }
            log.settle(Duration::from_millis(300), Duration::from_secs(10))
        })
        .await
        .ok();
        let usage = upstream.log.usage(mark, Some(self.digests));
        let wire = match (wire_before, self.net.uplink_down_bytes().ok()) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b)),
            _ => None,
        };
        let mut lat = Latencies::default();
        let (mut verified, mut errors, mut firsts) = (0, 0, setup_errors.clone());
        let mut node_s = Vec::new();
        for (i, (out, done)) in outs.into_iter().enumerate() {
            if Some(i) == killed_node {
                if let Some(k) = killed.as_mut() {
                    k.errors_on_node = out.errors;
                }
                node_s.push(None);
                continue;
            }
            verified += out.verified;
            errors += out.errors;
            firsts.extend(out.first_errors.iter().map(|e| format!("node {i}: {e}")));
            node_s.push(Some(done.as_secs_f64()));
            lat.extend(out.image_latency);
        }
        errors += setup_errors.len() as u64;
        firsts.truncate(5);
        let times: Vec<f64> = node_s.iter().flatten().copied().collect();
        drop(nodes);
        drop(upstream);
        Ok(Run {
            setup,
            upstream: usage,
            amplification: if self.distinct == 0 {
                0.0
            } else {
                usage.blob_bytes as f64 / self.distinct as f64
            },
            uplink_down_bytes: wire,
            pull_p50_ms: lat.percentile_ms(50.0),
            pull_p99_ms: lat.percentile_ms(99.0),
            node_s,
            first_node_s: times.iter().copied().reduce(f64::min).unwrap_or(0.0),
            last_node_s: times.iter().copied().fold(0.0, f64::max),
            verified,
            errors,
            first_errors: firsts,
            peers_live_s,
            proxy_upstream_bytes: delta(UPSTREAM_BYTES),
            peer_bytes_received: delta(PEER_BYTES),
            peer_fallbacks: delta(FALLBACKS),
            killed,
        })
    }

    /// Kills node `v`'s regproxy (SIGKILL) once it has served half of the
    /// largest layer's size to its peers, i.e. while it streams that layer;
    /// a bounded poll that gives up when every other node is done.
    async fn kill_mid_blob(
        &self,
        node: &mut NodeProxy,
        v: usize,
        digest: String,
        size: u64,
        tasks: &[tokio::task::JoinHandle<(Outcome, Duration)>],
        start: Instant,
    ) -> Killed {
        let threshold = (size / 2).max(1);
        let mut k = Killed {
            node: v,
            owner_of: digest,
            at_s: None,
            served_bytes: 0,
            errors_on_node: 0,
        };
        let deadline = start + self.env.scenario_timeout;
        while Instant::now() < deadline {
            let others_done = tasks
                .iter()
                .enumerate()
                .all(|(i, t)| i == v || t.is_finished());
            if others_done {
                break;
            }
            let served = regproxy_metric(&node.admin, "regproxy_peer_bytes_served_total")
                .await
                .unwrap_or(0);
            if served >= threshold {
                if let Some(p) = node.proc.as_mut() {
                    p.kill_now();
                }
                k.at_s = Some(start.elapsed().as_secs_f64());
                k.served_bytes = served;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_the_highest_rendezvous_weight_as_in_the_design() {
        // Values from Python's hashlib for sha256("<digest>\n<ip:port>").
        let d = format!("sha256:{}", "0".repeat(64));
        let peers: Vec<String> = (10..13).map(|i| format!("10.214.1.{i}:5001")).collect();
        assert_eq!(weight(&d, &peers[0]), 15023878488077718941);
        assert_eq!(weight(&d, &peers[2]), 7974205919055810223);
        assert_eq!(
            owner(&d, &peers),
            0,
            "the heaviest peer should own the digest"
        );
        let owned: std::collections::HashSet<usize> = (0..64)
            .map(|i| owner(&format!("sha256:{i:064x}"), &peers))
            .collect();
        assert_eq!(owned.len(), 3, "digests should spread over every node");
    }
}
