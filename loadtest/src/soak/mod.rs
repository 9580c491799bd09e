//! `loadtest soak`: regproxy under mixed traffic and random faults for a set
//! time, every completed response checked against the truth.
//!
//! It starts everything itself: the upstream (Distribution, as `compare`
//! starts it, [`crate::targets::start_upstream`]), a [`gate::Gate`] in
//! front of it that can cut every connection, and regproxy with its cache
//! on a tmpfs it mounts. It seeds images and standalone blobs, then runs
//! [`traffic`] clients and, now and then, a real `skopeo copy`, while
//! [`faults`] injects one fault kind after another (each kind once per
//! round, in a shuffled order, at random moments). [`oracle`] judges every
//! completed response; [`tally`] counts; each second the sampler reads
//! regproxy's RSS and fds from `/proc` (across restarts) and its cache
//! bytes; [`report`] writes the text, the JSON and the SVG.

pub mod faults;
pub mod gate;
pub mod oracle;
pub mod report;
pub mod tally;
pub mod traffic;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use regproxy::units::{parse_duration, parse_size};
use serde::Serialize;

use crate::registry::Registry;
use crate::synth::{self, LAYER_TYPE};
use crate::targets::{start_upstream, Tools};
use faults::Rig;
use oracle::Oracle;
use tally::Tally;
use traffic::{Pullable, Worker, World, BLOB_REPO};

/// `loadtest soak`'s flags.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Params {
    /// How long traffic and faults run; the soak then stops by itself.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Seed of every random choice [default: from the clock, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Clients looping over operations at once.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    /// Mean time between two faults.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub fault_every: Duration,
    /// Mean time between two `skopeo copy` runs (0s: none).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub skopeo_every: Duration,
    /// regproxy's `--tag-ttl`: short, so that tag moves show.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub tag_ttl: Duration,
    /// regproxy's `--cache-size`: below what the soak pulls, so it evicts.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Size of the tmpfs the cache lives on (the full-disk fault fills it).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub disk_size: u64,
    /// Images `soak/app-<i>` with tags `v1` (fixed) and `latest` (moving).
    #[arg(long, default_value_t = 6)]
    pub images: usize,
    /// Standalone blobs in `soak/blobs`, for ranges, HEADs and hang-ups.
    #[arg(long, default_value_t = 16)]
    pub blobs: usize,
    /// Per request, and per body between two reads.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub timeout: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// xorshift64*: small, seedable, enough to pick operations and moments.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix the seed so that seeds 1, 2, 3 differ at once.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// In `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// A duration between `lo` and `hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as usize;
        lo + Duration::from_millis(self.below(span + 1) as u64)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// A tmpfs mounted on `path`, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, bytes: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700")])
            .arg("soak")
            .arg(path)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs on {} failed (the soak needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// One sample of the run, taken each second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// regproxy processes alive (2 during a handover).
    pub procs: usize,
    /// The largest `VmRSS` of one regproxy process.
    pub rss_kib: u64,
    /// The largest `RssAnon` of one regproxy process.
    pub anon_kib: u64,
    /// The most open fds of one regproxy process.
    pub fds: u64,
    /// `regproxy_cache_bytes` of the newest process.
    pub cache_bytes: Option<u64>,
    pub cap_bytes: Option<u64>,
    /// Right responses and their MiB over the last second.
    pub req_per_s: f64,
    pub mib_per_s: f64,
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// `GET /metrics` on a regproxy's probe socket: that process's own numbers.
pub fn probe_metrics(sock: &Path) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.to_owned())
}

/// The value of metric `name` (summed over labels) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for l in text.lines() {
        if l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with([' ', '{']))
        {
            let v: f64 = l.split_whitespace().last()?.parse().ok()?;
            *found.get_or_insert(0.0) += v;
        }
    }
    found.map(|v: f64| v as u64)
}

