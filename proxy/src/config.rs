//! Command line and environment: every `serve` flag is also read from
//! `REGPROXY_<FLAG>`. Validation happens here, before anything is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;

use crate::units::{parse_duration, parse_size};

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

    /// Once every listener is bound, their addresses are written here as
    /// JSON, `{"listen":["ADDR"],"admin":"ADDR"}` (`null` without an admin
    /// listener), atomically: how a supervisor or a test learns a port 0.
    #[arg(long, env = "REGPROXY_READY_FILE")]
    pub ready_file: Option<PathBuf>,

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

    /// How many times a blob download that broke off is resumed (with a
    /// `Range` request from the byte where it stopped) before the fill fails.
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

    /// Log lines as human text or one JSON object each.

    #[arg(long, env = "REGPROXY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (`info`, `regproxy=debug`, ...); `RUST_LOG` wins when set.
    #[arg(long, env = "REGPROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
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
                Command::Hosts(_) => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), Ok(()), "the defaults are valid");
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert!(parse(&["--max-connections", "100000"]).is_err());
        assert!(parse(&["--header-read-timeout", "0s"]).is_err());
        assert!(parse(&["--upstream-timeout", "0s"]).is_err());
    }

    #[test]
    fn every_serve_flag_reads_its_env_var() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").expect("serve exists");
        for arg in serve.get_arguments() {
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
