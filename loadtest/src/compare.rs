//! `compare`: one run, one machine, every target with a fresh cache, the same
//! scenarios. The upstream storage is seeded once; each target gets an
//! upstream process of its own serving that storage, so each access log
//! counts one target's requests only. The loopback targets run side by side,
//! their repetitions interleaved; the uplink nodes run one after the other.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use regproxy::units::{parse_duration, parse_size, parse_size_list};
use serde::Serialize;

use crate::netns::Uplink;
use crate::procs::{MemPeak, MemSampler, UpstreamUse};
use crate::registry::{BodyCheck, Registry};
use crate::synth::{self, BlobSpec, ImageSetShape, ImageSpec, LAYER_TYPE};
use crate::targets::{start_target, start_upstream, Kind, Target, Tools, Upstream};
use crate::workload::{self, ImageRef, Outcome};

/// Sizes, counts and durations of a run, `loadtest compare`'s flags; the
/// defaults are the full benchmark.
//
// The size lists are spelt `std::vec::Vec` so that clap takes each as one
// value parsed by `parse_size_list`, not as a repeatable flag.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Params {
    /// Targets, in run order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "regproxy,nginx,distribution,direct"
    )]
    pub targets: Vec<Kind>,
    /// Run only these scenarios [default: all]: cold_concurrent, images_cold,
    /// images_warm, warm_single, warm_concurrent, warm_single_discard,
    /// warm_concurrent_discard, small_requests, uplink_node1, uplink_node2,
    /// cluster, budget.
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Vec<String>,
    /// The big blob (warm single stream; cold concurrent).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub big: u64,
    /// The blob of the warm concurrent scenario.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub medium: u64,
    /// Clients GETting one cold big blob at once.
    #[arg(long, default_value_t = 10)]
    pub cold_clients: usize,
    /// Clients GETting the warm medium blob at once.
    #[arg(long, default_value_t = 32)]
    pub warm_clients: usize,
    /// Bytes each repetition of a discard scenario moves at least: its clients
    /// GET their blob again and again until then, so that the targets' CPU
    /// time, which /proc counts in 10 ms ticks, adds up to many ticks.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub discard_bytes: u64,
    /// Timed repetitions of each warm scenario (median reported); the small-request
    /// scenario runs at most 5.
    #[arg(long, default_value_t = 11)]
    pub repeat: usize,
    /// Repetitions of the cold concurrent scenario, each on a fresh big blob (median reported).
    #[arg(long, default_value_t = 5)]
    pub cold_repeat: usize,
    /// Images in the image set, `bench/app-<i>:v1`.
    #[arg(long, default_value_t = 4)]
    pub images: usize,
    /// Base layers all images of the set share, comma-separated sizes.
    #[arg(long, default_value = "48MiB,16MiB", value_parser = parse_size_list)]
    pub shared_layers: std::vec::Vec<u64>,
    /// Layers of each image's own, comma-separated sizes.
    #[arg(long, default_value = "24MiB,4MiB,512KiB", value_parser = parse_size_list)]
    pub unique_layers: std::vec::Vec<u64>,
    /// Clients pulling the whole image set at once.
    #[arg(long, default_value_t = 8)]
    pub image_clients: usize,
    /// Blobs one client downloads at once (containerd's default is 3).
    #[arg(long, default_value_t = 3)]
    pub layer_concurrency: usize,
    /// Clients sending small requests (manifests, HEADs) as fast as they can.
    #[arg(long, default_value_t = 8)]
    pub small_workers: usize,
    /// How long each repetition of the small-request scenario runs.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub small_duration: Duration,
    /// At most this many small requests per repetition.
    #[arg(long, default_value_t = 200_000)]
    pub small_max: u64,
    /// Uplink rate in Mbit/s (0 leaves the uplink and budget scenarios out).
    #[arg(long, default_value_t = 100)]
    pub uplink_mbit: u32,
    /// Images in the uplink's image set, `bench/edge-<i>:v1`.
    #[arg(long, default_value_t = 3)]
    pub uplink_images: usize,
    /// Base layers the uplink's images share.
    #[arg(long, default_value = "12MiB", value_parser = parse_size_list)]
    pub uplink_shared: std::vec::Vec<u64>,
    /// Layers of each uplink image's own.
    #[arg(long, default_value = "4MiB,512KiB", value_parser = parse_size_list)]
    pub uplink_unique: std::vec::Vec<u64>,
    /// Clients on each node pulling the uplink's image set at once.
    #[arg(long, default_value_t = 6)]
    pub uplink_clients: usize,
    /// Per request, and per body between two reads.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Per repetition of a scenario on one target.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub scenario_timeout: Duration,
    #[command(flatten)]
    #[serde(flatten)]
    pub cluster: crate::cluster::Params,
    #[command(flatten)]
    #[serde(flatten)]
    pub budget: crate::budget::Params,
}

