//! The command line: `seed`, `pull`, `compare`, `soak`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::compare::{self, Params};
use crate::procs::AccessLog;
use crate::registry::Registry;
use crate::report::human;
use crate::synth::{self, ImageSetShape, LAYER_TYPE};
use crate::targets::{Kind, Tools};
use crate::workload::{self, ImageRef};
use regproxy::units::{parse_duration, parse_size, parse_size_list};

/// The edge-cluster pull workload, and regproxy compared with the alternatives.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Push synthetic images (shared base layers, a size mix, tags) to a registry.
    Seed(SeedArgs),
    /// Pull images through a registry with N concurrent clients, verifying every blob.
    Pull(PullArgs),
    /// Start the upstream and every target with fresh caches, run all scenarios, report.
    Compare(Box<CompareArgs>),
    /// Mixed traffic and random faults against regproxy for a set time, every
    /// completed response checked against the truth; reports and fails on a wrong one.
    Soak(Box<SoakArgs>),
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub params: crate::soak::Params,
    /// The regproxy binary [default: `regproxy` next to this executable].
    #[arg(long, env = "REGPROXY_BIN")]
    pub regproxy_bin: Option<PathBuf>,
    /// Distribution 2.8, the upstream.
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    pub registry_bin: PathBuf,
    /// Where logs, the upstream's storage and the cache's tmpfs go [default:
    /// a temp dir, removed afterwards].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Write `soak.txt`, `soak.json` and `soak.svg` here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Registry to push to, `host:port`.
    #[arg(long)]
    pub registry: String,
    /// Number of images, `<prefix>-<i>:v1`.
    #[arg(long, default_value_t = 4)]
    pub images: usize,
    /// Repository prefix of the images.
    #[arg(long, default_value = "bench/app")]
    pub prefix: String,
    /// Layers every image shares (its base), comma-separated sizes.
    #[arg(long, default_value = "48MiB,16MiB", value_parser = parse_size_list)]
    pub shared_layers: std::vec::Vec<u64>,
    /// Layers of each image's own, comma-separated sizes.
    #[arg(long, default_value = "24MiB,4MiB,512KiB", value_parser = parse_size_list)]
    pub unique_layers: std::vec::Vec<u64>,
    /// Also push one standalone blob of this size to `bench/blobs` (repeatable).
    #[arg(long = "blob", value_parser = parse_size)]
    pub blobs: Vec<u64>,
    /// Distinguishes image sets: another seed gives other content.
    #[arg(long, default_value_t = 10)]
    pub seed: u64,
    /// Per request, and per body between two reads.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Registry to pull through, `host:port`.
    #[arg(long)]
    pub registry: String,
    /// Images to pull, `name:tag`, comma-separated or repeated.
    #[arg(long = "image", value_delimiter = ',', required = true)]
    pub images: Vec<String>,
    /// Clients pulling at the same time, each pulling every image.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Blobs one client downloads at once (containerd's default is 3).
    #[arg(long, default_value_t = 3)]
    pub layer_concurrency: usize,
    /// Distribution access log of the upstream, to count the bytes it sent.
    #[arg(long)]
    pub upstream_log: Option<PathBuf>,
    /// regproxy's admin address, to read `regproxy_upstream_bytes_total`.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Per request, and per body between two reads.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub params: Params,
    /// The regproxy binary [default: `regproxy` next to this executable].
    #[arg(long, env = "REGPROXY_BIN")]
    pub regproxy_bin: Option<PathBuf>,
    /// Distribution 2.8 (the upstream, and the Distribution proxy target).
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    pub registry_bin: PathBuf,
    /// nginx (the proxy_cache target).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx_bin: PathBuf,
    /// Where caches and logs go [default: a temp dir, removed afterwards].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Write the report and the checks as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the chart as SVG here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write the cluster scenario's chart as SVG here.
    #[arg(long)]
    pub cluster_svg: Option<PathBuf>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Seed(a) => seed(a).await,
        Command::Pull(a) => pull(a).await,
        // On Ctrl-C or SIGTERM the run is dropped, which stops every process it
        // started and removes its namespace and temp dirs.
        Command::Compare(a) => tokio::select! {
            r = compare(*a) => r,
            s = interrupted() => bail!("stopped by {s}"),
        },
        Command::Soak(a) => tokio::select! {
            r = soak(*a) => r,
            s = interrupted() => bail!("stopped by {s}"),
        },
    }
}

