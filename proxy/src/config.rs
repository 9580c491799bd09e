//! Command line and environment: every `serve` flag is also read from
//! `REGPROXY_<FLAG>`. Validation happens here, before anything is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;

use crate::units::{parse_duration, parse_rate, parse_size};

/// regproxy: a pull-through caching registry proxy for every node of a cluster.
#[derive(Debug, Parser)]
#[command(name = "regproxy", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry API on a node, pulling through from the upstream registry.
    Serve(ServeArgs),
    /// Set a node up for the proxy, or undo it: the `/etc/hosts` entry and
    /// containerd's `hosts.toml` for the registry name.
    Hosts(crate::hosts::HostsArgs),
    /// Check this node's path to the proxy once, print each check with the
    /// fix, and exit 1 when one fails. Reads the same flags (and REGPROXY_*
    /// variables) as `serve`.
    Doctor(crate::node::doctor::DoctorArgs),
    /// Set net.ipv4.tcp_migrate_req=1 in this network namespace, so that a
    /// proxy handing over to its successor loses no queued connection.
    Sysctl,
    /// Ask this pod's own `serve` (its `--probe-socket`) for `/healthz` or
    /// `/readyz`: exit 0 on 200. For kubelet's exec probes.
    Probe(crate::server::probe::ProbeArgs),
    /// Ask a running proxy (`--admin`) to fetch images for this node's
    /// platform now, with a progress bar per image; exit 1 if one failed.
    Prefetch(crate::ctl::prefetch::PrefetchArgs),
    /// Prefetch images and pin them: never evicted, revalidated, kept
    /// for restarts without the upstream.
    Pin(crate::ctl::prefetch::PrefetchArgs),
    /// Unpin images pinned with `regproxy pin`.
    Unpin(crate::ctl::prefetch::UnpinArgs),
    /// See and manage what a running proxy has cached: `ls`, `rm`, `verify`.
    Cache(crate::ctl::cache::CacheArgs),
    /// Show or change a running proxy's upstream rate (`--upstream-rate`).
    Rate(crate::ctl::RateArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the registry API listens on (where dockerd and containerd connect).
    #[arg(long, env = "REGPROXY_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,

    /// The real registry, `http://host[:port]` or `https://host[:port]`.
    #[arg(long, env = "REGPROXY_UPSTREAM", value_parser = parse_upstream)]
    pub upstream: Uri,

    /// Directory of the node cache; created if missing.
    #[arg(long, env = "REGPROXY_CACHE_DIR", default_value = "/var/lib/regproxy")]
    pub cache_dir: PathBuf,

    /// Most bytes the cache keeps on disk: `300MB`, `20GiB`, `1073741824`.
    #[arg(long, env = "REGPROXY_CACHE_SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// Address of `/metrics`, `/healthz` and `/readyz`; none when unset.
    #[arg(long, env = "REGPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// The admin endpoints also on a Unix socket at this path, answered by
    /// this process alone (the TCP admin address is shared with a
    /// successor during a handover): what `regproxy probe` asks.
    #[arg(long, env = "REGPROXY_PROBE_SOCKET")]
    pub probe_socket: Option<PathBuf>,

    /// Once every listener is bound, their addresses are written here as
    /// JSON, `{"listen":["ADDR"],"admin":"ADDR"}` (`null` without an admin
    /// listener), atomically: how a supervisor or a test learns a port 0.
    #[arg(long, env = "REGPROXY_READY_FILE")]
    pub ready_file: Option<PathBuf>,

    /// Most bytes per second this node takes from the upstream, across all
    /// fills: `10Mbit/s`, `5MiB/s`; `off`: no limit. Bytes from peers do
    /// not count. Changed live with `regproxy rate` (`PUT /admin/rate`).
    #[arg(long, env = "REGPROXY_UPSTREAM_RATE", default_value = "off", value_parser = parse_rate)]
    pub upstream_rate: u64,

    /// Images to prefetch in the background, one `REF [PLATFORM] [pin]` per
    /// line; read again whenever its content changes (a mounted ConfigMap).
    #[arg(long, env = "REGPROXY_PREFETCH_FILE")]
    pub prefetch_file: Option<PathBuf>,

    /// The credential prefetches send upstream, a docker `config.json`;
    /// without it they are anonymous.
    #[arg(long, env = "REGPROXY_PREFETCH_AUTH_FILE")]
    pub prefetch_auth_file: Option<PathBuf>,

    /// A file holding the token that the admin API (`/admin/...` on
    /// `--admin-listen`) requires as `Authorization: Bearer`; without it
    /// those endpoints answer 403. `/metrics` and the probes need none.
    #[arg(long, env = "REGPROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Longest a connection, on either listener, may wait for a whole request
    /// head: a new connection, and a kept-alive one between requests (hyper
    /// starts this timer whenever a connection waits for a request, so it is
    /// also the keep-alive idle timeout). Past it the connection is closed.
    #[arg(long, env = "REGPROXY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Most connections each listener (API, admin) holds open at once; a
    /// connection past it is answered 503 and closed at once, and the
    /// transfers already open are not touched. The default fits the pod's
    /// 128Mi with room even if every API connection drives a cold fill
    /// (README, Memory).
    #[arg(long, env = "REGPROXY_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,

    /// PEM file of extra CA certificates trusted for an https upstream
    /// (added to the built-in Mozilla roots).
    #[arg(long, env = "REGPROXY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Time allowed to open a TCP connection to the upstream.
    #[arg(long, env = "REGPROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Time allowed for upstream response headers, and between two reads of an
    /// upstream body; a stalled upstream past this fails over or gives 504.
    #[arg(long, env = "REGPROXY_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// How many times in a row a blob download that broke off is resumed
    /// (with a `Range` request from the byte where it stopped) before the
    /// fill fails; the count starts over once a resume brings 64 KiB.
    #[arg(long, env = "REGPROXY_UPSTREAM_RETRIES", default_value_t = 5)]
    pub upstream_retries: u32,

    /// After SIGTERM, how long transfers in flight may run before they are cut.
    #[arg(long, env = "REGPROXY_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// How the upstream's host name is resolved: `system` (getaddrinfo, which
    /// reads /etc/hosts) or `dns` (DNS only, via /etc/resolv.conf). Use `dns`
    /// on a node whose /etc/hosts maps the registry name to this proxy.
    #[arg(
        long,
        env = "REGPROXY_UPSTREAM_RESOLVER",
        value_enum,
        default_value = "system"
    )]
    pub upstream_resolver: crate::resolve::ResolverMode,

    /// How long a tag → digest answer is used without asking the upstream

    /// again (`0s`: always revalidate). Past it, one `HEAD` per tag.
    #[arg(long, env = "REGPROXY_TAG_TTL", default_value = "30s", value_parser = parse_duration)]
    pub tag_ttl: Duration,

    /// How long the upstream's yes to a credential for a repository lets
    /// that credential read the repository's cached content without asking.
    #[arg(long, env = "REGPROXY_AUTH_TTL", default_value = "60s", value_parser = parse_duration)]
    pub auth_ttl: Duration,

    /// Keep the upstream's yeses across restarts for this long, as keyed
    /// hashes in the cache dir (`allowed.json`, 0600), so that a client it
    /// allowed can pull cached content after a restart while the upstream is
    /// down. Off by default: yeses are kept in memory only.
    #[arg(long, env = "REGPROXY_REMEMBER_ALLOWED", value_parser = parse_duration)]
    pub remember_allowed: Option<Duration>,

    #[command(flatten)]
    pub peers: PeerArgs,

    #[command(flatten)]
    pub node: NodeArgs,

    /// Log lines as human text or one JSON object each.

    #[arg(long, env = "REGPROXY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (`info`, `regproxy=debug`, ...); `RUST_LOG` wins when set.
    #[arg(long, env = "REGPROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// The node path `serve` keeps in place and checks (and `doctor` checks):
