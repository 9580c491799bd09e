//! Node set-up, `regproxy hosts ...`: the `/etc/hosts` line and containerd's
//! `certs.d/<name>/hosts.toml` that send a node's pulls of the registry name to
//! the proxy, and their removal.
//!
//! - `etc_hosts`: the one marked line in `/etc/hosts`, edited in place.
//! - `containerd`: our `hosts.toml`, written atomically, removed only if ours.
//!
//! Here: the command line, what the command prints, its errors.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

mod containerd;
mod etc_hosts;

pub(crate) use containerd::TOML_MARK;
pub use containerd::{containerd_hosts_toml, ensure_containerd, hosts_toml, remove_containerd};
pub use etc_hosts::{
    ensure_entry, ensure_hosts_file, lookup, remove_entry, remove_from_hosts_file,
};

/// `regproxy hosts ...`: the node set-up, run by the DaemonSet's init
/// containers and by the uninstall Job.
#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub action: HostsAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum HostsAction {
    /// Map NAME to ADDRESS in the hosts file: one line, marked as ours, the
    /// file rewritten in place; running it again changes nothing.
    Ensure(EnsureArgs),
    /// Delete the line `ensure` wrote, restoring the file's previous bytes.
    Remove(RemoveArgs),
    /// containerd: `<certs-dir>/<name>/hosts.toml`, so the CRI pulls NAME over
    /// plain HTTP from the proxy.
    #[command(subcommand)]
    Containerd(ContainerdAction),
}

#[derive(Debug, Clone, Args)]
pub struct EnsureArgs {
    /// The hosts file to edit (in a container: the node's, mounted).
    #[arg(long, default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
    /// Host name to map, e.g. `knative.registry.svc.cluster.local`.
    #[arg(long, value_parser = parse_host_name)]
    pub name: String,
    /// Address NAME resolves to: where the proxy listens, e.g. `127.0.0.2`.
    #[arg(long)]
    pub address: IpAddr,
}

#[derive(Debug, Clone, Args)]
pub struct RemoveArgs {
    /// The hosts file to edit.
    #[arg(long, default_value = "/etc/hosts")]
    pub hosts_file: PathBuf,
    /// Host name whose managed line goes.
    #[arg(long, value_parser = parse_host_name)]
    pub name: String,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ContainerdAction {
    /// Write `<certs-dir>/<name>/hosts.toml` pointing NAME at ENDPOINT.
    Ensure(ContainerdEnsureArgs),
    /// Delete the `hosts.toml` that `ensure` wrote (and its folder when empty).
    Remove(ContainerdRemoveArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ContainerdEnsureArgs {
    /// containerd's registry host folder (`config_path` in its CRI config).
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub certs_dir: PathBuf,
    /// Registry host as it appears in image references: `name` or `name:port`.
    #[arg(long, value_parser = parse_registry_host)]
    pub name: String,
    /// The proxy, `http://IP:PORT`, e.g. `http://127.0.0.2:80`.
    #[arg(long, value_parser = parse_endpoint)]
    pub endpoint: String,
    /// Where containerd pulls from when the proxy does not answer: the
    /// registry's own address, e.g. its Service's `http://CLUSTER-IP:PORT`
    /// (not the name, which the node's `/etc/hosts` sends to the proxy).
    #[arg(long, value_parser = parse_endpoint)]
    pub server: String,
}

#[derive(Debug, Clone, Args)]
pub struct ContainerdRemoveArgs {
    /// containerd's registry host folder.
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    pub certs_dir: PathBuf,
    /// Registry host as it appears in image references.
    #[arg(long, value_parser = parse_registry_host)]
    pub name: String,
}

/// What went wrong with the node set-up; each carries the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is locked by another process for more than {}s", etc_hosts::LOCK_TIMEOUT.as_secs())]
    LockTimeout { path: PathBuf },
    #[error(
        "{path} line {line} maps {name} to {existing}, and that line is not managed by regproxy: \
         remove it or map the name to {wanted} yourself"
    )]
    Conflict {
        path: PathBuf,
        line: usize,
        name: String,
        existing: String,
        wanted: IpAddr,
    },
    #[error("{path} exists and was not written by regproxy; refusing to overwrite it")]
    NotOurs { path: PathBuf },
}

