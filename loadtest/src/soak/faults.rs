//! The processes of a soak and the faults done to them: the upstream killed
//! (`kill -9`) and started again on its address and storage, every
//! connection cut at the gate, a blob corrupted in the upstream's storage
//! (restored after a while), the cache's disk filled (a filler file on the
//! tmpfs, removed after a while), and regproxy replaced as in a rollout (a
//! successor started beside it on the same address and cache dir, then
//! SIGTERM to the old one, which drains and exits).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::gate::Gate;
use super::oracle::Oracle;
use super::traffic::{Worker, World};
use super::{Params, Rng, Tmpfs};
use crate::procs::{free_port, Proc, UpstreamUse};
use crate::synth::BlobSpec;
use crate::targets::{start_upstream, Tools, Upstream};

pub const KINDS: [&str; 5] = [
    "upstream restart",
    "gate cut",
    "corrupt upstream blob",
    "full disk",
    "regproxy rollout",
];

/// One fault, when and how long.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t_s: f64,
    pub kind: &'static str,
    pub held_s: f64,
    pub detail: String,
}

struct Regproxy {
    proc: Proc,
    sock: PathBuf,
}

/// What the rig hands back at the end.
pub struct Ended {
    pub faults: BTreeMap<String, u64>,
    pub events: Vec<Event>,
    pub upstream: UpstreamUse,
    pub exits: Vec<String>,
    pub log: LogScan,
}

/// What regproxy's logs say, over every process of the run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LogScan {
    pub panics: u64,
    pub error_lines: u64,
    pub warn_lines: u64,
    /// Fills regproxy refused because the upstream's bytes did not hash to
    /// the digest (the corruption fault biting).
    pub digest_mismatches: u64,
    /// The first few panic and error lines.
    pub examples: Vec<String>,
}

pub struct Rig {
    tools: Tools,
    work: PathBuf,
    storage: PathBuf,
    upstream: Upstream,
    used: UpstreamUse,
    gate: Gate,
    disk: Tmpfs,
    cache_dir: PathBuf,
    /// regproxy's API address, shared by a successor.
    pub listen: String,
    current: Regproxy,
    draining: Vec<Regproxy>,
    /// (pid, probe socket) of every live regproxy, oldest first.
    pub live: Arc<Mutex<Vec<(u32, PathBuf)>>>,
    started: usize,
    /// Upstream restarts so far.
    restarts: usize,
    exits: Vec<String>,
    faults: BTreeMap<String, u64>,
    events: Vec<Event>,
    fault_every: Duration,
    tag_ttl: Duration,
    cache_size: u64,
}

