//! `serve`'s node-path loop: at start-up and then every
//! `--reconcile-interval`, put the hosts-file line and hosts.toml back in
//! place (as `regproxy hosts` writes them: the hosts file in place, keeping
//! its inode), then run the checks. A repair is logged and counted; a check
//! logs only when its result changes; `/readyz` answers from the last round.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use super::checks::{run_all, Check, Failure};
use super::{endpoint, fallback_server, NodeConfig, Status};
use crate::hosts::{ensure_containerd, ensure_hosts_file, HostsError, Outcome};
use crate::metrics::Metrics;
use crate::resolve::{Resolver, ResolverMode};

/// After a round with a failed check, the next comes at most this late, so
/// that a fixed node is ready again soon whatever the interval.
const RETRY_FAILED: Duration = Duration::from_secs(5);

/// What the loop needs besides the node config.
struct Ctx {
    node: NodeConfig,
    /// Where the node reaches the proxy (the bound API address).
    proxy: SocketAddr,
    cache_dir: PathBuf,
    upstream: Uri,
    resolver: Resolver,
    metrics: Arc<Metrics>,
}

/// Starts the loop when `--registry-name` is set, for the proxy bound on
/// `api`; returns the status `/readyz` reads. The first round runs at once.
pub fn start(
    config: &crate::config::Config,
    api: SocketAddr,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<Status>>> {
    let Some(node) = config.node.clone() else {
        return Ok(None);
    };
    let resolver = resolver(config.upstream.resolver)?;
    let status = Arc::new(Status::default());
    let ctx = Ctx {
        node,
        proxy: super::node_address(api),
        cache_dir: config.cache_dir.clone(),
        upstream: config.upstream.url.clone(),
        resolver,
        metrics: Arc::clone(metrics),
    };
    tokio::spawn(run(ctx, Arc::clone(&status)));
    Ok(Some(status))
}

fn resolver(mode: ResolverMode) -> anyhow::Result<Resolver> {
    Resolver::new(mode).map_err(|e| anyhow::anyhow!("cannot set up the upstream resolver: {e}"))
}

async fn run(ctx: Ctx, status: Arc<Status>) {
    let ctx = Arc::new(ctx);
    let mut server: Result<String, String> = Err("not resolved yet".into());
    let mut last: BTreeMap<Check, Result<(), String>> = BTreeMap::new();
    let mut repair_errors: [Option<String>; 2] = [None, None];
    loop {
        match fallback_server(&ctx.node, &ctx.upstream, &ctx.resolver).await {
            Ok(s) => server = Ok(s),
            // Keep the address learnt last: the Service's IP rarely moves.
            Err(e) if server.is_err() => server = Err(e),
            Err(e) => tracing::debug!(error = %e, "keeping the last fallback server"),
        }
        let (c, s) = (Arc::clone(&ctx), server.clone());
        let Ok((repairs, round)) = tokio::task::spawn_blocking(move || {
            let repairs = repair(&c, s.as_deref().ok());
            let ours = ours(&c);
            (
                repairs,
                run_all(
                    &c.node,
                    c.proxy,
                    &ours,
                    s.as_deref().map_err(String::as_str),
                ),
            )
        })
        .await
        else {
            tracing::error!("the node-path round panicked");
            return;
        };
        record_repairs(&ctx, repairs, &mut repair_errors);
        let failed = round.iter().any(|(_, r)| r.is_err());
        for (check, result) in &round {
            ctx.metrics.node_path.set_ok(check.name(), result.is_ok());
            log_change(*check, result, &mut last);
        }
        status.set(round);
        let wait = if failed {
            ctx.node.interval.min(RETRY_FAILED)
        } else {
            ctx.node.interval
        };
        tokio::time::sleep(wait).await;
    }
}

/// The instance ids that count as this proxy: this process, and any other
/// serving the same cache dir (a successor or predecessor in a handover).
fn ours(ctx: &Ctx) -> Vec<String> {
    let mut ids = crate::instance::sharing(&ctx.cache_dir);
    ids.push(crate::instance::id().to_owned());
    ids
}

/// One repair attempt per file, in the order of [`FILES`]; `None` when
/// there was nothing to try (no certs dir, or no server known).
type Repairs = [Option<Result<Outcome, HostsError>>; 2];

const FILES: [&str; 2] = ["etc_hosts", "hosts_toml"];

fn repair(ctx: &Ctx, server: Option<&str>) -> Repairs {
    let node = &ctx.node;
    let hosts = ensure_hosts_file(&node.on_node(&node.hosts_file), node.host(), ctx.proxy.ip());
    let toml = node.certs_dir.as_ref().zip(server).map(|(certs, server)| {
        ensure_containerd(
            &node.on_node(certs),
            &node.registry_name,
            &endpoint(ctx.proxy),
            server,
        )
    });
    [Some(hosts), toml]
}

fn record_repairs(ctx: &Ctx, repairs: Repairs, errors: &mut [Option<String>; 2]) {
    let counters: [&AtomicU64; 2] = [
        &ctx.metrics.node_path.repairs_etc_hosts,
        &ctx.metrics.node_path.repairs_hosts_toml,
    ];
    for (i, r) in repairs.into_iter().enumerate() {
        let file = FILES[i];
        match r {
            None => {}
            Some(Ok(o @ (Outcome::Added | Outcome::Updated))) => {
                counters[i].fetch_add(1, Ordering::Relaxed);
                errors[i] = None;
                tracing::warn!(file, outcome = ?o, name = %ctx.node.registry_name, "node path repaired: put our entry back");
            }
            Some(Ok(_)) => errors[i] = None,
            Some(Err(e)) => {
                let e = e.to_string();
                if errors[i].as_ref() != Some(&e) {
                    tracing::warn!(file, error = %e, "cannot repair the node path");
                    errors[i] = Some(e);
                }
            }
        }
    }
}

/// Logs a check's result when it differs from the last: a warning when it
/// fails (or fails for another reason), info when it passes again.
fn log_change(
    check: Check,
    result: &Result<String, Failure>,
    last: &mut BTreeMap<Check, Result<(), String>>,
) {
    let now = result.as_ref().map(|_| ()).map_err(|f| f.reason.clone());
    if last.get(&check) == Some(&now) {
        return;
    }
    match result {
        Ok(saw) if last.contains_key(&check) => {
            tracing::info!(check = check.name(), %saw, "node path check passes again")
        }
        Ok(saw) => tracing::info!(check = check.name(), %saw, "node path check passes"),
        Err(f) => tracing::warn!(
            check = check.name(),
            reason = %f.reason,
            fix = %f.fix,
            "node path check failed: /readyz answers 503"
        ),
    }
    last.insert(check, now);
}
