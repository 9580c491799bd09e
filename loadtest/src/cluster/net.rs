//! The cluster's network: N node namespaces on one bridge (the LAN), and the
//! upstream's namespace behind ONE shaped uplink.
//!
//! ```text
//!  node 0 ─┐                       (tc tbf both ways)
//!  node 1 ─┤  rpcl: bridge br0 ── up0 ═══════════ up0 :rpcu (upstream)
//!  …      ─┤  10.214.K.1/24       10.215.K.1/30     10.215.K.2
//!  root ns ┘  (this process, on the LAN at 10.214.K.2)
//! ```
//!
//! The bridge, the router and the uplink live in namespaces of their own, so
//! nothing of the root namespace's firewall (Docker's bridge rules) applies
//! to them and forwarding is switched on only inside the LAN's namespace. The
//! root namespace gets one veth onto the LAN (to reach the nodes' proxies and
//! admin ports) and a route to the uplink's /30 through the LAN's router, so
//! that the "direct" clients cross the same shaped uplink. Every name carries
//! this process's id; everything is removed on drop, and what a killed run
//! left is removed by the next one.

use anyhow::{ensure, Context};

use crate::netns::{output, run};

/// One node on the LAN.
#[derive(Debug, Clone)]
pub struct Node {
    pub ns: String,
    pub ip: String,
}

pub struct ClusterNet {
    /// The bridge and the router.
    pub lan_ns: String,
    /// The upstream's namespace, the far end of the uplink.
    pub up_ns: String,
    pub nodes: Vec<Node>,
    /// Where the upstream listens: the far end of the uplink.
    pub upstream_ip: String,
    /// This process's end on the LAN.
    host_if: String,
    /// Namespaces created so far (removed on drop).
    made: Vec<String>,
}

/// The uplink's interface name, at both of its ends.
const UPLINK_IF: &str = "up0";

/// A third octet K for 10.214.K.0/24 and 10.215.K.0/30 that no route of the
/// root namespace uses yet, starting from one derived from the process id.
fn free_octet(pid: u32) -> anyhow::Result<u32> {
    let routes = output(&["ip", "-4", "route", "show", "table", "all"])?;
    let addrs = output(&["ip", "-4", "addr"])?;
    (0..250)
        .map(|j| (pid + j) % 250 + 1)
        .find(|k| {
            let (a, b) = (format!("10.214.{k}."), format!("10.215.{k}."));
            !routes.contains(&a) && !routes.contains(&b) && !addrs.contains(&a)
        })
        .context("no free 10.214.K.0/24 for the cluster's LAN")
}

impl ClusterNet {
    /// Creates the LAN with `nodes` nodes and the uplink shaped to `mbit`
    /// Mbit/s each way. Whatever was made is removed if a step fails.
    pub fn create(nodes: usize, mbit: u32) -> anyhow::Result<ClusterNet> {
        ensure!(
            (1..=200).contains(&nodes),
            "a cluster has 1 to 200 nodes, not {nodes}"
        );
        remove_stale();
        let pid = std::process::id();
        let k = free_octet(pid)?;
        let lan = format!("10.214.{k}");
        let link = format!("10.215.{k}");
        let mut net = ClusterNet {
            lan_ns: format!("rpcl{pid}"),
            up_ns: format!("rpcu{pid}"),
            nodes: (0..nodes)
                .map(|i| Node {
                    ns: format!("rpcn{pid}-{i}"),
                    ip: format!("{lan}.{}", 10 + i),
                })
                .collect(),
            upstream_ip: format!("{link}.2"),
            host_if: format!("rpch{}", pid % 1_000_000),
            made: Vec::new(),
        };
        let (l, u) = (net.lan_ns.clone(), net.up_ns.clone());
        for ns in [&l, &u] {
            net.add_ns(ns)?;
        }
        // The LAN: a bridge that is also the router to the uplink.
        run(&["ip", "-n", &l, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &l, "link", "add", "br0", "type", "bridge"])?;
        run(&[
            "ip",
            "-n",
            &l,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            "br0",
        ])?;
        run(&["ip", "-n", &l, "link", "set", "br0", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &l,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        // The uplink.
        run(&[
            "ip", "-n", &l, "link", "add", UPLINK_IF, "type", "veth", "peer", "name", UPLINK_IF,
            "netns", &u,
        ])?;
        for (ns, ip) in [(&l, format!("{link}.1/30")), (&u, format!("{link}.2/30"))] {
            run(&["ip", "-n", ns, "addr", "add", &ip, "dev", UPLINK_IF])?;
            run(&["ip", "-n", ns, "link", "set", UPLINK_IF, "up"])?;
        }
        run(&["ip", "-n", &u, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "-n",
            &u,
            "route",
            "add",
            &format!("{lan}.0/24"),
            "via",
            &format!("{link}.1"),
        ])?;
        let rate = format!("{mbit}mbit");
        for ns in [&l, &u] {
            // tbf's bucket must hold at least one GSO super-packet (64 KiB).
            run(&[
                "tc", "-n", ns, "qdisc", "add", "dev", UPLINK_IF, "root", "tbf", "rate", &rate,
                "burst", "256kb", "latency", "100ms",
            ])?;
        }
        // The nodes.
        for (i, node) in net.nodes.clone().iter().enumerate() {
            net.add_ns(&node.ns)?;
            let port = format!("n{i}");
            run(&[
                "ip", "-n", &l, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &node.ns,
            ])?;
            run(&["ip", "-n", &l, "link", "set", &port, "master", "br0", "up"])?;
            let n = node.ns.as_str();
            run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", n, "link", "set", "eth0", "up"])?;
            run(&[
                "ip",
                "-n",
                n,
                "route",
                "add",
                "default",
                "via",
                &format!("{lan}.1"),
            ])?;
        }
        // This process on the LAN, and the uplink's /30 through its router.
        run(&[
            "ip",
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            &l,
        ])?;
        run(&["ip", "-n", &l, "link", "set", "host", "master", "br0", "up"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{lan}.2/24"),
            "dev",
            &net.host_if,
        ])?;
        run(&["ip", "link", "set", &net.host_if, "up"])?;
        run(&[
            "ip",
            "route",
            "add",
            &format!("{link}.0/30"),
            "via",
            &format!("{lan}.1"),
            "dev",
            &net.host_if,
        ])?;
        Ok(net)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        run(&["ip", "netns", "add", ns])?;
        self.made.push(ns.to_string());
        Ok(())
    }

    /// Bytes the upstream's end of the uplink has sent so far (what went down
    /// the uplink to the LAN: blobs, manifests, TCP/IP headers).
    pub fn uplink_down_bytes(&self) -> anyhow::Result<u64> {
        let json = output(&[
            "ip",
            "-n",
            &self.up_ns,
            "-s",
            "-j",
            "link",
            "show",
            "dev",
            UPLINK_IF,
        ])?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        v[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .context("`ip -s -j link` gave no tx bytes for the uplink")
    }
}

/// Removes what runs that were killed left behind: `rpcl<pid>`, `rpcu<pid>`
/// and `rpcn<pid>-<i>` namespaces whose process is gone, and `rpch<pid>`.
fn remove_stale() {
    let Ok(list) = output(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = ["rpcl", "rpcu", "rpcn"].iter().find_map(|p| {
            let rest = name.strip_prefix(p)?;
            rest.split('-').next()?.parse::<u32>().ok()
        });
        let Some(pid) = pid else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if name.starts_with("rpcl") {
                let _ = run(&["ip", "link", "del", &format!("rpch{}", pid % 1_000_000)]);
            }
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl Drop for ClusterNet {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        for ns in self.made.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
