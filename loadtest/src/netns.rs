//! The bandwidth-limited uplink: a network namespace of the run's own, a
//! veth pair into it, and `tc tbf` on both ends. The upstream runs inside;
//! the nodes' proxies reach it at [`Uplink::upstream_ip`]. Removed on drop.

use std::process::{Command, Stdio};

use anyhow::{ensure, Context};

pub struct Uplink {
    pub ns: String,
    host_if: String,
    /// Address of the namespace end, where the upstream listens.
    pub upstream_ip: String,
}

/// Runs a command (`ip`, `tc`) to its end; an error says which and why.
pub(crate) fn run(args: &[&str]) -> anyhow::Result<()> {
    output(args).map(|_| ())
}

/// Runs a command to its end and returns what it printed.
pub(crate) fn output(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Uplink {
    /// Creates the namespace and link, shaped to `mbit` Mbit/s each way.
    pub fn create(mbit: u32) -> anyhow::Result<Uplink> {
        remove_stale();
        let pid = std::process::id();
        let ns = format!("rpbench{pid}");
        let host_if = format!("rpbh{}", pid % 100_000);
        let ns_if = format!("rpbn{}", pid % 100_000);
        let net = format!("10.213.{}", pid % 64 * 4);
        let (host_ip, upstream_ip) = (format!("{net}.1"), format!("{net}.2"));
        let uplink = Uplink {
            ns: ns.clone(),
            host_if: host_if.clone(),
            upstream_ip: upstream_ip.clone(),
        };
        let rate = format!("{mbit}mbit");
        // tbf's bucket must hold at least one GSO super-packet (64 KiB).
        let burst = "256kb";
        run(&["ip", "netns", "add", &ns])?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &ns])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", ns.as_str()];
            v.extend_from_slice(args);
            run(&v)
        };
        in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{upstream_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        in_ns(&["ip", "link", "set", &ns_if, "up"])?;
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        in_ns(&[
            "tc", "qdisc", "add", "dev", &ns_if, "root", "tbf", "rate", &rate, "burst", burst,
            "latency", "100ms",
        ])?;
        run(&[
            "tc", "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", &rate, "burst", burst,
            "latency", "100ms",
        ])?;
        Ok(uplink)
    }
}

/// Removes namespaces (and their veth pairs) left by runs that were killed:
/// `rpbench<pid>` whose process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("rpbench")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "link", "del", &format!("rpbh{}", pid % 100_000)]);
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.ns]);
    }
}
