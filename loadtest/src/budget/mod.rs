//! The `budget` scenario (issue 12): a rollout pull while regproxy prefetches
//! a large image, both across the shaped uplink, measured three ways in one
//! run, each on a fresh regproxy, cache and upstream process:
//! - **no prefetch**: the rollout pull alone (regproxy without
//!   `--upstream-rate`), the baseline;
//! - **shaped**: regproxy with `--upstream-rate` at about the uplink's rate
//!   (`--budget-rate`, default 95 % of `--uplink-mbit`), where a prefetch
//!   fill gets at most a tenth of the budget while a client waits on a fill;
//! - **unshaped**: regproxy without `--upstream-rate`: the prefetch takes
//!   what TCP gives it.
//!
//! In the two prefetch setups the prefetch (`POST /admin/prefetch` with the
//! admin token, its NDJSON read to the end) starts first; the rollout pull
//! starts once regproxy has taken `--budget-head-start` from the upstream,
//! so that the prefetch's fills are under way. The rollout is
//! `--budget-clients` clients pulling one image as a container runtime does
//! (tag, manifest, config and layers a few at a time, every blob
//! verified). Reported: the pull's time in each setup and its ratio to the
//! baseline, how long the prefetch took, and what it got from the upstream
//! while the pull ran.
//!
//! - [`report`]: the table and the checks.

pub mod report;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use regproxy::units::{parse_size, parse_size_list};
use serde::Serialize;

use crate::netns::Uplink;
use crate::procs::{free_port, Proc, UpstreamUse};
use crate::registry::regproxy_upstream_bytes;
use crate::synth::{self, ImageSpec, LAYER_TYPE};
use crate::targets::{start_upstream, wait_ready, Tools};
use crate::workload::{self, ImageRef};

/// The `budget` scenario's flags (part of `loadtest compare`'s; the uplink
/// is `--uplink-mbit`'s).
//
// The size lists are spelt `std::vec::Vec` so that clap takes each as one value.
#[derive(Debug, Clone, Serialize, clap::Args)]
#[group(id = "budget-params")]
pub struct Params {
    /// Layers of the rollout's image, `bench/budget-rollout:v1`.
    #[arg(long, default_value = "16MiB,8MiB,4MiB,1MiB", value_parser = parse_size_list)]
    pub budget_rollout_layers: std::vec::Vec<u64>,
    /// Clients pulling the rollout's image at once.
    #[arg(long, default_value_t = 1)]
    pub budget_clients: usize,
    /// Layers of the image being prefetched, `bench/budget-prefetch:v1`.
    #[arg(long, default_value = "64MiB,64MiB,64MiB", value_parser = parse_size_list)]
    pub budget_prefetch_layers: std::vec::Vec<u64>,
    /// regproxy's `--upstream-rate` in the shaped setup [default: 95 % of
    /// `--uplink-mbit`, in Mbit/s].
    #[arg(long)]
    pub budget_rate: Option<String>,
    /// What regproxy must have taken from the upstream (the prefetch
    /// under way) before the rollout pull starts.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub budget_head_start: u64,
    /// Setups of the budget scenario, in run order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "no-prefetch,shaped,unshaped"
    )]
    pub budget_setups: Vec<Setup>,
}

impl Params {
    /// The shaped setup's `--upstream-rate`.
    pub fn rate(&self, uplink_mbit: u32) -> String {
        self.budget_rate
            .clone()
            .unwrap_or_else(|| format!("{}Mbit/s", (uplink_mbit * 95 / 100).max(1)))
    }
}

/// One way of running the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// The rollout pull alone.
    NoPrefetch,
    /// A prefetch runs, regproxy with `--upstream-rate`.
    Shaped,
    /// A prefetch runs, regproxy without `--upstream-rate`.
    Unshaped,
}

impl Setup {
    pub fn label(self) -> &'static str {
        match self {
            Setup::NoPrefetch => "no prefetch",
            Setup::Shaped => "prefetch, shaped",
            Setup::Unshaped => "prefetch, unshaped",
        }
    }

    fn prefetches(self) -> bool {
        self != Setup::NoPrefetch
    }
}