/// the registry name in the node's hosts file, containerd's `hosts.toml`,
/// containerd's `config_path`. The paths are the node's, under `--node-root`.
/// Peers: the other nodes' proxies, asked for blobs before the upstream (see
/// [`crate::peers`]).
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The other nodes' peer listeners: `IP:PORT,IP:PORT,...`, or
    /// `dns:NAME:PORT` for every address NAME resolves to (through the
    /// resolver `--upstream-resolver` picks, so with `dns` never through
    /// /etc/hosts; asked again every 5 s), such as a headless Service over
    /// the DaemonSet. This node's own `--peer-listen` may be in
    /// the list. Unset or empty: peers off, every miss goes to the upstream.
    #[arg(long, env = "REGPROXY_PEERS", value_parser = crate::peers::parse_peers)]
    pub peers: Option<crate::peers::PeerList>,

    /// Address the peer listener binds (the node's IP and a port): it serves
    /// other nodes' proxies, content by digest only. Required with `--peers`.
    #[arg(long, env = "REGPROXY_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,

    /// File holding the secret every peer presents (a Kubernetes Secret, at
    /// least 16 bytes). Required with `--peers`.
    #[arg(long, env = "REGPROXY_PEER_SECRET_FILE")]
    pub peer_secret_file: Option<PathBuf>,

    /// Longest wait to connect to a peer, and its probe's timeout. A peer
    /// that sends nothing for this long is given up if its last probe
    /// failed, and waited on up to `--upstream-timeout` while its probes
    /// answer (it may be waiting on the uplink itself); given up, the next
    /// owner or the upstream sends the blob. Also the peer listener's
    /// longest wait for a request head.
    #[arg(long, env = "REGPROXY_PEER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub peer_timeout: Duration,
}