impl Params {
    /// Whether scenario `id` is part of this run.
    pub fn wants(&self, id: &str) -> bool {
        self.scenarios.is_empty() || self.scenarios.iter().any(|s| s == id)
    }

    /// Whether any scenario on the loopback targets is part of this run.
    pub fn wants_loopback(&self) -> bool {
        SCENARIOS
            .iter()
            .any(|(id, _)| !id.starts_with("uplink_") && self.wants(id))
    }

    /// Whether an uplink node scenario is part of this run.
    pub fn wants_uplink(&self) -> bool {
        self.uplink_mbit > 0 && (self.wants("uplink_node1") || self.wants("uplink_node2"))
    }

    /// Whether the budget scenario (on the same uplink) is part of this run.
    pub fn wants_budget(&self) -> bool {
        self.uplink_mbit > 0 && self.wants(BUDGET)
    }
}

/// The cluster scenario's id (its results are [`Report::cluster`], not rows).
pub const CLUSTER: &str = "cluster";

/// The budget scenario's id (its results are [`Report::budget`], not rows).
pub const BUDGET: &str = "budget";

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One scenario measured on one target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub target: Kind,
    pub clients: usize,
    pub wall_s: f64,
    pub mib_per_s: f64,
    pub req_per_s: f64,
    /// Per blob GET, or per request in the small-request scenario.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Time to first byte (response headers) per blob GET.
    pub ttfb_p50_ms: Option<f64>,
    pub ttfb_p99_ms: Option<f64>,
    pub image_p50_ms: Option<f64>,
    pub image_p99_ms: Option<f64>,
    /// Timed repetitions; throughput and latencies are the median one's,
    /// `upstream` sums all of them.
    pub repetitions: usize,
    pub requests: u64,
    pub verified: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub upstream: UpstreamUse,
    /// Distinct blob bytes the scenario asks for (what one fetch each costs).
    pub distinct_bytes: u64,
    /// Upstream blob bytes ÷ (distinct blob bytes × repetitions).
    pub amplification: f64,
    /// Peak memory of the target's processes; `None` for direct.
    pub memory: Option<MemPeak>,
    /// regproxy only: what its own `regproxy_upstream_bytes_total` grew by over
    /// all repetitions, a cross-check of the upstream's access log.
    pub proxy_upstream_bytes: Option<u64>,
    /// regproxy only: what its `regproxy_sendfile_bytes_total` grew by over
    /// all repetitions, the body bytes that left by `sendfile(2)`.
    pub proxy_sendfile_bytes: Option<u64>,
    /// CPU seconds (user + system) of the target's processes per repetition.
    pub cpu_s: Option<f64>,
    /// CPU seconds of the target per GiB it served, over all repetitions:
    /// how much of the machine serving costs (nginx's sendfile is the floor).
    pub cpu_s_per_gib: Option<f64>,
}

/// Scenario ids in run order, with what the table and chart call them.
pub const SCENARIOS: [(&str, &str); 10] = [
    ("cold_concurrent", "cold N× big blob"),
    ("images_cold", "image set, cold"),
    ("images_warm", "image set, warm"),
    ("warm_single", "warm 1× big blob"),
    ("warm_concurrent", "warm N× medium blob"),
    ("warm_single_discard", "warm 1× big blob, bytes discarded"),
    (
        "warm_concurrent_discard",
        "warm N× medium blob, bytes discarded",
    ),
    ("small_requests", "small requests"),
    ("uplink_node1", "uplink, node 1"),
    ("uplink_node2", "uplink, node 2"),
];

