//! Child processes of a run: started with their output in files, stopped on
//! drop (SIGTERM, then SIGKILL), their memory sampled from `/proc`, and the
//! upstream's access log read back to count what the upstream sent.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// A child process that is stopped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `<dir>/<name>.out|.err`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Proc> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout)?)
            .stderr(fs::File::create(&stderr)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`TERM`, `KILL`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// `kill -9` and reap: the process is gone when this returns.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the tail of its stderr if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let err = fs::read_to_string(&self.stderr).unwrap_or_default();
            let tail: String = err
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!("{} exited with {status}:\n{tail}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port (bound, then released for a child to bind), never one
/// this process handed out before: two quick binds of port 0 can get the same.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("port list lock");
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no new free loopback port in 100 tries")
}

/// Peak memory of a process and its descendants, in KiB.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct MemPeak {
    /// `VmRSS` summed over the process tree.
    pub rss_kib: u64,
    /// `RssAnon` summed over the process tree (file-backed pages excluded).
    pub anon_kib: u64,
}

/// `VmRSS` and `RssAnon` of one process, in KiB.
pub fn status_kib(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some((field("VmRSS:"), field("RssAnon:")))
}

fn tree(root: u32, out: &mut Vec<u32>) {
    if out.len() > 256 {
        return;
    }
    out.push(root);
    let Ok(tasks) = fs::read_dir(format!("/proc/{root}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        if let Ok(children) = fs::read_to_string(task.path().join("children")) {
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                tree(child, out);
            }
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) used so far by a process and its descendants.
pub fn cpu_seconds(root: u32) -> f64 {
    let mut pids = Vec::new();
    tree(root, &mut pids);
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name, which may hold spaces: state is
            // field 3, utime 14, stime 15.
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

#[derive(Default)]
struct SamplerState {
    roots: Vec<u32>,
    peak: MemPeak,
    /// Bumped by every `watch` and `take`: a sample taken of the previous
    /// processes, or before the reset, is dropped instead of counted.
    generation: u64,
}

/// Samples the memory of the watched processes every few milliseconds on its
/// own thread, keeping the peak since the last [`MemSampler::take`].
pub struct MemSampler {
    state: Arc<Mutex<SamplerState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemSampler {
    pub fn start(every: Duration) -> MemSampler {
        let state = Arc::new(Mutex::new(SamplerState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut pids = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (roots, generation) = {
                        let s = state.lock().expect("sampler lock");
                        (s.roots.clone(), s.generation)
                    };
                    pids.clear();
                    for r in roots {
                        tree(r, &mut pids);
                    }
                    let (mut rss, mut anon) = (0, 0);
                    for &p in &pids {
                        if let Some((r, a)) = status_kib(p) {
                            rss += r;
                            anon += a;
                        }
                    }
                    {
                        let mut s = state.lock().expect("sampler lock");
                        if s.generation == generation {
                            s.peak.rss_kib = s.peak.rss_kib.max(rss);
                            s.peak.anon_kib = s.peak.anon_kib.max(anon);
                        }
                    }
                    std::thread::sleep(every);
                }
            })
        };
        MemSampler {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Watches these processes (and their descendants) from now on, peaks reset.
    pub fn watch(&self, roots: Vec<u32>) {
        let mut s = self.state.lock().expect("sampler lock");
        s.roots = roots;
        s.peak = MemPeak::default();
        s.generation += 1;
    }

    /// The peak since the last `take` or `watch`, and resets it.
    pub fn take(&self) -> MemPeak {
        let mut s = self.state.lock().expect("sampler lock");
        s.generation += 1;
        std::mem::take(&mut s.peak)
    }
}

impl Drop for MemSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line of Distribution's access log (combined log format).
#[derive(Debug, Clone)]
pub struct AccessEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

/// Parses `IP - - [date] "GET /v2/x HTTP/1.1" 200 123 "ref" "ua"`.
pub fn parse_access_line(line: &str) -> Option<AccessEntry> {
    let start = line.find('"')?;
    let rest = &line[start + 1..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split_whitespace();
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let mut after = rest[end + 1..].split_whitespace();
    let status = after.next()?.parse().ok()?;
    let bytes = after.next()?.parse().unwrap_or(0);
    Some(AccessEntry {
        method,
        path,
        status,
        bytes,
    })
}

/// The access log of an upstream registry (its stdout).
#[derive(Debug, Clone)]
pub struct AccessLog {
    pub path: PathBuf,
}

/// What the upstream sent during one scenario.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct UpstreamUse {
    /// Successful blob GETs (200 or 206).
    pub blob_gets: u64,
    /// Response bytes of those blob GETs.
    pub blob_bytes: u64,
    /// The most successful GETs of any one blob.
    pub max_gets_per_blob: u64,
    /// Response bytes of every request.
    pub bytes: u64,
    pub requests: u64,
}

impl UpstreamUse {
    /// Adds another repetition's use.
    pub fn add(&mut self, o: &UpstreamUse) {
        self.blob_gets += o.blob_gets;
        self.blob_bytes += o.blob_bytes;
        self.bytes += o.bytes;
        self.requests += o.requests;
        self.max_gets_per_blob = self.max_gets_per_blob.max(o.max_gets_per_blob);
    }
}

impl AccessLog {
    /// The current end of the log; entries after it belong to what follows.
    pub fn mark(&self) -> u64 {
        fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until at least `n` entries were appended after `mark` (at most
    /// `max`): the registry writes a request's line after its response went
    /// out, so the client can be done before the line is there.
    pub fn wait_entries(&self, mark: u64, n: u64, max: Duration) {
        let deadline = Instant::now() + max;
        while (self.since(mark).len() as u64) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until nothing has been appended for `quiet` (at most `max`):
    /// a line is written when a response completes.
    pub fn settle(&self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut last = self.mark();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(25));
            let now = self.mark();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    /// Entries appended after `mark`.
    pub fn since(&self, mark: u64) -> Vec<AccessEntry> {
        let data = fs::read(&self.path).unwrap_or_default();
        let from = (mark as usize).min(data.len());
        String::from_utf8_lossy(&data[from..])
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// What the upstream sent after `mark`; `digests` restricts blob GETs to those blobs.
    pub fn usage(&self, mark: u64, digests: Option<&[String]>) -> UpstreamUse {
        let mut u = UpstreamUse::default();
        let mut per_blob = std::collections::HashMap::new();
        for e in self.since(mark) {
            u.requests += 1;
            u.bytes += e.bytes;
            let Some((_, digest)) = e.path.rsplit_once("/blobs/") else {
                continue;
            };
            let is_blob = e.method == "GET"
                && digest.starts_with("sha256:")
                && matches!(e.status, 200 | 206)
                && digests.is_none_or(|ds| ds.iter().any(|d| d == digest));
            if is_blob {
                u.blob_gets += 1;
                u.blob_bytes += e.bytes;
                let n = per_blob.entry(digest.to_string()).or_insert(0);
                *n += 1;
                u.max_gets_per_blob = u.max_gets_per_blob.max(*n);
            }
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_parse() {
        let e = parse_access_line(
            r#"127.0.0.1 - - [28/Nov/2026:01:27:12 +0000] "GET /v2/a/blobs/sha256:ab HTTP/1.1" 200 268435456 "" "curl/7.88.1""#,
        )
        .expect("a combined log line should parse");
        assert_eq!(e.method, "GET");
        assert_eq!(e.path, "/v2/a/blobs/sha256:ab");
        assert_eq!(e.status, 200);
        assert_eq!(e.bytes, 268435456);
        assert!(parse_access_line("time=\"x\" level=info msg=\"y\"").is_none_or(|e| e.status == 0));
    }

    /// How long these tests wait for what must happen: on a loaded machine
    /// this thread may get little CPU, and the sampler's thread may wait to
    /// be scheduled, so neither is given a fixed short time.
    const PATIENCE: Duration = Duration::from_secs(60);

    #[test]
    fn cpu_time_of_this_process_grows() {
        let before = cpu_seconds(std::process::id());
        // Busy work until it shows: a share of a loaded CPU may take a
        // while to add up to a clock tick.
        let start = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after <= before && start.elapsed() < PATIENCE {
            let burst = Instant::now();
            while burst.elapsed() < Duration::from_millis(20) {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            after = cpu_seconds(std::process::id());
        }
        std::hint::black_box(x);
        assert!(
            after > before,
            "busy work should show as CPU time: {before} -> {after} after {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_sampler_sees_this_process() {
        let s = MemSampler::start(Duration::from_millis(5));
        s.watch(vec![std::process::id()]);
        // The sampler's thread samples when it is scheduled: wait for a
        // sample rather than for a fixed time.
        let start = Instant::now();
        let p = loop {
            std::thread::sleep(Duration::from_millis(50));
            let p = s.state.lock().expect("sampler lock").peak;
            if p.rss_kib > 0 || start.elapsed() > PATIENCE {
                break s.take();
            }
        };
        assert!(
            p.rss_kib > 0 && p.anon_kib > 0,
            "this process should have resident memory: {p:?}"
        );
    }
}