/// Samples the regproxy processes in `live` each second until `stop`.
async fn sample(
    live: Arc<Mutex<Vec<(u32, PathBuf)>>>,
    tally: Arc<Tally>,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Sample> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    let mut last = (Instant::now(), 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Relaxed) {
        tick.tick().await;
        let procs = live.lock().expect("live lock").clone();
        let tally = tally.clone();
        let s = tokio::task::spawn_blocking(move || {
            let mut s = Sample {
                procs: procs.len(),
                ..Sample::default()
            };
            for (pid, _) in &procs {
                if let Some((rss, anon)) = crate::procs::status_kib(*pid) {
                    s.rss_kib = s.rss_kib.max(rss);
                    s.anon_kib = s.anon_kib.max(anon);
                }
                s.fds = s.fds.max(fd_count(*pid).unwrap_or(0));
            }
            if let Some(text) = procs.last().and_then(|(_, sock)| probe_metrics(sock)) {
                s.cache_bytes = metric(&text, "regproxy_cache_bytes");
                s.cap_bytes = metric(&text, "regproxy_cache_capacity_bytes");
            }
            (s, tally.done.load(Relaxed), tally.bytes.load(Relaxed))
        })
        .await;
        let Ok((mut s, done, bytes)) = s else {
            continue;
        };
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
        s.t_s = now.duration_since(t0).as_secs_f64();
        s.req_per_s = (done - last.1) as f64 / dt;
        s.mib_per_s = (bytes - last.2) as f64 / (1u64 << 20) as f64 / dt;
        last = (now, done, bytes);
        out.push(s);
    }
    out
}

/// `skopeo copy` of a random image through the proxy now and then.
async fn skopeo_loop(world: Arc<World>, mut rng: Rng, every: Duration, dir: PathBuf) {
    let op = "skopeo copy";
    let mut k = 0;
    loop {
        let wait = rng.between(every / 2, every * 3 / 2);
        if Instant::now() + wait >= world.deadline {
            return;
        }
        tokio::time::sleep(wait).await;
        let (name, tag) = {
            let imgs = world.images.lock().expect("images lock");
            let p = &imgs[rng.below(imgs.len().min(32))];
            (p.name.clone(), p.tags[rng.below(p.tags.len())].clone())
        };
        k += 1;
        let to = dir.join(format!("copy-{k}"));
        let start = Instant::now();
        let run = tokio::process::Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--retry-times", "0"])
            .arg(format!("docker://{}/{name}:{tag}", world.proxy))
            .arg(format!("dir:{}", to.display()))
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(Duration::from_secs(120), run).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                world.tally.error(op, "skopeo failed", format!("{e}"));
                continue;
            }
            Err(_) => {
                world
                    .tally
                    .error(op, "skopeo timed out", format!("{name}:{tag}"));
                continue;
            }
        };
        let end = Instant::now();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            world.tally.error(
                op,
                "skopeo failed",
                format!("{name}:{tag}: {}", err.trim().lines().last().unwrap_or("")),
            );
        } else {
            let body = std::fs::read(to.join("manifest.json")).unwrap_or_default();
            let d = oracle::sha(&body);
            let mut v = world.oracle.manifest_body(&d, &body);
            if v == oracle::Verdict::Right {
                v = world.oracle.tagged(&name, &tag, &d, start, end);
            }
            world.tally.verdict(op, v, body.len() as u64);
        }
        let _ = std::fs::remove_dir_all(&to);
    }
}

/// Everything the soak needs to start.
pub struct Setup {
    pub tools: Tools,
    pub work: PathBuf,
}