/// GETs each client of a discard scenario makes in a row so that one
/// repetition moves at least `total` bytes (`clients` clients, a blob of
/// `size`): at least one.
pub fn discard_rounds(total: u64, clients: usize, size: u64) -> usize {
    let per_round = (clients as u64).saturating_mul(size).max(1);
    total.div_ceil(per_round).max(1) as usize
}

/// The machine a run was made on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub mem_total_gib: f64,
    pub kernel: String,
    pub started_utc: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let started_utc = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu,
            mem_total_gib: mem_kib / (1024.0 * 1024.0),
            kernel,
            started_utc,
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub params: Params,
    pub rows: Vec<Row>,
    /// The cluster scenario, when it ran.
    pub cluster: Option<crate::cluster::ClusterReport>,
    /// The budget scenario, when it ran.
    pub budget: Option<crate::budget::BudgetReport>,
}

impl Report {
    pub fn row(&self, scenario: &str, target: Kind) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.scenario == scenario && r.target == target)
    }
}

/// The content of a run, hashed before anything starts: only what the
/// scenarios it runs need.
struct Plan {
    loopback: Option<LoopbackPlan>,
    uplink_images: Vec<ImageSpec>,
    cluster_images: Vec<ImageSpec>,
    budget_images: Vec<ImageSpec>,
}

/// The content of the loopback scenarios.
struct LoopbackPlan {
    /// One fresh big blob per cold repetition; the first is the warm one.
    cold: Vec<BlobSpec>,
    medium: BlobSpec,
    images: Vec<ImageSpec>,
}

const BLOB_REPO: &str = "bench/blobs";

fn refs(images: &[ImageSpec]) -> Vec<ImageRef> {
    images
        .iter()
        .map(|i| ImageRef {
            name: i.name.clone(),
            tag: i.tag.clone(),
        })
        .collect()
}

/// What one scenario is, for [`Ctx::scenario`].
struct Spec<'p> {
    scenario: &'static str,
    clients: usize,
    /// Distinct blob bytes one repetition asks for.
    distinct_bytes: u64,
    /// Count only upstream GETs of these blobs.
    digests: Option<Vec<String>>,
    repetitions: usize,
    /// Make this blob warm on every target first.
    prime: Option<&'p BlobSpec>,
}

impl<'p> Spec<'p> {
    fn new(scenario: &'static str, clients: usize, distinct_bytes: u64) -> Spec<'p> {
        Spec {
            scenario,
            clients,
            distinct_bytes,
            digests: None,
            repetitions: 1,
            prime: None,
        }
    }

    fn blobs(mut self, digests: Vec<String>) -> Spec<'p> {
        self.digests = Some(digests);
        self
    }

    fn repeat(mut self, repetitions: usize) -> Spec<'p> {
        self.repetitions = repetitions.max(1);
        self
    }

    fn primed(mut self, blob: &'p BlobSpec) -> Spec<'p> {
        self.prime = Some(blob);
        self
    }
}

/// One target's repetitions of one scenario.
#[derive(Default)]
struct Acc {
    outs: Vec<Outcome>,
    usage: UpstreamUse,
    peak: Option<MemPeak>,
    extra_errors: Vec<Outcome>,
    cpu_s: Option<f64>,
    bytes: u64,
    proxy_upstream_bytes: Option<u64>,
    proxy_sendfile_bytes: Option<u64>,
}

struct Ctx<'a> {
    params: &'a Params,
    sampler: &'a MemSampler,
    rows: Vec<Row>,
}