async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn seed(a: SeedArgs) -> anyhow::Result<()> {
    let reg = Registry::new(&a.registry, a.timeout);
    reg.wait_ready(Duration::from_secs(10)).await?;
    let shape = ImageSetShape {
        prefix: a.prefix.clone(),
        images: a.images,
        shared_layers: a.shared_layers.clone(),
        unique_layers: a.unique_layers.clone(),
        seed: a.seed,
    };
    let (images, blobs) = tokio::task::spawn_blocking(move || {
        let blobs: Vec<_> = a
            .blobs
            .iter()
            .enumerate()
            .map(|(i, &s)| synth::blob(a.seed * 7919 + i as u64, s, LAYER_TYPE))
            .collect();
        (synth::image_set(&shape), blobs)
    })
    .await?;
    let mut pushed = 0;
    for b in &blobs {
        if reg.push_blob("bench/blobs", b).await? {
            pushed += b.size;
        }
        println!("bench/blobs@{} {}", b.digest, b.size);
    }
    for img in &images {
        pushed += reg
            .push_image(img)
            .await
            .with_context(|| format!("pushing {}", img.reference()))?;
        println!("{}", img.reference());
    }
    eprintln!(
        "seeded {} images ({} distinct blob bytes) and {} blobs; {} pushed",
        images.len(),
        human(synth::distinct_blob_bytes(&images)),
        blobs.len(),
        human(pushed)
    );
    Ok(())
}

async fn pull(a: PullArgs) -> anyhow::Result<()> {
    let images = a
        .images
        .iter()
        .map(|s| ImageRef::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log = a.upstream_log.clone().map(|path| AccessLog { path });
    let mark = log.as_ref().map(AccessLog::mark);
    let metric_before = match &a.metrics {
        Some(m) => Some(crate::registry::regproxy_upstream_bytes(m).await? as f64),
        None => None,
    };
    let out = workload::pull_images(
        &a.registry,
        a.timeout,
        &images,
        a.clients,
        a.layer_concurrency,
    )
    .await;
    let upstream = match (&log, mark) {
        (Some(l), Some(m)) => {
            l.settle(Duration::from_millis(300), Duration::from_secs(5));
            Some(l.usage(m, None))
        }
        _ => None,
    };
    let metric = match (&a.metrics, metric_before) {
        (Some(m), Some(b)) => Some(crate::registry::regproxy_upstream_bytes(m).await? as f64 - b),
        _ => None,
    };
    println!(
        "{} clients × {} images: {:.2}s, {:.1} MiB/s, {} blobs and manifests verified, {} errors",
        a.clients,
        images.len(),
        out.wall.as_secs_f64(),
        out.mib_per_s(),
        out.verified,
        out.errors
    );
    println!(
        "per image  p50 {:.1} ms  p99 {:.1} ms",
        out.image_latency.percentile_ms(50.0),
        out.image_latency.percentile_ms(99.0)
    );
    println!(
        "per blob   p50 {:.1} ms  p99 {:.1} ms",
        out.blob_latency.percentile_ms(50.0),
        out.blob_latency.percentile_ms(99.0)
    );
    if let Some(u) = upstream {
        println!(
            "upstream (access log): {} blob GETs, {} of blobs, {} in all",
            u.blob_gets,
            human(u.blob_bytes),
            human(u.bytes)
        );
    }
    if let Some(m) = metric {
        println!("upstream (regproxy metrics): {}", human(m as u64));
    }
    for e in &out.first_errors {
        println!("error: {e}");
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "clients": a.clients,
            "images": images,
            "wall_s": out.wall.as_secs_f64(),
            "mib_per_s": out.mib_per_s(),
            "bytes": out.bytes,
            "verified": out.verified,
            "errors": out.errors,
            "first_errors": out.first_errors,
            "image_p50_ms": out.image_latency.percentile_ms(50.0),
            "image_p99_ms": out.image_latency.percentile_ms(99.0),
            "blob_p50_ms": out.blob_latency.percentile_ms(50.0),
            "blob_p99_ms": out.blob_latency.percentile_ms(99.0),
            "upstream": upstream,
            "upstream_bytes_metric": metric,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    if out.errors > 0 {
        bail!("{} of {} requests failed", out.errors, out.requests);
    }
    Ok(())
}

fn default_regproxy() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name("regproxy"))
}