/// Runs the soak; the report says whether it passed ([`report::checks`]).
pub async fn run(params: Params, setup: Setup) -> anyhow::Result<report::SoakReport> {
    let seed = params.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    eprintln!(
        "soak: seed {seed} (replay with --seed {seed}), {:?}",
        params.duration
    );
    let machine = crate::compare::Machine::detect();
    let work = setup.work;
    std::fs::create_dir_all(&work)?;
    let mut rng = Rng::new(seed);
    let setup_started = Instant::now();

    // The content, hashed before anything starts.
    let p = params.clone();
    let (images, variants, blobs) = tokio::task::spawn_blocking(move || {
        let (images, variants) = traffic::images(seed % 1000 + 1, p.images);
        let sizes = [2 << 20, 1 << 20, 256 << 10, 8 << 10, 3 << 20];
        let blobs: Vec<_> = (0..p.blobs as u64)
            .map(|i| {
                synth::blob(
                    seed.wrapping_mul(31) + 5000 + i,
                    sizes[i as usize % 5] + i,
                    LAYER_TYPE,
                )
            })
            .collect();
        (images, variants, blobs)
    })
    .await?;
    let oracle = Arc::new(Oracle::new(params.tag_ttl, Duration::from_secs(2)));

    // The upstream, seeded directly.
    let storage = work.join("upstream-storage");
    std::fs::create_dir_all(&storage)?;
    let up_addr = format!("127.0.0.1:{}", crate::procs::free_port()?);
    let upstream = start_upstream(&setup.tools, &work, &storage, &up_addr, None).await?;
    let reg = Registry::new(&up_addr, params.timeout);
    for b in &blobs {
        reg.push_blob(BLOB_REPO, b).await?;
        oracle.add_synth(&b.digest, b.seed, b.size);
    }
    let mut pullable = Vec::new();
    for img in &images {
        reg.push_image(img)
            .await
            .with_context(|| format!("seeding {}", img.reference()))?;
        oracle.add_image(img);
        let t = Instant::now();
        oracle.set_tag(&img.name, &img.tag, &img.manifest.digest, t, t);
        pullable.push(Pullable {
            name: img.name.clone(),
            tags: vec![img.tag.clone(), "latest".into()],
        });
    }
    let mut moves = Vec::new();
    for (name, vs) in &variants {
        // Every variant's blobs and manifest are at the upstream; `latest`
        // ends at the first.
        for v in vs.iter().rev() {
            reg.push_image(v).await?;
            oracle.add_image(v);
        }
        let t = Instant::now();
        oracle.set_tag(name, "latest", &vs[0].manifest.digest, t, t);
        moves.push((
            name.clone(),
            vs.iter().map(|v| v.manifest.bytes.clone()).collect(),
        ));
    }
    let distinct = synth::distinct_blob_bytes(&images)
        + variants
            .iter()
            .flat_map(|(_, vs)| vs.iter())
            .map(|v| v.layers.last().map_or(0, |l| l.size))
            .sum::<u64>()
        + blobs.iter().map(|b| b.size).sum::<u64>();
    eprintln!(
        "soak: seeded {} images ({} tag variants) and {} blobs, {} distinct",
        images.len(),
        variants.len() * 3,
        blobs.len(),
        crate::report::human(distinct)
    );

    eprintln!(
        "soak: set up in {:.1}s",
        setup_started.elapsed().as_secs_f64()
    );
    let mut rig = Rig::start(&params, setup.tools.clone(), &work, storage, upstream).await?;
    let t0 = Instant::now();
    let deadline = t0 + params.duration;
    let world = Arc::new(World {
        proxy: rig.listen.clone(),
        upstream: up_addr.clone(),
        oracle: oracle.clone(),
        tally: Arc::new(Tally::default()),
        images: Mutex::new(pullable),
        blobs: blobs.iter().map(|b| (b.digest.clone(), b.size)).collect(),
        variants: moves,
        timeout: params.timeout,
        deadline,
        pushes: AtomicU64::new(0),
        seed,
    });
    let _ = world.tally.start.set(t0);
    // What the corruption fault may pick: standalone blobs and image layers.
    let corruptible: Vec<(String, synth::BlobSpec)> = blobs
        .iter()
        .map(|b| (BLOB_REPO.to_string(), b.clone()))
        .chain(
            images
                .iter()
                .flat_map(|i| i.layers.iter().map(move |l| (i.name.clone(), l.clone()))),
        )
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn(sample(
        rig.live.clone(),
        world.tally.clone(),
        t0,
        stop.clone(),
    ));
    let workers: Vec<_> = (0..params.clients)
        .map(|i| tokio::spawn(Worker::new(world.clone(), rng.next_u64() ^ i as u64).run()))
        .collect();
    let skopeo = (params.skopeo_every > Duration::ZERO).then(|| {
        let dir = work.join("skopeo");
        let _ = std::fs::create_dir_all(&dir);
        tokio::spawn(skopeo_loop(
            world.clone(),
            Rng::new(rng.next_u64()),
            params.skopeo_every,
            dir,
        ))
    });

    // Faults until the end, then the clients finish what they started.
    let fault_result = rig
        .inject_until(&mut rng, &oracle, &corruptible, &world, deadline, t0)
        .await;
    let grace = params.timeout * 2 + Duration::from_secs(30);
    for w in workers.into_iter().chain(skopeo) {
        if tokio::time::timeout(grace, w).await.is_err() {
            world
                .tally
                .error("client", "client did not finish", format!("{grace:?}"));
        }
    }
    let elapsed = t0.elapsed();
    eprintln!(
        "soak: traffic stopped at {:.1}s, the last client {:.1}s after the deadline",
        elapsed.as_secs_f64(),
        elapsed.saturating_sub(params.duration).as_secs_f64()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    let ended = rig.finish().await;
    eprintln!(
        "soak: every process stopped {:.1}s after the traffic",
        t0.elapsed().saturating_sub(elapsed).as_secs_f64()
    );
    fault_result?;

    let r = report::SoakReport::new(report::Parts {
        machine,
        params,
        seed,
        elapsed,
        tally: world.tally.snapshot(),
        faults: ended.faults,
        fault_events: ended.events,
        samples,
        upstream: ended.upstream,
        distinct_bytes: distinct,
        served_bytes: world.tally.bytes.load(std::sync::atomic::Ordering::Relaxed),
        proxy_exits: ended.exits,
        log: ended.log,
    });
    Ok(r)
}

/// `loadtest soak` on the command line: runs, prints, writes, and fails
/// unless every check passed.
pub async fn main(params: Params, setup: Setup, out: Option<PathBuf>) -> anyhow::Result<()> {
    for (what, path) in [
        ("docker-registry", &setup.tools.registry),
        ("regproxy", &setup.tools.regproxy),
    ] {
        if !path.is_file() {
            bail!("{what} is missing at {}", path.display());
        }
    }
    let r = run(params, setup).await?;
    let text = report::text(&r);
    print!("{text}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("soak.txt"), &text)?;
        std::fs::write(dir.join("soak.json"), serde_json::to_vec_pretty(&r)?)?;
        std::fs::write(dir.join("soak.svg"), report::svg(&r))?;
        eprintln!("soak: report in {}", dir.display());
    }
    let failed: Vec<_> = r.checks.iter().filter(|c| !c.met).collect();
    if !failed.is_empty() {
        bail!(
            "the soak failed {} check(s): {}",
            failed.len(),
            failed
                .iter()
                .map(|c| c.what.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rng_is_seeded_and_bounded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<_> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<_> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 10));
        assert!(
            (0..10).all(|v| xs.contains(&v)),
            "every value comes up: {xs:?}"
        );
    }

    #[test]
    fn metrics_sum_over_labels() {
        let t = "# HELP x\nregproxy_cache_bytes 42\nregproxy_fills_total{a=\"1\"} 2\nregproxy_fills_total{a=\"2\"} 3\n";
        assert_eq!(metric(t, "regproxy_cache_bytes"), Some(42));
        assert_eq!(metric(t, "regproxy_fills_total"), Some(5));
        assert_eq!(metric(t, "regproxy_cache"), None);
    }
}