impl HostsError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HostsError + 'a {
        move |source| HostsError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// What a command did, printed as one line for the init container's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Updated,
    Unchanged,
    /// An entry not written by regproxy already maps the name as wanted.
    PresentUnmanaged {
        line: usize,
    },
    Removed,
    Absent,
    /// A file with the name's configuration exists but is not ours.
    LeftAlone,
}

/// Runs a `regproxy hosts` command and prints what it did.
pub fn run(args: HostsArgs) -> Result<(), HostsError> {
    let (what, outcome) = match args.action {
        HostsAction::Ensure(a) => {
            let outcome = ensure_hosts_file(&a.hosts_file, &a.name, a.address)?;
            (
                format!("{} {} in {}", a.address, a.name, a.hosts_file.display()),
                outcome,
            )
        }
        HostsAction::Remove(a) => {
            let outcome = remove_from_hosts_file(&a.hosts_file, &a.name)?;
            (format!("{} in {}", a.name, a.hosts_file.display()), outcome)
        }
        HostsAction::Containerd(ContainerdAction::Ensure(a)) => {
            let outcome = ensure_containerd(&a.certs_dir, &a.name, &a.endpoint, &a.server)?;
            let path = containerd_hosts_toml(&a.certs_dir, &a.name);
            (
                format!(
                    "{} -> {} (fallback {}) in {}",
                    a.name,
                    a.endpoint,
                    a.server,
                    path.display()
                ),
                outcome,
            )
        }
        HostsAction::Containerd(ContainerdAction::Remove(a)) => {
            let outcome = remove_containerd(&a.certs_dir, &a.name)?;
            let path = containerd_hosts_toml(&a.certs_dir, &a.name);
            (format!("{} in {}", a.name, path.display()), outcome)
        }
    };
    let verb = match outcome {
        Outcome::Added => "added".to_owned(),
        Outcome::Updated => "updated".to_owned(),
        Outcome::Unchanged => "already present".to_owned(),
        Outcome::PresentUnmanaged { line } => {
            format!("already mapped by line {line}, which regproxy does not manage; left alone:")
        }
        Outcome::Removed => "removed".to_owned(),
        Outcome::Absent => "nothing to remove:".to_owned(),
        Outcome::LeftAlone => "not written by regproxy, left alone:".to_owned(),
    };
    println!("regproxy hosts: {verb} {what}");
    Ok(())
}

// ---- argument parsing ------------------------------------------------------

/// A DNS host name: dot-separated labels of letters, digits and `-`.
pub fn parse_host_name(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not a host name such as knative.registry.svc.cluster.local");
    if s.is_empty() || s.len() > 253 {
        return Err(bad());
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(s.to_owned())
}

/// A registry host as image references spell it: `name` or `name:port`.
pub fn parse_registry_host(s: &str) -> Result<String, String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    };
    parse_host_name(host)?;
    if let Some(port) = port {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{port}` is not a port number"))?;
    }
    Ok(s.to_owned())
}

/// `http://host[:port]` or `https://host[:port]`, nothing after the authority.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
        return Err(format!("`{s}` must start with http:// or https://"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{s}` has no host"))?;
    if authority.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some()
    {
        return Err(format!(
            "`{s}` must be scheme://host[:port] and nothing more"
        ));
    }
    Ok(format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        authority
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "knative.registry.svc.cluster.local";

    #[test]
    fn names_and_endpoints_are_checked() {
        assert!(parse_host_name(NAME).is_ok());
        for bad in ["", "a..b", "-a.b", "a/b", "../etc", "a b", "a_b"] {
            assert!(
                parse_host_name(bad).is_err(),
                "`{bad}` should be refused as a host name"
            );
        }
        assert!(parse_registry_host("localhost:5000").is_ok());
        assert!(parse_registry_host("localhost:0").is_err());
        assert!(parse_registry_host("../x:5000").is_err());
        assert_eq!(
            parse_endpoint("http://127.0.0.2:80/").unwrap(),
            "http://127.0.0.2:80"
        );
        assert!(parse_endpoint("http://127.0.0.2:80/v2").is_err());
        assert!(parse_endpoint("unix:///x").is_err());
    }
}