impl PeerArgs {
    /// The peers' configuration; `None` when peers are off.
    pub fn config(&self) -> Result<Option<crate::peers::PeerConfig>, String> {
        let list = match &self.peers {
            Some(l) if !l.is_empty() => l.clone(),
            _ => return Ok(None),
        };
        let listen = self
            .peer_listen
            .ok_or("--peers needs --peer-listen: the address other nodes ask")?;
        if listen.port() == 0 {
            return Err("--peer-listen needs a port: peers cannot find port 0".into());
        }
        if let crate::peers::PeerList::Dns { port, .. } = &list {
            if *port != listen.port() {
                return Err(format!(
                    "--peers dns:NAME:{port} and --peer-listen port {} differ: \
                     a node finds itself among the name's addresses by its own",
                    listen.port()
                ));
            }
        }
        if listen.ip().is_unspecified() {
            return Err(
                "--peer-listen must be this node's address as the other nodes \
                        list it (its IP), not a wildcard: it is how a node knows itself \
                        among the peers"
                    .into(),
            );
        }
        let path = self
            .peer_secret_file
            .as_ref()
            .ok_or("--peers needs --peer-secret-file: peers must prove they are peers")?;
        let secret = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --peer-secret-file {}: {e}", path.display()))?;
        let secret = secret.trim().to_owned();
        if secret.len() < crate::peers::MIN_SECRET {
            return Err(format!(
                "--peer-secret-file {} holds {} bytes; peers need a secret of at least {}",
                path.display(),
                secret.len(),
                crate::peers::MIN_SECRET
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "--peer-secret-file {}: the secret must be printable ASCII without spaces \
                 (e.g. base64 of random bytes)",
                path.display()
            ));
        }
        if self.peer_timeout.is_zero() {
            return Err("--peer-timeout must be longer than 0s".into());
        }
        Ok(Some(crate::peers::PeerConfig {
            list,
            listen,
            secret,
            timeout: self.peer_timeout,
        }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The registry name the node maps to this proxy (`name` or `name:port`,
    /// as image references spell it). Unset: no node path is kept or checked.
    #[arg(long, env = "REGPROXY_REGISTRY_NAME", value_parser = crate::hosts::parse_registry_host)]
    pub registry_name: Option<String>,

    /// Where the node's filesystem is mounted in this container (`/host`
    /// when the node's `/etc` is mounted at `/host/etc`).
    #[arg(long, env = "REGPROXY_NODE_ROOT", default_value = "/")]
    pub node_root: PathBuf,

    /// The node's hosts file, which maps the registry name to the proxy.
    #[arg(long, env = "REGPROXY_HOSTS_FILE", default_value = "/etc/hosts", value_parser = parse_path)]
    pub hosts_file: PathBuf,

    /// containerd's registry host folder on the node, where the proxy's
    /// `<name>/hosts.toml` goes; empty: no hosts.toml (a dockerd node).
    #[arg(long, env = "REGPROXY_CONTAINERD_CERTS_DIR", default_value = "/etc/containerd/certs.d", value_parser = parse_path)]
    pub containerd_certs_dir: PathBuf,

    /// containerd's config on the node, checked for a `config_path` that
    /// lists the certs dir; empty (or no certs dir): not checked.
    #[arg(long, env = "REGPROXY_CONTAINERD_CONFIG", default_value = "/etc/containerd/config.toml", value_parser = parse_path)]
    pub containerd_config: PathBuf,

    /// The `server` of hosts.toml, where containerd pulls when the proxy
    /// does not answer: the registry Service's own address,
    /// `http://CLUSTER-IP:PORT`. Default: `--upstream` with its host
    /// resolved to an address, again at every reconcile.
    #[arg(long, env = "REGPROXY_CONTAINERD_SERVER", value_parser = crate::hosts::parse_endpoint)]
    pub containerd_server: Option<String>,

    /// How often the hosts-file line and hosts.toml are put back in place
    /// (in place, keeping the inode) and the node path is checked.
    #[arg(long, env = "REGPROXY_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
}

impl NodeArgs {
    /// The node path to keep and check, or `None` without `--registry-name`.
    pub fn config(&self) -> Result<Option<crate::node::NodeConfig>, String> {
        let Some(name) = &self.registry_name else {
            return Ok(None);
        };
        if self.reconcile_interval.is_zero() {
            return Err("--reconcile-interval must be longer than 0s".into());
        }
        let opt = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
        if self.hosts_file.as_os_str().is_empty() {
            return Err("--hosts-file must name the node's hosts file".into());
        }
        Ok(Some(crate::node::NodeConfig {
            registry_name: name.clone(),
            root: self.node_root.clone(),
            hosts_file: self.hosts_file.clone(),
            certs_dir: opt(&self.containerd_certs_dir),
            containerd_config: opt(&self.containerd_config),
            server: self.containerd_server.clone(),
            interval: self.reconcile_interval,
        }))
    }
}

/// A path, or nothing (an empty value turns the feature off).
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

impl ServeArgs {
    /// Checks what clap's parsers cannot: values that parse but make no sense
    /// together or would disable a guarantee.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be longer than 0s: without it \
                        a client that never finishes its headers holds a connection forever"
                .into());
        }
        if self.upstream_timeout.is_zero() {
            return Err("--upstream-timeout must be longer than 0s".into());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(format!(
                "--max-connections must be between 1 and {MAX_CONNECTIONS}, not {}",
                self.max_connections
            ));
        }
        Ok(())
    }
}

/// The validated configuration of `serve`, built once from the flags by
/// [`ServeArgs::config`]; each part takes the piece it needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// `--ready-file`: where the bound addresses are written once bound.
    pub ready_file: Option<PathBuf>,
    /// `--probe-socket`: the admin endpoints of this process alone.
    pub probe_socket: Option<PathBuf>,
    pub prefetch_file: Option<PathBuf>,
    pub prefetch_auth_file: Option<PathBuf>,
    /// The contents of `--admin-token-file`, trimmed.
    pub admin_token: Option<String>,
    pub limits: crate::server::Limits,
    pub shutdown_grace: Duration,
    pub upstream: UpstreamConfig,
    pub tag_ttl: Duration,
    pub auth: AuthConfig,
    pub log: LogConfig,
    /// The node path kept and checked; `None` without `--registry-name`.
    pub node: Option<crate::node::NodeConfig>,
    pub peers: Option<crate::peers::PeerConfig>,
}