/// How a prefetch went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Prefetched {
    /// From the request to the end of its NDJSON answer.
    pub s: f64,
    /// 2xx, and no line of the answer reported an error.
    pub ok: bool,
    /// Lines of the answer (progress events).
    pub lines: u64,
    /// The last line of the answer.
    pub last: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// One setup, measured.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub setup: Setup,
    /// `--upstream-rate` given to regproxy, if any.
    pub rate: Option<String>,
    /// From the first client's start to the last client's last verified blob.
    pub pull_s: f64,
    /// Per client (tag to its last verified blob).
    pub pull_p50_ms: f64,
    pub pull_p99_ms: f64,
    pub verified: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// What regproxy took from the upstream while the pull ran, beyond the
    /// rollout image's own blobs: the prefetch's share.
    pub prefetch_bytes_during_pull: u64,
    /// The rollout image's distinct blob bytes over the pull's time, bits/s.
    pub pull_bit_s: f64,
    pub prefetch: Option<Prefetched>,
    /// What the upstream sent in the whole setup (its access log).
    pub upstream: UpstreamUse,
}

/// Everything the budget scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetReport {
    pub mbit: u32,
    pub rollout: String,
    pub rollout_bytes: u64,
    pub prefetch: String,
    pub prefetch_bytes: u64,
    pub clients: usize,
    pub runs: Vec<Run>,
}

impl BudgetReport {
    pub fn run(&self, setup: Setup) -> Option<&Run> {
        self.runs.iter().find(|r| r.setup == setup)
    }
}

/// The rollout's image and the prefetched one, hashed before anything starts.
pub fn images(p: &Params) -> Vec<ImageSpec> {
    let layers = |sizes: &[u64], seed: u64| {
        sizes
            .iter()
            .enumerate()
            .map(|(j, &s)| synth::blob(seed + j as u64, s, LAYER_TYPE))
            .collect()
    };
    vec![
        synth::image(
            "bench/budget-rollout",
            "v1",
            layers(&p.budget_rollout_layers, 40_000),
        ),
        synth::image(
            "bench/budget-prefetch",
            "v1",
            layers(&p.budget_prefetch_layers, 41_000),
        ),
    ]
}

/// What the scenario needs from the rest of the run.
pub struct Env<'a> {
    pub tools: &'a Tools,
    pub work: &'a Path,
    /// The seeded upstream storage.
    pub storage: &'a Path,
    pub uplink: &'a Uplink,
    pub mbit: u32,
    pub timeout: Duration,
    pub scenario_timeout: Duration,
    pub layer_concurrency: usize,
}

/// The setups' upstreams listen on 5030, 5031, … in the uplink's namespace.
const UPSTREAM_PORT: usize = 5030;
const TOKEN: &str = "loadtest-budget-admin-token-0123456789";

/// Runs every setup, one after the other; `images` are [`images`]'s.
pub async fn run(p: &Params, images: &[ImageSpec], env: &Env<'_>) -> anyhow::Result<BudgetReport> {
    let [rollout, prefetch] = images else {
        anyhow::bail!("the budget scenario has two images");
    };
    let token = env.work.join("budget-admin-token");
    std::fs::write(&token, format!("{TOKEN}\n"))?;
    let mut runs = Vec::new();
    for (idx, &setup) in p.budget_setups.iter().enumerate() {
        eprintln!("  budget: {} …", setup.label());
        let rate = (setup == Setup::Shaped).then(|| p.rate(env.mbit));
        let ctx = SetupCtx {
            p,
            env,
            rollout,
            prefetch,
            token: &token,
            port: UPSTREAM_PORT + idx,
            rate,
        };
        let r = ctx.run(setup).await?;
        eprintln!(
            "  budget {:<20} pull {:>6.2}s  prefetch {}  prefetch during the pull {}  errors {}{}",
            setup.label(),
            r.pull_s,
            r.prefetch
                .as_ref()
                .map(|f| format!("{:.2}s{}", f.s, if f.ok { "" } else { " FAILED" }))
                .unwrap_or_else(|| "-".into()),
            crate::report::human(r.prefetch_bytes_during_pull),
            r.errors,
            r.first_errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        runs.push(r);
    }
    Ok(BudgetReport {
        mbit: env.mbit,
        rollout: rollout.reference(),
        rollout_bytes: synth::distinct_blob_bytes(std::slice::from_ref(rollout)),
        prefetch: prefetch.reference(),
        prefetch_bytes: synth::distinct_blob_bytes(std::slice::from_ref(prefetch)),
        clients: p.budget_clients,
        runs,
    })
}

struct SetupCtx<'a> {
    p: &'a Params,
    env: &'a Env<'a>,
    rollout: &'a ImageSpec,
    prefetch: &'a ImageSpec,
    token: &'a Path,
    port: usize,
    rate: Option<String>,
}