fn arg_dur(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Rig {
    pub async fn start(
        params: &Params,
        tools: Tools,
        work: &Path,
        storage: PathBuf,
        upstream: Upstream,
    ) -> anyhow::Result<Rig> {
        let gate = Gate::start(upstream.addr.clone()).await?;
        let disk = Tmpfs::mount(&work.join("disk"), params.disk_size)?;
        let cache_dir = disk.path.join("cache");
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut rig = Rig {
            tools,
            work: work.to_path_buf(),
            storage,
            upstream,
            used: UpstreamUse::default(),
            gate,
            disk,
            cache_dir,
            listen,
            current: Regproxy {
                // Replaced at once below.
                proc: Proc::spawn("placeholder", Command::new("true"), work)?,
                sock: PathBuf::new(),
            },
            draining: Vec::new(),
            live: Arc::new(Mutex::new(Vec::new())),
            started: 0,
            restarts: 0,
            exits: Vec::new(),
            faults: BTreeMap::new(),
            events: Vec::new(),
            fault_every: params.fault_every,
            tag_ttl: params.tag_ttl,
            cache_size: params.cache_size,
        };
        let first = rig.start_regproxy().await?;
        let mut placeholder = std::mem::replace(&mut rig.current, first);
        placeholder.proc.kill_now();
        rig.publish();
        Ok(rig)
    }

    fn publish(&self) {
        let mut live = self.live.lock().expect("live lock");
        *live = self
            .draining
            .iter()
            .chain(std::iter::once(&self.current))
            .map(|r| (r.proc.pid(), r.sock.clone()))
            .collect();
    }

    async fn start_regproxy(&mut self) -> anyhow::Result<Regproxy> {
        self.started += 1;
        let n = self.started;
        let sock = self.work.join(format!("regproxy-{n}.sock"));
        let ready = self.work.join(format!("regproxy-{n}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&self.tools.regproxy);
        cmd.arg("serve")
            .args(["--listen", &self.listen])
            .args(["--upstream", &format!("http://{}", self.gate.addr)])
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(["--cache-size", &self.cache_size.to_string()])
            .arg("--probe-socket")
            .arg(&sock)
            .arg("--ready-file")
            .arg(&ready)
            .args(["--tag-ttl", &arg_dur(self.tag_ttl)])
            .args(["--shutdown-grace", "10s"])
            .args(["--connect-timeout", "2s", "--upstream-timeout", "10s"])
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn(&format!("regproxy-{n}"), cmd, &self.work)?;
        let until = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            proc.check_alive()?;
            if Instant::now() > until {
                bail!("regproxy-{n} wrote no ready file within 60s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Regproxy { proc, sock })
    }

    /// Reaps regproxy processes that finished draining.
    fn reap(&mut self) {
        let before = self.draining.len();
        let exits = &mut self.exits;
        self.draining.retain_mut(|r| match r.proc.exited() {
            Some(status) => {
                exits.push(format!("{}: {status}", r.proc.name));
                false
            }
            None => true,
        });
        if self.draining.len() != before {
            self.publish();
        }
    }

    /// Injects faults at random moments until `deadline`: every kind once
    /// per round, in a shuffled order.
    pub async fn inject_until(
        &mut self,
        rng: &mut Rng,
        oracle: &Oracle,
        blobs: &[(String, BlobSpec)],
        world: &Arc<World>,
        deadline: Instant,
        t0: Instant,
    ) -> anyhow::Result<()> {
        let mut round: Vec<&'static str> = Vec::new();
        // The first round comes within the first half of a short run, so
        // that even a minute sees every kind.
        let total = deadline.saturating_duration_since(Instant::now());
        let first_gap = self.fault_every.min(total / (2 * KINDS.len() as u32 + 2));
        let mut injected = 0;
        loop {
            let gap = if injected < KINDS.len() {
                rng.between(first_gap / 2, first_gap)
            } else {
                rng.between(self.fault_every / 2, self.fault_every * 3 / 2)
            };
            injected += 1;
            let wake = Instant::now() + gap;
            while Instant::now() < wake.min(deadline) {
                self.reap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
            if round.is_empty() {
                round = KINDS.to_vec();
                rng.shuffle(&mut round);
            }
            let kind = round.pop().expect("a round has kinds");
            let at = t0.elapsed().as_secs_f64();
            let started = Instant::now();
            let detail = self
                .inject(kind, rng, oracle, blobs, world)
                .await
                .with_context(|| format!("injecting {kind}"))?;
            eprintln!("soak: {at:>7.1}s {kind}: {detail}");
            *self.faults.entry(kind.to_string()).or_default() += 1;
            self.events.push(Event {
                t_s: at,
                kind,
                held_s: started.elapsed().as_secs_f64(),
                detail,
            });
        }
    }

    async fn inject(
        &mut self,
        kind: &str,
        rng: &mut Rng,
        oracle: &Oracle,
        blobs: &[(String, BlobSpec)],
        world: &Arc<World>,
    ) -> anyhow::Result<String> {
        match kind {
            "upstream restart" => {
                let down = rng.between(Duration::ZERO, Duration::from_secs(2));
                let o = oracle.outage_begins();
                self.used.add(&self.upstream.log.usage(0, None));
                self.upstream.proc.kill_now();
                // Each incarnation's logs are kept: `<name>.out.<n>`.
                self.restarts += 1;
                for p in [&self.upstream.proc.stdout, &self.upstream.proc.stderr] {
                    let mut keep = p.clone().into_os_string();
                    keep.push(format!(".{}", self.restarts));
                    let _ = std::fs::rename(p, keep);
                }
                tokio::time::sleep(down).await;
                let addr = self.upstream.addr.clone();
                let r = start_upstream(&self.tools, &self.work, &self.storage, &addr, None).await;
                oracle.outage_ends(o);
                self.upstream = r?;
                Ok(format!("kill -9, down {down:?}"))
            }
            "gate cut" => {
                let down = rng.between(Duration::ZERO, Duration::from_secs(3));
                let o = oracle.outage_begins();
                self.gate.cut(down);
                tokio::time::sleep(down).await;
                oracle.outage_ends(o);
                Ok(format!(
                    "every connection cut, new ones refused for {down:?}"
                ))
            }
            "corrupt upstream blob" => {
                // A blob the cache does not hold, so that regproxy fetches
                // the corrupted bytes (the hot ones stay cached).
                let path_of = |root: &Path, b: &BlobSpec| {
                    let hex = b.digest.trim_start_matches("sha256:").to_string();
                    root.join(&hex[..2]).join(hex)
                };
                let cached = |b: &BlobSpec| path_of(&self.cache_dir.join("sha256"), b).exists();
                let big: Vec<_> = blobs.iter().filter(|(_, b)| b.size >= 16 << 10).collect();
                let cold: Vec<_> = big.iter().filter(|(_, b)| !cached(b)).collect();
                let (repo, b) = if cold.is_empty() {
                    big[rng.below(big.len())]
                } else {
                    *cold[rng.below(cold.len())]
                };
                let path =
                    path_of(&self.storage.join("docker/registry/v2/blobs/sha256"), b).join("data");
                let at = rng.below((b.size / 2) as usize) as u64 + b.size / 4;
                let original = flip(&path, at, 4096)?;
                // A client asks for it at once; others may while it lasts.
                let mut probe = Worker::new(world.clone(), rng.next_u64());
                let right = probe.get_blob("corrupt probe", repo, &b.digest).await;
                let hold = rng.between(Duration::from_secs(1), Duration::from_secs(5));
                tokio::time::sleep(hold).await;
                restore(&path, at, &original)?;
                Ok(format!(
                    "{} bytes at {at} of {repo}@{} ({}, {}), for {hold:?}; the probe GET {}",
                    original.len(),
                    b.digest,
                    crate::report::human(b.size),
                    if cold.is_empty() {
                        "cached"
                    } else {
                        "not cached"
                    },
                    if right {
                        "was served the cached, right blob"
                    } else {
                        "failed (cut or error), as it must"
                    }
                ))
            }
            "full disk" => {
                let filler = self.disk.path.join("filler");
                let f2 = filler.clone();
                let filled = tokio::task::spawn_blocking(move || fill(&f2)).await??;
                let hold = rng.between(Duration::from_secs(1), Duration::from_secs(5));
                tokio::time::sleep(hold).await;
                std::fs::remove_file(&filler)?;
                Ok(format!(
                    "a {} filler left the tmpfs full for {hold:?}",
                    crate::report::human(filled)
                ))
            }
            "regproxy rollout" => {
                let next = self.start_regproxy().await?;
                let old = std::mem::replace(&mut self.current, next);
                old.proc.signal("TERM");
                let name = old.proc.name.clone();
                self.draining.push(old);
                self.publish();
                Ok(format!(
                    "{} started beside {name}, then SIGTERM to {name}",
                    self.current.proc.name
                ))
            }
            other => bail!("unknown fault {other}"),
        }
    }

    /// Stops everything; what the upstream sent and what the logs say.
    pub async fn finish(mut self) -> Ended {
        let until = Instant::now() + Duration::from_secs(30);
        while !self.draining.is_empty() && Instant::now() < until {
            self.reap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for r in &self.draining {
            self.exits
                .push(format!("{}: still draining after 30s", r.proc.name));
        }
        self.current.proc.signal("TERM");
        let until = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.current.proc.exited() {
                break format!("{s}");
            }
            if Instant::now() > until {
                break "did not exit within 30s of SIGTERM".into();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.exits
            .push(format!("{} (at the end): {status}", self.current.proc.name));
        self.used.add(&self.upstream.log.usage(0, None));
        let log = scan_logs(&self.work, self.started);
        let Rig {
            faults,
            events,
            used,
            exits,
            ..
        } = self;
        Ended {
            faults,
            events,
            upstream: used,
            exits,
            log,
        }
    }
}

/// Inverts `len` bytes at `at`; returns what was there.
fn flip(path: &Path, at: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(at))?;
    let mut buf = vec![0u8; len];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    let bad: Vec<u8> = buf.iter().map(|b| !b).collect();
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&bad)?;
    f.sync_data()?;
    Ok(buf)
}

fn restore(path: &Path, at: u64, original: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(original)?;
    f.sync_data()?;
    Ok(())
}

/// Writes `path` until the filesystem is full; the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // Whatever a partial block left: fill it too.
    loop {
        match f.write(&chunk[..4096]) {
            Ok(k) if k > 0 => n += k as u64,
            _ => break,
        }
    }
    Ok(n)
}

/// Panics, `ERROR` and `WARN` lines in every regproxy's stderr.
fn scan_logs(work: &Path, started: usize) -> LogScan {
    let mut s = LogScan::default();
    for n in 1..=started {
        let text =
            std::fs::read_to_string(work.join(format!("regproxy-{n}.err"))).unwrap_or_default();
        for l in text.lines() {
            let panic = l.contains("panicked");
            let error = l.contains(" ERROR ");
            s.panics += panic as u64;
            s.error_lines += error as u64;
            s.warn_lines += l.contains(" WARN ") as u64;
            s.digest_mismatches += l.contains("does not match its digest") as u64;
            if (panic || error) && s.examples.len() < 20 {
                s.examples.push(format!("regproxy-{n}: {l}"));
            }
        }
    }
    s
}
