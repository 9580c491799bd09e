//! The node path: what makes the node's pulls of the registry name reach
//! this proxy, kept in place and checked while `serve` runs
//! (`--registry-name`), and checked once by `regproxy doctor`.
//!
//! - [`checks`]: the checks, each a plain function of what it reads, with
//!   the reason and the fix when it fails.
//! - [`reconcile`]: `serve`'s loop: every `--reconcile-interval` it puts the
//!   hosts-file line and `hosts.toml` back (counting each repair), runs the
//!   checks, and publishes them to `/readyz` and the metrics.
//! - [`doctor`]: `regproxy doctor` and `regproxy sysctl`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use http::Uri;

use crate::resolve::Resolver;

pub mod checks;
pub mod doctor;
pub mod reconcile;

pub use checks::{Check, Failure, Round};
pub use reconcile::start;

/// `--registry-name` and where its node path lives, validated (see
/// [`crate::config::NodeArgs`]).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// As image references spell it: `name` or `name:port`.
    pub registry_name: String,
    /// `--node-root`: where the node's `/` is mounted.
    pub root: PathBuf,
    /// The node's hosts file, a node path.
    pub hosts_file: PathBuf,
    /// containerd's certs dir, a node path; `None`: no hosts.toml.
    pub certs_dir: Option<PathBuf>,
    /// containerd's config, a node path; `None`: not checked.
    pub containerd_config: Option<PathBuf>,
    /// `--containerd-server`; `None`: the upstream, resolved.
    pub server: Option<String>,
    pub interval: Duration,
}

impl NodeConfig {
    /// The registry name without its port: what the hosts file maps.
    pub fn host(&self) -> &str {
        match self.registry_name.rsplit_once(':') {
            Some((host, _)) => host,
            None => &self.registry_name,
        }
    }

    /// The port the registry name carries, if any: where image references
    /// of it connect, whatever the proxy listens on.
    pub fn port(&self) -> Option<u16> {
        self.registry_name.rsplit_once(':')?.1.parse().ok()
    }

    /// Where node path `p` is in this process's filesystem.
    pub fn on_node(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }
}

/// Where the node reaches the proxy: the listen address, with an
/// unspecified IP (`0.0.0.0`) replaced by loopback.
pub fn node_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The `hosts.toml` mirror entry for the proxy at `addr`.
pub fn endpoint(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// The fallback `server` of hosts.toml: `--containerd-server`, or the
/// upstream URL with its host resolved to an address (the Service's cluster
/// IP) by the upstream's resolver, which does not read the node's hosts
/// file. `Err` says why there is none now.
pub async fn fallback_server(
    node: &NodeConfig,
    upstream: &Uri,
    resolver: &Resolver,
) -> Result<String, String> {
    if let Some(s) = &node.server {
        return Ok(s.clone());
    }
    let scheme = upstream.scheme_str().unwrap_or("http");
    let host = upstream.host().unwrap_or_default();
    let port = upstream
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    if host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        return Ok(format!("{scheme}://{host}:{port}"));
    }
    match resolver.resolve(host, port).await {
        Ok(addrs) => match addrs.first() {
            Some(a) => Ok(format!("{scheme}://{a}")),
            None => Err(format!("the upstream host {host} resolves to nothing")),
        },
        Err(e) => Err(format!("the upstream host {host} does not resolve: {e}")),
    }
}

/// The last round of checks, for `/readyz`: `None` until the first round
/// has run (not ready until then).
#[derive(Debug, Default)]
pub struct Status {
    last: Mutex<Option<Round>>,
}

impl Status {
    pub fn set(&self, round: Round) {
        *self.last.lock().expect("never poisoned") = Some(round);
    }

    /// `None` when every check passed; otherwise why the node path is not
    /// ready, a line per failed check.
    pub fn not_ready(&self) -> Option<String> {
        let last = self.last.lock().expect("never poisoned");
        let Some(round) = last.as_ref() else {
            return Some("node path: not checked yet\n".to_owned());
        };
        let failed: String = round
            .iter()
            .filter_map(|(c, r)| r.as_ref().err().map(|f| (c, f)))
            .map(|(c, f)| {
                format!(
                    "node path check {} failed: {}\n  fix: {}\n",
                    c.name(),
                    f.reason,
                    f.fix
                )
            })
            .collect();
        (!failed.is_empty()).then_some(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        NodeConfig {
            registry_name: "reg.example:5000".into(),
            root: "/host".into(),
            hosts_file: "/etc/hosts".into(),
            certs_dir: None,
            containerd_config: None,
            server: None,
            interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn node_paths_live_under_the_root() {
        let n = node();
        assert_eq!(n.host(), "reg.example");
        assert_eq!(
            n.on_node(Path::new("/etc/hosts")),
            Path::new("/host/etc/hosts")
        );
        assert_eq!(
            node_address("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn the_fallback_server_is_the_upstream_by_address() {
        let r = Resolver::new(crate::resolve::ResolverMode::System).unwrap();
        let mut n = node();
        let up: Uri = "http://10.96.0.20:5000".parse().unwrap();
        assert_eq!(
            fallback_server(&n, &up, &r).await.unwrap(),
            "http://10.96.0.20:5000"
        );
        let up: Uri = "https://localhost".parse().unwrap();
        let s = fallback_server(&n, &up, &r).await.unwrap();
        assert!(
            s == "https://127.0.0.1:443" || s == "https://[::1]:443",
            "{s}"
        );
        n.server = Some("http://10.0.0.1:80".into());
        assert_eq!(
            fallback_server(&n, &up, &r).await.unwrap(),
            "http://10.0.0.1:80"
        );
    }

    #[test]
    fn readiness_waits_for_the_first_round_and_names_failures() {
        let s = Status::default();
        assert!(s.not_ready().is_some(), "not ready before the first round");
        s.set(vec![(Check::EtcHosts, Ok("fine".into()))]);
        assert_eq!(s.not_ready(), None);
        s.set(vec![(
            Check::ReachesUs,
            Err(Failure {
                reason: "nginx answered".into(),
                fix: "move it".into(),
            }),
        )]);
        let why = s.not_ready().unwrap();
        assert!(
            why.contains("reaches_us") && why.contains("nginx answered"),
            "{why}"
        );
    }
}