/// regproxy for one setup; stopped and its cache removed on drop.
struct Node {
    proc: Option<Proc>,
    addr: String,
    admin: String,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SetupCtx<'_> {
    async fn run(&self, setup: Setup) -> anyhow::Result<Run> {
        let env = self.env;
        let addr = format!("{}:{}", env.uplink.upstream_ip, self.port);
        let upstream = start_upstream(
            env.tools,
            env.work,
            env.storage,
            &addr,
            Some(&env.uplink.ns),
        )
        .await?;
        let node = self.start_node(setup, &upstream.addr).await?;
        let mark = upstream.log.mark();

        let prefetch = setup.prefetches().then(|| {
            let (admin, token) = (node.admin.clone(), TOKEN.to_string());
            let reference = self.prefetch.reference();
            let timeout = env.scenario_timeout;
            tokio::spawn(async move { prefetch(&admin, &token, &reference, timeout).await })
        });
        if let Some(task) = &prefetch {
            self.head_start(&node.admin, task).await?;
        }

        let before = regproxy_upstream_bytes(&node.admin).await?;
        let refs = [ImageRef {
            name: self.rollout.name.clone(),
            tag: self.rollout.tag.clone(),
        }];
        let pull = workload::pull_images(
            &node.addr,
            env.timeout,
            &refs,
            self.p.budget_clients,
            env.layer_concurrency,
        );
        let out = match tokio::time::timeout(env.scenario_timeout, pull).await {
            Ok(o) => o,
            Err(_) => workload::Outcome {
                errors: 1,
                first_errors: vec![format!(
                    "the rollout pull did not finish within {:?}",
                    env.scenario_timeout
                )],
                wall: env.scenario_timeout,
                ..workload::Outcome::default()
            },
        };
        let after = regproxy_upstream_bytes(&node.admin).await?;
        let rollout_bytes = synth::distinct_blob_bytes(std::slice::from_ref(self.rollout));

        let prefetched = match prefetch {
            Some(task) => Some(task.await.unwrap_or_else(|e| Prefetched {
                error: Some(format!("the prefetch task failed: {e}")),
                ..Prefetched::default()
            })),
            None => None,
        };
        let log = upstream.log.clone();
        tokio::task::spawn_blocking(move || {
            log.settle(Duration::from_millis(150), Duration::from_secs(5))
        })
        .await
        .ok();
        let usage = upstream.log.usage(mark, None);
        let pull_s = out.wall.as_secs_f64();
        Ok(Run {
            setup,
            rate: self.rate.clone(),
            pull_s,
            pull_p50_ms: out.image_latency.percentile_ms(50.0),
            pull_p99_ms: out.image_latency.percentile_ms(99.0),
            verified: out.verified,
            errors: out.errors,
            first_errors: out.first_errors,
            prefetch_bytes_during_pull: after.saturating_sub(before).saturating_sub(rollout_bytes),
            pull_bit_s: rollout_bytes as f64 * 8.0 / pull_s.max(1e-9),
            prefetch: prefetched,
            upstream: usage,
        })
    }