impl Ctx<'_> {
    /// Runs one scenario on every target, interleaved: repetition r runs on
    /// each target in turn (the order rotating with r), so a change in the
    /// machine's background load falls on all targets alike. Memory peaks and
    /// upstream use are measured per target from just before its run to when
    /// the upstream's access log settles.
    async fn scenario<F, Fut>(
        &mut self,
        spec: Spec<'_>,
        targets: &[Target],
        upstreams: &[Upstream],
        mut run: F,
    ) where
        F: FnMut(usize, String) -> Fut,
        Fut: std::future::Future<Output = Outcome>,
    {
        let mut accs: Vec<Acc> = targets.iter().map(|_| Acc::default()).collect();
        if let Some(blob) = spec.prime {
            for (t, acc) in targets.iter().zip(&mut accs) {
                acc.extra_errors
                    .push(prime(t, self.params.timeout, blob).await);
            }
        }
        for rep in 0..spec.repetitions {
            for k in 0..targets.len() {
                let i = (k + rep) % targets.len();
                let (t, upstream) = (&targets[i], &upstreams[i]);
                self.sampler.watch(t.pid().into_iter().collect());
                let mark = upstream.log.mark();
                let metric_before = match &t.admin {
                    Some(a) => crate::registry::regproxy_upstream_bytes(a).await.ok(),
                    None => None,
                };
                let sent_before = match &t.admin {
                    Some(a) => upstream_requests(a).await,
                    None => None,
                };
                let sendfile_before = match &t.admin {
                    Some(a) => sendfile_bytes(a).await,
                    None => None,
                };
                // After the scrapes of regproxy's metrics: they are not
                // serving. The target idles between its repetitions, so the
                // 10 ms ticks of /proc lost at one end are found at the next.
                let cpu_before = t.pid().map(crate::procs::cpu_seconds);
                let out = match tokio::time::timeout(
                    self.params.scenario_timeout,
                    run(rep, t.addr.clone()),
                )
                .await
                {
                    Ok(o) => o,
                    Err(_) => Outcome {
                        errors: 1,
                        first_errors: vec![format!(
                            "scenario did not finish within {:?}",
                            self.params.scenario_timeout
                        )],
                        wall: self.params.scenario_timeout,
                        ..Outcome::default()
                    },
                };
                // The upstream logs a request after answering it: wait for a
                // line for each request known to have reached it (regproxy
                // counts what it sent; direct clients sent everything), then
                // for the log to go quiet (all the peers have).
                let expected = match (&t.admin, sent_before) {
                    (Some(a), Some(before)) => upstream_requests(a)
                        .await
                        .map(|after| after.saturating_sub(before)),
                    _ if t.kind == Kind::Direct => Some(out.requests),
                    _ => None,
                };
                let log = upstream.log.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(n) = expected {
                        log.wait_entries(mark, n, Duration::from_secs(30));
                    }
                    log.settle(Duration::from_millis(150), Duration::from_secs(5))
                })
                .await
                .ok();
                let usage = upstream.log.usage(mark, spec.digests.as_deref());
                let acc = &mut accs[i];
                if let (Some(pid), Some(before)) = (t.pid(), cpu_before) {
                    *acc.cpu_s.get_or_insert(0.0) += crate::procs::cpu_seconds(pid) - before;
                }
                acc.bytes += out.bytes;
                if let (Some(a), Some(before)) = (&t.admin, metric_before) {
                    if let Ok(after) = crate::registry::regproxy_upstream_bytes(a).await {
                        *acc.proxy_upstream_bytes.get_or_insert(0) += after.saturating_sub(before);
                    }
                }
                if let (Some(a), Some(before)) = (&t.admin, sendfile_before) {
                    if let Some(after) = sendfile_bytes(a).await {
                        *acc.proxy_sendfile_bytes.get_or_insert(0) += after.saturating_sub(before);
                    }
                }
                acc.usage.add(&usage);
                if t.proc.is_some() {
                    let p = self.sampler.take();
                    let peak = acc.peak.get_or_insert_with(MemPeak::default);
                    peak.rss_kib = peak.rss_kib.max(p.rss_kib);
                    peak.anon_kib = peak.anon_kib.max(p.anon_kib);
                }
                acc.outs.push(out);
            }
        }
        for (t, acc) in targets.iter().zip(accs) {
            let row = self.row(&spec, t.kind, acc);
            eprintln!(
                "  {:<24} {:<12} {:>8.2}s {:>9.1} MiB/s  upstream GETs {:>3}{}{}  errors {}{}",
                row.scenario,
                t.kind.to_string(),
                row.wall_s,
                row.mib_per_s,
                row.upstream.blob_gets,
                row.proxy_upstream_bytes
                    .map(|b| format!(
                        " (access log {} B, regproxy's metric {b} B)",
                        row.upstream.bytes
                    ))
                    .unwrap_or_default(),
                row.proxy_sendfile_bytes
                    .filter(|b| *b > 0)
                    .map(|b| format!(", sendfile {}", crate::report::human(b)))
                    .unwrap_or_default(),
                row.errors,
                row.first_errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            self.rows.push(row);
        }
    }

    fn row(&self, spec: &Spec<'_>, target: Kind, acc: Acc) -> Row {
        let mut out = median(acc.outs);
        for extra in acc.extra_errors {
            out.errors += extra.errors;
            out.first_errors.extend(extra.first_errors);
        }
        out.first_errors.truncate(5);
        let wall = out.wall.as_secs_f64().max(1e-9);
        let (lat50, lat99) = if out.blob_latency.is_empty() {
            (
                out.request_latency.percentile_ms(50.0),
                out.request_latency.percentile_ms(99.0),
            )
        } else {
            (
                out.blob_latency.percentile_ms(50.0),
                out.blob_latency.percentile_ms(99.0),
            )
        };
        let reps = spec.repetitions.max(1) as u64;
        Row {
            scenario: spec.scenario,
            target,
            clients: spec.clients,
            wall_s: out.wall.as_secs_f64(),
            mib_per_s: out.mib_per_s(),
            req_per_s: out.requests as f64 / wall,
            p50_ms: lat50,
            p99_ms: lat99,
            ttfb_p50_ms: (!out.blob_ttfb.is_empty()).then(|| out.blob_ttfb.percentile_ms(50.0)),
            ttfb_p99_ms: (!out.blob_ttfb.is_empty()).then(|| out.blob_ttfb.percentile_ms(99.0)),
            image_p50_ms: (!out.image_latency.is_empty())
                .then(|| out.image_latency.percentile_ms(50.0)),
            image_p99_ms: (!out.image_latency.is_empty())
                .then(|| out.image_latency.percentile_ms(99.0)),
            repetitions: spec.repetitions,
            requests: out.requests,
            verified: out.verified,
            errors: out.errors,
            first_errors: out.first_errors,
            upstream: acc.usage,
            distinct_bytes: spec.distinct_bytes,
            amplification: if spec.distinct_bytes == 0 {
                0.0
            } else {
                acc.usage.blob_bytes as f64 / (spec.distinct_bytes * reps) as f64
            },
            memory: acc.peak,
            proxy_upstream_bytes: acc.proxy_upstream_bytes,
            proxy_sendfile_bytes: acc.proxy_sendfile_bytes,
            cpu_s: acc.cpu_s.map(|c| c / reps as f64),
            cpu_s_per_gib: acc
                .cpu_s
                .filter(|_| acc.bytes >= 64 << 20 && spec.scenario != "small_requests")
                .map(|c| c / (acc.bytes as f64 / (1u64 << 30) as f64)),
        }
    }
}