/// How the upstream is reached, and how hard a download is tried.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: Uri,
    pub ca: Option<PathBuf>,
    pub resolver: crate::resolve::ResolverMode,
    pub connect_timeout: Duration,
    /// Longest wait for a response head, and between two reads of a body.
    pub timeout: Duration,
    /// Resumes of a broken blob download before its fill fails.
    pub retries: u32,
    /// `--upstream-rate` in bytes per second at start; 0: no limit.
    pub rate: u64,
}

/// How long the upstream's answers about who may read are used.
#[derive(Debug, Clone, Copy)]
pub struct AuthConfig {
    /// `--auth-ttl`: a yes, and whether the upstream is open, stand this long.
    pub ttl: Duration,
    /// `--remember-allowed`: yeses kept on disk this long, or not at all.
    pub remember: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl ServeArgs {
    /// The validated configuration, or why the flags make none.
    pub fn config(self) -> Result<Config, String> {
        self.validate()?;
        let node = self.node.config()?;
        let peers = self.peers.config()?;
        if let Some(p) = &peers {
            // Two listeners on one port overlap when they share the IP or
            // one is a wildcard: `SO_REUSEPORT` would let both bind, and
            // split one port's connections between them.
            let overlaps = |other: SocketAddr| {
                other.port() == p.listen.port()
                    && (other.ip() == p.listen.ip() || other.ip().is_unspecified())
            };
            if overlaps(self.listen) || self.admin_listen.is_some_and(overlaps) {
                return Err("--peer-listen must not share a port with --listen or \
                            --admin-listen on the same or a wildcard address"
                    .into());
            }
        }
        let admin_token = match &self.admin_token_file {
            Some(p) => Some(read_token(p)?),
            None => None,
        };
        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            cache_dir: self.cache_dir,
            cache_size: self.cache_size,
            ready_file: self.ready_file,
            probe_socket: self.probe_socket,
            prefetch_file: self.prefetch_file,
            prefetch_auth_file: self.prefetch_auth_file,
            admin_token,
            limits: crate::server::Limits {
                header_read_timeout: self.header_read_timeout,
                max_connections: self.max_connections,
            },
            shutdown_grace: self.shutdown_grace,
            upstream: UpstreamConfig {
                url: self.upstream,
                ca: self.upstream_ca,
                resolver: self.upstream_resolver,
                connect_timeout: self.connect_timeout,
                timeout: self.upstream_timeout,
                retries: self.upstream_retries,
                rate: self.upstream_rate,
            },
            tag_ttl: self.tag_ttl,
            auth: AuthConfig {
                ttl: self.auth_ttl,
                remember: self.remember_allowed,
            },
            log: LogConfig {
                format: self.log_format,
                level: self.log_level,
            },
            node,
            peers,
        })
    }
}