    /// regproxy in front of `upstream` with a fresh cache, the admin token,
    /// and this setup's rate.
    async fn start_node(&self, setup: Setup, upstream: &str) -> anyhow::Result<Node> {
        let env = self.env;
        let dir = env.work.join(format!("budget-{}", self.port));
        std::fs::create_dir_all(&dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(&env.tools.regproxy);
        cmd.arg("serve")
            .args(["--listen", &addr])
            .args(["--upstream", &format!("http://{upstream}")])
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(["--cache-size", "20GiB"])
            .args(["--admin-listen", &admin])
            .arg("--admin-token-file")
            .arg(self.token)
            .env("RUST_LOG", "info");
        if let Some(rate) = &self.rate {
            cmd.args(["--upstream-rate", rate]);
        }
        let name = format!("regproxy-budget-{setup:?}").to_lowercase();
        let mut node = Node {
            proc: Some(Proc::spawn(&name, cmd, &dir)?),
            addr,
            admin,
            dir,
        };
        let proc = node.proc.as_mut().expect("just started");
        wait_ready(proc, &node.addr)
            .await
            .with_context(|| format!("starting regproxy for the budget's {}", setup.label()))?;
        Ok(node)
    }

    /// Waits until regproxy has taken `--budget-head-start` from the
    /// upstream (the prefetch's fills are under way), or the prefetch ended.
    async fn head_start(
        &self,
        admin: &str,
        task: &tokio::task::JoinHandle<Prefetched>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.env.timeout;
        loop {
            if regproxy_upstream_bytes(admin).await? >= self.p.budget_head_start
                || task.is_finished()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "the prefetch took less than {} from the upstream within {:?}",
                    crate::report::human(self.p.budget_head_start),
                    self.env.timeout
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `POST /admin/prefetch {"refs":[reference]}` to regproxy's admin
/// listener, its NDJSON answer read to the end (at most `within`): it went
/// well when no line has an error and the last is
/// `{"event":"summary","ok":1,"failed":0}`.
pub async fn prefetch(admin: &str, token: &str, reference: &str, within: Duration) -> Prefetched {
    let started = Instant::now();
    let mut p = Prefetched::default();
    match tokio::time::timeout(within, prefetch_lines(admin, token, reference, &mut p)).await {
        Ok(Ok(())) => {
            let summary = p.last.as_ref().filter(|l| l["event"] == "summary");
            match summary {
                Some(s) if s["failed"] == 0 => p.ok = p.error.is_none(),
                _ => {
                    p.error.get_or_insert_with(|| {
                        format!(
                            "the prefetch's answer ended without a summary: {:?}",
                            p.last
                        )
                    });
                }
            }
        }
        Ok(Err(e)) => p.error = Some(format!("{e:#}")),
        Err(_) => p.error = Some(format!("the prefetch did not end within {within:?}")),
    }
    p.s = started.elapsed().as_secs_f64();
    p
}

async fn prefetch_lines(
    admin: &str,
    token: &str,
    reference: &str,
    p: &mut Prefetched,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({ "refs": [reference] }))?;
    let req = Request::post(format!("http://{admin}/admin/prefetch"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.request(req).await.context("POST /admin/prefetch")?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut pending = Vec::new();
    let line = |l: &[u8], p: &mut Prefetched| {
        if l.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        p.lines += 1;
        let v: serde_json::Value =
            serde_json::from_slice(l).unwrap_or_else(|_| String::from_utf8_lossy(l).into());
        if p.error.is_none() && failed(&v) {
            p.error = Some(format!("the prefetch reported: {v}"));
        }
        p.last = Some(v);
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the prefetch's answer")?;
        if let Some(data) = frame.data_ref() {
            pending.extend_from_slice(data);
            while let Some(n) = pending.iter().position(|b| *b == b'\n') {
                let rest = pending.split_off(n + 1);
                line(&pending, p);
                pending = rest;
            }
        }
    }
    line(&pending, p);
    if status != StatusCode::OK {
        p.error = Some(format!(
            "POST /admin/prefetch answered {status}: {:?}",
            p.last
        ));
    }
    Ok(())
}

/// Whether an NDJSON event says something failed: an `error` that is not
/// null, or a `failed` count above 0.
fn failed(v: &serde_json::Value) -> bool {
    !v.get("error").is_none_or(serde_json::Value::is_null)
        || v.get("failed").and_then(serde_json::Value::as_u64) > Some(0)
}
