//! `regproxy doctor`: the node-path checks once, each printed with `ok` or
//! `FAILED` and the fix, plus whether the proxy answers at all and the
//! handover sysctl; exit 1 when a check fails. `regproxy sysctl`: sets that
//! sysctl.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use http::Uri;

use super::checks::{describe, run_all, who_answers, Answer, Failure};
use super::{fallback_server, node_address};
use crate::config::{parse_upstream, NodeArgs};
use crate::resolve::{Resolver, ResolverMode};

/// `regproxy doctor`: the flags of `serve` it needs, each also read from the
/// same `REGPROXY_*` variable, so that `kubectl exec ds/regproxy -- regproxy
/// doctor` sees the pod's configuration.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// The proxy's API address, as given to `serve`.
    #[arg(long, env = "REGPROXY_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,

    /// The proxy's admin address, as given to `serve`: its answer on
    /// `/_regproxy/instance` says which process the proxy is.
    #[arg(long, env = "REGPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// The proxy's cache dir: the ids of the processes serving it are the
    /// answers that count as the proxy.
    #[arg(long, env = "REGPROXY_CACHE_DIR", default_value = "/var/lib/regproxy")]
    pub cache_dir: PathBuf,

    /// The real registry, for the fallback server hosts.toml should name
    /// (unless `--containerd-server` is given).
    #[arg(long, env = "REGPROXY_UPSTREAM", value_parser = parse_upstream)]
    pub upstream: Option<Uri>,

    /// How the upstream's host name is resolved (see `serve`).
    #[arg(
        long,
        env = "REGPROXY_UPSTREAM_RESOLVER",
        value_enum,
        default_value = "system"
    )]
    pub upstream_resolver: ResolverMode,

    #[command(flatten)]
    pub node: NodeArgs,
}

/// The sysctl that lets a closing listener hand its queued connections to
/// another listener of its `SO_REUSEPORT` group (Linux >= 5.14).
pub const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Runs the checks, prints them, and returns whether all passed.
pub async fn doctor(args: DoctorArgs) -> Result<bool, String> {
    let node = args.node.config()?;
    // With the cache dir's key, the proxy must prove it holds it: a server
    // replaying a public id does not pass. (No key: serve never ran here.)
    let _ = crate::instance::init_key(&args.cache_dir, false);
    let proxy = node_address(args.listen);
    let mut all_ok = true;
    let mut print = |name: &str, r: Result<String, Failure>| match r {
        Ok(saw) => println!("ok      {name}: {saw}"),
        Err(f) => {
            all_ok = false;
            println!("FAILED  {name}: {}\n        fix: {}", f.reason, f.fix);
        }
    };

    let a = args.clone();
    let (answers, ours) = tokio::task::spawn_blocking(move || proxy_answers(&a))
        .await
        .map_err(|e| e.to_string())?;
    print("proxy_answers", answers);

    match &node {
        None => {
            println!("--      node path: not checked (no --registry-name / REGPROXY_REGISTRY_NAME)")
        }
        Some(node) => {
            let server = match (&node.server, &args.upstream) {
                (Some(s), _) => Ok(s.clone()),
                (None, Some(up)) => {
                    let r = Resolver::new(args.upstream_resolver).map_err(|e| e.to_string())?;
                    fallback_server(node, up, &r).await
                }
                (None, None) => Err("neither --containerd-server nor --upstream is given".into()),
            };
            let node = node.clone();
            let round = tokio::task::spawn_blocking(move || {
                run_all(
                    &node,
                    proxy,
                    &ours,
                    server.as_deref().map_err(String::as_str),
                )
            })
            .await
            .map_err(|e| e.to_string())?;
            for (check, result) in round {
                print(check.name(), result);
            }
        }
    }

    // Reported, not failed: it matters only while a proxy hands over.
    match crate::server::migrates_queued_connections() {
        Some(true) => println!("ok      tcp_migrate_req: net.ipv4.tcp_migrate_req = 1: a handover loses no queued connection"),
        Some(false) => println!(
            "WARN    tcp_migrate_req: net.ipv4.tcp_migrate_req = 0: connections queued on a proxy that hands over to its successor are reset\n        \
             fix: `regproxy sysctl` as root in the node's network namespace (the DaemonSet's init container does it)"
        ),
        None => println!(
            "WARN    tcp_migrate_req: this kernel has no net.ipv4.tcp_migrate_req (Linux >= 5.14): \
             connections queued on a proxy that hands over are reset"
        ),
    }
    Ok(all_ok)
}

/// `proxy_answers`: the proxy answers as a regproxy, on its admin address
/// when there is one (a DNAT rule that captures the registry address, as
/// the portmap plugin's does, may capture `--listen` too), else on
/// `--listen`. Returns what it saw and the ids that count as the proxy: the
/// one that answered and those serving the cache dir.
fn proxy_answers(args: &DoctorArgs) -> (Result<String, Failure>, Vec<String>) {
    let mut ours = crate::instance::sharing(&args.cache_dir);
    let at = node_address(args.admin_listen.unwrap_or(args.listen));
    let fail = |reason: String| Failure {
        reason,
        fix:
            "check that `regproxy serve` runs with these --listen, --admin-listen and --cache-dir \
              (REGPROXY_LISTEN, REGPROXY_ADMIN_LISTEN, REGPROXY_CACHE_DIR)"
                .into(),
    };
    // Whatever regproxy answers there is the proxy the checks then judge.
    let result = match who_answers(at, &at.ip().to_string(), &[]) {
        Answer::Other { status, body }
            if status.contains(" 200 ") && crate::instance::is_id(body.trim()) =>
        {
            let id = body.trim();
            ours.push(id.to_owned());
            Ok(format!("{at} answers as regproxy instance {id}"))
        }
        Answer::Other { status, body } => Err(fail(format!(
            "{at} is answered by something other than regproxy: {}",
            describe(&status, &body)
        ))),
        Answer::Ours(id) => Ok(format!("{at} answers as regproxy instance {id}")),
        Answer::Nothing(e) => Err(fail(format!("nothing answers on {at}: {e}"))),
    };
    (result, ours)
}

/// `regproxy sysctl`: sets `net.ipv4.tcp_migrate_req` to 1 and says what it
/// did. A kernel without it is not an error: handovers work, only
/// connections queued at the moment one hands over are reset.
pub fn sysctl() -> Result<String, String> {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(
            "net.ipv4.tcp_migrate_req does not exist in this kernel (Linux >= 5.14 has it); left as is"
                .into(),
        ),
        Err(e) => Err(format!("cannot read {MIGRATE_REQ}: {e}")),
        Ok(v) if v.trim() == "1" => Ok("net.ipv4.tcp_migrate_req is already 1".into()),
        Ok(v) => {
            std::fs::write(MIGRATE_REQ, "1\n")
                .map_err(|e| format!("cannot set net.ipv4.tcp_migrate_req=1 ({MIGRATE_REQ}): {e} (needs root: CAP_NET_ADMIN in the node's network namespace)"))?;
            Ok(format!(
                "net.ipv4.tcp_migrate_req set to 1 (was {})",
                v.trim()
            ))
        }
    }
}