/// The admin token in `path`: its contents without surrounding white
/// space, at least 16 characters, none of them white space or control.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("--admin-token-file {}: {e}", path.display()))?;
    let token = raw.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "--admin-token-file {}: the token must be one word of at least 16 characters",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Highest `--max-connections`: far past what one node's clients need, and
/// what a 128Mi memory limit can hold (see the README's memory section).
pub const MAX_CONNECTIONS: usize = 16_384;

/// Accepts only `http` and `https` URLs with a host and no path, query or userinfo.
pub fn parse_upstream(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("the upstream must start with http:// or https://".into()),
    }
    let authority = uri.authority().ok_or("the upstream URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("credentials do not belong in the upstream URL".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("the upstream URL must be scheme://host[:port] without a path".into());
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_must_be_a_bare_http_url() {
        assert!(parse_upstream("http://127.0.0.1:5000").is_ok());
        assert!(parse_upstream("https://registry.example").is_ok());
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("http://u:p@x").is_err());
        assert!(parse_upstream("http://x/v2/").is_err());
    }

    #[test]
    fn limits_are_validated() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["regproxy", "serve", "--upstream", "http://up:5000"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Serve(a) => a.validate(),
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), Ok(()), "the defaults are valid");
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert!(parse(&["--max-connections", "100000"]).is_err());
        assert!(parse(&["--header-read-timeout", "0s"]).is_err());
        assert!(parse(&["--upstream-timeout", "0s"]).is_err());
    }

    #[test]
    fn peers_need_their_listener_and_a_real_secret() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let spaced = dir.path().join("spaced");
        std::fs::write(&spaced, "a secret with spaces in it").unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["regproxy", "serve", "--upstream", "http://up:5000"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Serve(a) => a.config().map(|c| c.peers),
                _ => unreachable!(),
            }
        };
        let g = good.to_str().unwrap();
        let peers = ["--peers", "127.0.0.11:5001,127.0.0.12:5001"];
        assert!(parse(&[]).unwrap().is_none(), "no --peers, no peers");
        assert!(parse(&["--peers", ""]).unwrap().is_none(), "empty is off");
        let on = [
            &peers[..],
            &["--peer-listen", "127.0.0.11:5001", "--peer-secret-file", g],
        ]
        .concat();
        let p = parse(&on).unwrap().expect("peers on");
        assert_eq!(p.secret, "c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "trimmed");
        assert!(
            !format!("{p:?}").contains("c2VjcmV0"),
            "Debug hides the secret"
        );
        assert!(parse(&[&peers[..], &["--peer-secret-file", g]].concat()).is_err());
        let dns = |port: &str| {
            let list = format!("dns:peers.test:{port}");
            parse(&[
                "--peers",
                &list,
                "--peer-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                g,
            ])
        };
        assert!(dns("5001").unwrap().is_some());
        assert!(dns("5002").is_err(), "a node finds itself by its peer port");
        assert!(parse(&[&peers[..], &["--peer-listen", "127.0.0.11:5001"]].concat()).is_err());
        for bad in [
            &["--peer-listen", "0.0.0.0:5001", "--peer-secret-file", g][..],
            &["--peer-listen", "127.0.0.11:0", "--peer-secret-file", g],
            &["--peer-listen", "127.0.0.1:5000", "--peer-secret-file", g],
            &[
                "--peer-listen",
                "127.0.0.11:5000",
                "--listen",
                "0.0.0.0:5000",
                "--peer-secret-file",
                g,
            ],
            &[
                "--peer-listen",
                "127.0.0.11:5001",
                "--admin-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                g,
            ],
            &[
                "--peer-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                short.to_str().unwrap(),
            ],
            &[
                "--peer-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                spaced.to_str().unwrap(),
            ],
            &[
                "--peer-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                "/nonexistent/secret",
            ],
            &[
                "--peer-listen",
                "127.0.0.11:5001",
                "--peer-secret-file",
                g,
                "--peer-timeout",
                "0s",
            ],
        ] {
            assert!(parse(&[&peers[..], bad].concat()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_node_path_is_off_without_a_registry_name_and_empty_paths_turn_parts_off() {
        let node = |extra: &[&str]| {
            let mut argv = vec!["regproxy", "doctor"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).expect("parses").command {
                Command::Doctor(a) => a.node.config(),
                _ => unreachable!(),
            }
        };
        assert!(
            node(&[]).unwrap().is_none(),
            "no --registry-name, no node path"
        );
        let n = node(&["--registry-name", "reg.example", "--containerd-config", ""])
            .unwrap()
            .expect("a node path");
        assert_eq!(n.containerd_config, None);
        assert_eq!(
            n.certs_dir.as_deref(),
            Some(std::path::Path::new("/etc/containerd/certs.d"))
        );
        assert!(node(&[
            "--registry-name",
            "reg.example",
            "--reconcile-interval",
            "0s"
        ])
        .is_err());
    }

    #[test]
    fn every_serve_and_doctor_flag_reads_its_env_var() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").expect("serve exists");
        let doctor = cmd.find_subcommand("doctor").expect("doctor exists");
        for arg in serve.get_arguments().chain(doctor.get_arguments()) {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let want = format!("REGPROXY_{}", long.replace('-', "_").to_ascii_uppercase());
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long} should also be read from {want}"
            );
        }
    }
}