/// The median outcome (by wall time) of the repetitions; the errors of all
/// of them count.
fn median(mut outs: Vec<Outcome>) -> Outcome {
    if outs.is_empty() {
        return Outcome::default();
    }
    outs.sort_by_key(|o| o.wall);
    let errors: u64 = outs.iter().map(|o| o.errors).sum();
    let firsts: Vec<String> = outs
        .iter()
        .flat_map(|o| o.first_errors.clone())
        .take(5)
        .collect();
    let mid = outs.len() / 2;
    let mut m = outs.swap_remove(mid);
    m.errors = errors;
    m.first_errors = firsts;
    m
}

/// `regproxy_upstream_requests_total` of the regproxy at `admin`.
async fn upstream_requests(admin: &str) -> Option<u64> {
    crate::registry::regproxy_metric(admin, "regproxy_upstream_requests_total")
        .await
        .ok()
}

/// `regproxy_sendfile_bytes_total` of the regproxy at `admin` (0 for a
/// regproxy without it).
async fn sendfile_bytes(admin: &str) -> Option<u64> {
    crate::registry::regproxy_metric(admin, "regproxy_sendfile_bytes_total")
        .await
        .ok()
}

/// Makes a blob warm: one GET, a pause for the target to commit what it
/// fetched (for regproxy: until no fill is in flight, which is after the
/// commit), and a second GET; the same for every target.
async fn prime(target: &Target, timeout: Duration, blob: &BlobSpec) -> Outcome {
    let addr = target.addr.as_str();
    let mut first =
        workload::concurrent_blob(addr, timeout, BLOB_REPO, &blob.digest, blob.size, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(admin) = &target.admin {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let inflight = crate::registry::regproxy_metric(admin, "regproxy_fills_inflight").await;
            if matches!(inflight, Ok(0)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let second =
        workload::concurrent_blob(addr, timeout, BLOB_REPO, &blob.digest, blob.size, 1).await;
    first.errors += second.errors;
    first.first_errors.extend(second.first_errors);
    first
}

/// Runs the whole comparison.
pub async fn run(params: Params, tools: Tools, work: PathBuf) -> anyhow::Result<Report> {
    let machine = Machine::detect();
    std::fs::create_dir_all(&work)?;
    let t0 = Instant::now();
    eprintln!("hashing the synthetic content …");
    let p = params.clone();
    // Only the content of the scenarios this run wants: the cold blobs alone
    // take seconds to hash.
    let plan = tokio::task::spawn_blocking(move || Plan {
        loopback: p.wants_loopback().then(|| LoopbackPlan {
            cold: (0..p.cold_repeat.max(1) as u64)
                .map(|i| synth::blob(100 + i, p.big, LAYER_TYPE))
                .collect(),
            medium: synth::blob(2, p.medium, LAYER_TYPE),
            images: synth::image_set(&ImageSetShape {
                prefix: "bench/app".into(),
                images: p.images,
                shared_layers: p.shared_layers.clone(),
                unique_layers: p.unique_layers.clone(),
                seed: 10,
            }),
        }),
        uplink_images: if p.wants_uplink() {
            synth::image_set(&ImageSetShape {
                prefix: "bench/edge".into(),
                images: p.uplink_images,
                shared_layers: p.uplink_shared.clone(),
                unique_layers: p.uplink_unique.clone(),
                seed: 20,
            })
        } else {
            Vec::new()
        },
        cluster_images: if p.wants(CLUSTER) {
            crate::cluster::images(&p.cluster)
        } else {
            Vec::new()
        },
        budget_images: if p.wants_budget() {
            crate::budget::images(&p.budget)
        } else {
            Vec::new()
        },
    })
    .await?;

    let storage = work.join("upstream-storage");
    std::fs::create_dir_all(&storage)?;
    let up_addr = format!("127.0.0.1:{}", crate::procs::free_port()?);
    let upstream = start_upstream(&tools, &work, &storage, &up_addr, None).await?;
    eprintln!("seeding the upstream at {up_addr} …");
    let reg = Registry::new(&up_addr, params.timeout);
    if let Some(l) = &plan.loopback {
        for b in l.cold.iter().chain([&l.medium]) {
            reg.push_blob(BLOB_REPO, b).await?;
        }
    }
    let loop_images = plan.loopback.iter().flat_map(|l| &l.images);
    for img in loop_images
        .chain(&plan.uplink_images)
        .chain(&plan.cluster_images)
        .chain(&plan.budget_images)
    {
        reg.push_image(img)
            .await
            .with_context(|| format!("seeding {}", img.reference()))?;
    }
    eprintln!("seeded in {:.1}s", t0.elapsed().as_secs_f64());
    // Every scenario runs against upstreams of its own on this storage.
    drop(upstream);

    // The uplink: a namespace whose upstreams serve the same storage.
    let uplink = if params.wants_uplink() || params.wants_budget() {
        Some(Uplink::create(params.uplink_mbit)?)
    } else {
        None
    };

    let sampler = MemSampler::start(Duration::from_millis(10));
    let mut ctx = Ctx {
        params: &params,
        sampler: &sampler,
        rows: Vec::new(),
    };
    if let Some(l) = &plan.loopback {
        loopback(&mut ctx, l, &tools, &work, &storage).await?;
    }
    let uplink_refs = refs(&plan.uplink_images);
    let uplink_distinct = synth::distinct_blob_bytes(&plan.uplink_images);
    let to = params.timeout;
    let p = &params;

    // Two nodes per target behind the shaped uplink, one after the other,
    // each with its own fresh cache.
    if let Some(link) = &uplink {
        for (i, &kind) in params.targets.iter().enumerate() {
            for (n, (scenario, label)) in [("uplink_node1", "node1"), ("uplink_node2", "node2")]
                .into_iter()
                .enumerate()
            {
                if !p.wants(scenario) {
                    continue;
                }
                // An upstream per node too, for the same reason as above.
                let addr = format!("{}:{}", link.upstream_ip, 5000 + 2 * i + n);
                let up = [start_upstream(&tools, &work, &storage, &addr, Some(&link.ns)).await?];
                let node = start_target(kind, &tools, &up[0].addr, &work, label).await?;
                let spec = Spec::new(scenario, p.uplink_clients, uplink_distinct);
                ctx.scenario(spec, std::slice::from_ref(&node), &up, |_, addr| {
                    let refs = &uplink_refs;
                    async move {
                        workload::pull_images(
                            &addr,
                            to,
                            refs,
                            p.uplink_clients,
                            p.layer_concurrency,
                        )
                        .await
                    }
                })
                .await;
            }
        }
    }
    let cluster = if p.wants(CLUSTER) {
        let env = crate::cluster::Env {
            tools: &tools,
            work: &work,
            storage: &storage,
            timeout: p.timeout,
            scenario_timeout: p.scenario_timeout,
            layer_concurrency: p.layer_concurrency,
        };
        Some(crate::cluster::run(&p.cluster, &plan.cluster_images, &env).await?)
    } else {
        None
    };
    let budget = match &uplink {
        Some(link) if p.wants_budget() => {
            let env = crate::budget::Env {
                tools: &tools,
                work: &work,
                storage: &storage,
                uplink: link,
                mbit: p.uplink_mbit,
                timeout: p.timeout,
                scenario_timeout: p.scenario_timeout,
                layer_concurrency: p.layer_concurrency,
            };
            Some(crate::budget::run(&p.budget, &plan.budget_images, &env).await?)
        }
        _ => None,
    };
    let mut rows = ctx.rows;
    // In the order of the table: by scenario, then by target.
    rows.sort_by_key(|r| {
        let s = SCENARIOS.iter().position(|(id, _)| *id == r.scenario);
        let t = params.targets.iter().position(|k| *k == r.target);
        (s, t)
    });
    drop(uplink);
    eprintln!("compare finished in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(Report {
        machine,
        params,
        rows,
        cluster,
        budget,
    })
}

/// The loopback scenarios: every target at once, each with its own upstream.
async fn loopback(
    ctx: &mut Ctx<'_>,
    plan: &LoopbackPlan,
    tools: &Tools,
    work: &std::path::Path,
    storage: &std::path::Path,
) -> anyhow::Result<()> {
    let params = ctx.params;
    let image_refs = refs(&plan.images);
    let image_distinct = synth::distinct_blob_bytes(&plan.images);
    let to = params.timeout;
    let reps = params.repeat.max(1);
    let (big, medium) = (&plan.cold[0], &plan.medium);

    // Every target starts with an empty cache of its own, all at once, and
    // stays up (idle while the others are measured) until the loopback
    // scenarios are done.
    // Each target has an upstream of its own, all serving the one seeded
    // storage: an upstream's access log then holds that target's requests
    // only, even when a peer finishes a download in the background while the
    // next target is measured (Distribution's proxy does).
    let mut upstreams = Vec::new();
    let mut targets = Vec::new();
    for &kind in &params.targets {
        let addr = format!("127.0.0.1:{}", crate::procs::free_port()?);
        let up = start_upstream(tools, work, storage, &addr, None).await?;
        targets.push(start_target(kind, tools, &up.addr, work, "loop").await?);
        upstreams.push(up);
    }
    let p = params;
    if p.wants("cold_concurrent") {
        let digests = plan.cold.iter().map(|b| b.digest.clone()).collect();
        let spec = Spec::new("cold_concurrent", p.cold_clients, big.size)
            .blobs(digests)
            .repeat(plan.cold.len());
        ctx.scenario(spec, &targets, &upstreams, |rep, addr| {
            let blob = &plan.cold[rep];
            async move {
                workload::concurrent_blob(
                    &addr,
                    to,
                    BLOB_REPO,
                    &blob.digest,
                    blob.size,
                    p.cold_clients,
                )
                .await
            }
        })
        .await;
    }
    for id in ["images_cold", "images_warm"] {
        if p.wants(id) {
            let spec = Spec::new(id, p.image_clients, image_distinct);
            ctx.scenario(spec, &targets, &upstreams, |_, addr| {
                let refs = &image_refs;
                async move {
                    workload::pull_images(&addr, to, refs, p.image_clients, p.layer_concurrency)
                        .await
                }
            })
            .await;
        }
    }
    if p.wants("warm_single") {
        let spec = Spec::new("warm_single", 1, big.size)
            .blobs(vec![big.digest.clone()])
            .repeat(reps)
            .primed(big);
        ctx.scenario(spec, &targets, &upstreams, |_, addr| async move {
            workload::concurrent_blob(&addr, to, BLOB_REPO, &big.digest, big.size, 1).await
        })
        .await;
    }
    if p.wants("warm_concurrent") {
        let spec = Spec::new("warm_concurrent", p.warm_clients, medium.size)
            .blobs(vec![medium.digest.clone()])
            .repeat(reps)
            .primed(medium);
        ctx.scenario(spec, &targets, &upstreams, |_, addr| async move {
            workload::concurrent_blob(
                &addr,
                to,
                BLOB_REPO,
                &medium.digest,
                medium.size,
                p.warm_clients,
            )
            .await
        })
        .await;
    }
    let discard = [
        ("warm_single_discard", big, 1),
        ("warm_concurrent_discard", medium, p.warm_clients),
    ];
    for (id, blob, clients) in discard {
        if !p.wants(id) {
            continue;
        }
        let rounds = discard_rounds(p.discard_bytes, clients, blob.size);
        let spec = Spec::new(id, clients, blob.size)
            .blobs(vec![blob.digest.clone()])
            .repeat(reps)
            .primed(blob);
        let gets = workload::BlobGets {
            name: BLOB_REPO,
            digest: &blob.digest,
            size: blob.size,
            clients,
            rounds,
            check: BodyCheck::Discard,
        };
        ctx.scenario(spec, &targets, &upstreams, |_, addr| async move {
            workload::blob_gets(&addr, to, &gets).await
        })
        .await;
    }
    if p.wants("small_requests") {
        let spec = Spec::new("small_requests", p.small_workers, 0).repeat(reps.min(5));
        ctx.scenario(spec, &targets, &upstreams, |_, addr| {
            let refs = &image_refs;
            async move {
                workload::small_requests(
                    &addr,
                    to,
                    refs,
                    p.small_workers,
                    p.small_duration,
                    p.small_max,
                )
                .await
            }
        })
        .await;
    }
    drop(targets);
    drop(upstreams);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_scenarios_repeat_their_gets_up_to_the_total() {
        // 2 GiB: 8 GETs of 256 MiB in a row; 32 clients of 16 MiB, 4 each.
        assert_eq!(discard_rounds(2 << 30, 1, 256 << 20), 8);
        assert_eq!(discard_rounds(2 << 30, 32, 16 << 20), 4);
        // At least the total, and at least one GET.
        assert_eq!(discard_rounds(2 << 30, 3, 100 << 20), 7);
        assert_eq!(discard_rounds(1, 32, 16 << 20), 1);
        assert_eq!(discard_rounds(0, 0, 0), 1);
    }
}