async fn soak(a: SoakArgs) -> anyhow::Result<()> {
    let tools = Tools {
        registry: a.registry_bin.clone(),
        nginx: PathBuf::new(),
        regproxy: match &a.regproxy_bin {
            Some(p) => p.clone(),
            None => default_regproxy()?,
        },
    };
    let temp;
    let work = match &a.work_dir {
        Some(w) => w.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("loadtest-soak-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let setup = crate::soak::Setup { tools, work };
    crate::soak::main(a.params, setup, a.out).await
}

async fn compare(a: CompareArgs) -> anyhow::Result<()> {
    for s in &a.params.scenarios {
        let known = compare::SCENARIOS.iter().any(|(id, _)| id == s)
            || s == compare::CLUSTER
            || s == compare::BUDGET;
        if !known {
            bail!("unknown scenario {s:?}; see --help");
        }
    }
    let tools = Tools {
        registry: a.registry_bin.clone(),
        nginx: a.nginx_bin.clone(),
        regproxy: match &a.regproxy_bin {
            Some(p) => p.clone(),
            None => default_regproxy()?,
        },
    };
    // The cluster scenario runs regproxy (and direct) whatever `--targets` says.
    let p = &a.params;
    let on_targets = p.wants_loopback() || p.wants_uplink();
    for (needed, path) in [
        (true, &tools.registry),
        (on_targets && p.targets.contains(&Kind::Nginx), &tools.nginx),
        (
            (on_targets && p.targets.contains(&Kind::Regproxy))
                || p.wants(compare::CLUSTER)
                || p.wants_budget(),
            &tools.regproxy,
        ),
    ] {
        if needed && !path.is_file() {
            bail!(
                "{} is missing (scripts/deps.sh installs the peers; `cargo build --release -p regproxy` builds regproxy)",
                path.display()
            );
        }
    }
    let temp;
    let work = match &a.work_dir {
        Some(w) => w.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("loadtest-compare-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let report = compare::run(a.params, tools, work).await?;
    let mut checks = crate::report::checks(&report);
    print!("{}", crate::report::table(&report));
    if let Some(c) = &report.cluster {
        println!();
        print!("{}", crate::cluster::report::table(c));
        checks.extend(crate::cluster::report::checks(c));
    }
    if let Some(b) = &report.budget {
        println!();
        print!("{}", crate::budget::report::table(b));
        checks.extend(crate::budget::report::checks(b));
    }
    println!();
    print!("{}", crate::report::checks_text(&checks));
    if let Some(path) = &a.json {
        let v = serde_json::json!({ "report": report, "checks": checks });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, crate::report::svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let (Some(path), Some(c)) = (&a.cluster_svg, &report.cluster) {
        std::fs::write(path, crate::cluster::report::svg(c, &report.machine))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let errors: u64 = report.rows.iter().map(|r| r.errors).sum::<u64>()
        + report
            .cluster
            .as_ref()
            .map_or(0, crate::cluster::report::errors)
        + report
            .budget
            .as_ref()
            .map_or(0, crate::budget::report::errors);
    if errors > 0 {
        bail!("{errors} requests failed or did not verify (see the errors column and the JSON)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_size_and_duration_parses() {
        let parse = |argv: &[&str]| match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{argv:?} should parse with the defaults: {e}"),
        };
        let Command::Compare(c) = parse(&["loadtest", "compare"]) else {
            unreachable!()
        };
        assert_eq!((c.params.big, c.params.medium), (256 << 20, 16 << 20));
        assert_eq!(c.params.unique_layers, vec![24 << 20, 4 << 20, 512 << 10]);
        assert_eq!(c.params.small_duration, Duration::from_secs(1));
        let Command::Seed(s) = parse(&["loadtest", "seed", "--registry", "r", "--blob", "4KiB"])
        else {
            unreachable!()
        };
        assert_eq!(
            (s.shared_layers, s.blobs),
            (vec![48 << 20, 16 << 20], vec![4096])
        );
        parse(&["loadtest", "pull", "--registry", "r", "--image", "a:v1"]);
        let Command::Soak(s) = parse(&["loadtest", "soak"]) else {
            unreachable!()
        };
        assert_eq!(s.params.duration, Duration::from_secs(60));
        assert_eq!(s.params.cache_size, 32 << 20);
    }

    #[test]
    fn sizes_are_the_proxys_grammar() {
        for bad in [["--big", "1.5GiB"], ["--shared-layers", "1MiB,,2"]] {
            let argv = ["loadtest", "compare", bad[0], bad[1]];
            assert!(
                Cli::try_parse_from(argv).is_err(),
                "{bad:?} should be refused as the proxy refuses it"
            );
        }
    }
}
