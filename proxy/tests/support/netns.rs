//! A network namespace of the test's own, joined to the root namespace by a
//! veth pair on a /30 from 10.213.0.0/16: a place off loopback that is still
//! only this test's, for a peer the proxy must treat as a remote host.
//! Removed on drop; namespaces left by killed runs are removed on the next.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// `rptest<pid>-<n>`, with veth ends `rpt<pid % 100000>h<n>` (root side)
/// and `rpt<pid % 100000>n<n>` (namespace side).
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// The root namespace's end of the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's end of the link, where a peer inside listens.
    pub ns_ip: Ipv4Addr,
}

const PREFIX: &str = "rptest";

fn host_if_name(pid: u32, n: u32) -> String {
    format!("rpt{}h{n}", pid % 100_000)
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running `{}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

/// The /30s already on an interface of the root namespace, as their first
/// three octets and the fourth's block of four.
fn subnets_in_use() -> Vec<(u8, u8)> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("iproute2 is installed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.split('/').next()?.parse::<Ipv4Addr>().ok())
        .filter(|a| a.octets()[..2] == [10, 213])
        .map(|a| (a.octets()[2], a.octets()[3] / 4))
        .collect()
}

impl Netns {
    /// Creates the namespace, the link, both addresses, and brings `lo` and
    /// both ends up.
    pub fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}-{n}");
        let host_if = host_if_name(pid, n);
        let ns_if = format!("rpt{}n{n}", pid % 100_000);
        // Third octets 4k+1 only (the load test's uplinks use 4k), the
        // block picked from the pid and skipped while another holds it.
        let used = subnets_in_use();
        let (third, block) = (0..64 * 64)
            .map(|i| (pid + n * 64 + i) % (64 * 64))
            .map(|s| ((s / 64 * 4 + 1) as u8, (s % 64) as u8))
            .find(|s| !used.contains(s))
            .expect("a free /30 in 10.213.0.0/16");
        let host_ip = Ipv4Addr::new(10, 213, third, block * 4 + 1);
        let ns_ip = Ipv4Addr::new(10, 213, third, block * 4 + 2);
        must(&["ip", "netns", "add", &name]);
        // From here on, drop removes what was made.
        let ns = Netns {
            name,
            host_if,
            ns_if: ns_if.clone(),
            host_ip,
            ns_ip,
        };
        must(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        must(&["ip", "link", "set", &ns_if, "netns", &ns.name]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &ns.host_if,
        ]);
        must(&["ip", "link", "set", &ns.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", ns.name.as_str()];
            v.extend_from_slice(args);
            must(&v)
        };
        in_ns(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        in_ns(&["ip", "link", "set", &ns_if, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Shapes the link to `mbit` Mbit/s each way with `tc tbf` on both
    /// ends' egress, as the load test's uplink does: what a program inside
    /// sends to the root namespace crosses the namespace end's queue.
    pub fn shape(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        // The bucket holds at least one GSO super-packet (64 KiB).
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "256kb", "latency", "100ms",
        ];
        let mut host = vec!["tc", "qdisc", "add", "dev", &self.host_if];
        host.extend_from_slice(&tbf);
        must(&host);
        let mut inside = vec![
            "ip",
            "netns",
            "exec",
            &self.name,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.ns_if,
        ];
        inside.extend_from_slice(&tbf);
        must(&inside);
    }

    /// Sets sysctl `key` to `value` inside the namespace (the `net.*` keys
    /// that are per namespace, such as `net.ipv4.tcp_wmem`).
    pub fn sysctl(&self, key: &str, value: &str) {
        must(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]);
    }

    /// `program` to be run inside the namespace (`ip netns exec` execs it,
    /// so the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

/// Removes namespaces (and their veth pairs) left by test runs that were
/// killed: `rptest<pid>-<n>` whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some((pid, n)) = name.strip_prefix(PREFIX).and_then(|r| {
            let (pid, n) = r.split_once('-')?;
            Some((pid.parse::<u32>().ok()?, n.parse::<u32>().ok()?))
        }) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "link", "del", &host_if_name(pid, n)]);
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes the other.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}
