//! The `regproxy` binary under test, on port 0, learning its ports from its
//! ready file; its metrics, and its memory as it runs.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;

use super::{get, temp_dir, wait_blocking, wait_for, Registry, TempDir, PATIENCE};

/// The `regproxy` binary under test.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub cache_dir: PathBuf,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// Where its `--ready-file` is written.
    _ready_dir: TempDir,
}

/// The API and admin addresses in a `--ready-file`, once it is there.
fn read_ready_file(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let ready: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let addr = |v: &serde_json::Value| v.as_str()?.parse().ok();
    Some((addr(&ready["listen"][0])?, addr(&ready["admin"])?))
}

pub fn regproxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_regproxy")
}

impl Proxy {
    /// Starts `regproxy serve` on port 0 in front of `upstream` with `args` added.
    pub fn start(upstream: &str, cache_dir: &Path, args: &[&str]) -> Proxy {
        Proxy::start_on("127.0.0.1:0", upstream, cache_dir, args)
    }

    pub fn start_on(listen: &str, upstream: &str, cache_dir: &Path, args: &[&str]) -> Proxy {
        Proxy::try_start_on(listen, upstream, cache_dir, args)
            .unwrap_or_else(|logs| panic!("regproxy did not start; it logged:\n{logs}"))
    }

    /// [`Proxy::start_on`], or what regproxy logged if it did not start
    /// (within [`PATIENCE`]).
    pub fn try_start_on(
        listen: &str,
        upstream: &str,
        cache_dir: &Path,
        args: &[&str],
    ) -> Result<Proxy, String> {
        let ready_dir = temp_dir("ready");
        let ready = ready_dir.path().join("ready.json");
        let mut child = Command::new(regproxy_bin())
            .args([
                "serve",
                "--listen",
                listen,
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--upstream",
                upstream,
            ])
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--ready-file")
            .arg(&ready)
            .args(args)
            .env("RUST_LOG", "regproxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let l2 = Arc::clone(&logs);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        // The file appears whole (written aside, then renamed) once both
        // listeners are bound; a proxy that fails to start exits instead.
        let deadline = Instant::now() + PATIENCE;
        let (addr, admin) = loop {
            if let Some(bound) = read_ready_file(&ready) {
                break bound;
            }
            let exited = child.try_wait().unwrap().is_some();
            if exited || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                // Its stderr ends with it: every line it logged is read.
                let _ = reader.join();
                return Err(logs.lock().unwrap().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Proxy {
            addr,
            admin,
            cache_dir: cache_dir.to_owned(),
            child,
            logs,
            _ready_dir: ready_dir,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the proxy has asked the upstream, anonymously, whether it
    /// lets anyone in, and written the answer (open) to `open.json`. Tests
    /// that meter the upstream's bytes through a [`Gate`] wait for it first,
    /// so that this request of the proxy's own does not spend their budget.
    pub fn wait_learned_open(&self) {
        let state = self.cache_dir.join("open.json");
        wait_blocking(
            || std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"upstream_open\":true")),
            "regproxy learned that the upstream is open and said so in open.json",
        );
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The metrics as name{labels} → value.
    pub async fn metrics(&self) -> HashMap<String, u64> {
        metrics_at(self.admin).await
    }

    /// Waits until no blob fill is in flight: every fill started so far has
    /// committed its blob under `sha256/` or thrown it away and cleaned up.
    /// A client's response ends when the bytes are verified; the commit
    /// (fsync, rename) follows, and `regproxy_fills_inflight` drops only
    /// after it (or after the clean-up of a failed fill).
    pub async fn fills_done(&self) {
        fills_done_at(self.admin).await
    }

    /// [`upstream_settled`] for this proxy.
    pub async fn settled(&self, upstream: &Registry) -> usize {
        upstream_settled(self.admin, upstream).await
    }

    pub async fn metric(&self, name: &str) -> u64 {
        *self
            .metrics()
            .await
            .get(name)
            .unwrap_or_else(|| panic!("metric {name} exists"))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit and returns whether it exited 0;
    /// fails if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(
                Instant::now() < deadline,
                "regproxy did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes of all files under the cache dir's content tree.
    pub fn cached_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        walk(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        }
        walk(&self.cache_dir.join("sha256"))
    }

    pub fn cache_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.cache_dir.join("sha256").join(&hex[..2]).join(hex)
    }
}

/// The metrics of the regproxy whose admin endpoint is `admin`, as
/// name{labels} → value.
pub async fn metrics_at(admin: SocketAddr) -> HashMap<String, u64> {
    let (status, _, body) = get(&format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.unwrap().to_vec())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        })
        .collect()
}

/// [`Proxy::fills_done`] for the regproxy whose admin endpoint is `admin`.
pub async fn fills_done_at(admin: SocketAddr) {
    wait_for(
        || async { metrics_at(admin).await["regproxy_fills_inflight"] == 0 },
        "no blob fill is in flight (each one committed or thrown away)",
    )
    .await
}

/// Waits until the regproxy whose admin endpoint is `admin` has no fill in
/// flight (see [`Proxy::fills_done`]) and the upstream's access log shows a
/// blob GET for every GET the proxy sent for a fill (`regproxy_fills_total`,
/// plus the resumes); returns the access log's count of blob GETs. Only then
/// do counts of upstream GETs say what a pull did.
pub async fn upstream_settled(admin: SocketAddr, upstream: &Registry) -> usize {
    fills_done_at(admin).await;
    let m = metrics_at(admin).await;
    let sent = (m["regproxy_fills_total"] + m["regproxy_upstream_resumes_total"]) as usize;
    upstream
        .logged(sent, "blob GETs, one for each the proxy sent", |l| {
            l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")
        })
        .await
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Anonymous resident memory of process `pid` (`RssAnon` in
/// `/proc/<pid>/status`), in bytes.
pub fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// CPU time process `pid` has used so far, user and system together
/// (`utime` and `stime` in `/proc/<pid>/stat`, counted in `USER_HZ` ticks).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold anything: the first of them (index 0) is field 3, `state`, so
    // `utime` (field 14) and `stime` (15) are at 11 and 12.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / user_hz() as f64))
}

/// The kernel's `USER_HZ`, the unit of CPU times in `/proc` (`getconf
/// CLK_TCK`; 100 on every common Linux).
fn user_hz() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("getconf CLK_TCK prints the clock ticks per second")
    })
}

/// Samples a process's `RssAnon` on a thread of its own, every few
/// milliseconds, until dropped or asked for the peak.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match rss_anon(pid) {
                    Some(r) => {
                        p.fetch_max(r, Ordering::SeqCst);
                    }
                    None => return,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest value seen so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Stops sampling; returns the peak.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Temp files under a cache dir's `tmp/`, the ownership markers of the
/// processes sharing it aside: what a fill left behind.
pub fn temp_files(cache_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if e.file_name() != "owner" {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&cache_dir.join("tmp"), &mut out);
    out
}

/// The admin token the tests start proxies with (`--admin-token-file`).
pub const TOKEN: &str = "an-admin-token-of-the-test";

/// A file holding [`TOKEN`], in a temp dir that lives as long as the handle.
pub fn token_file() -> (TempDir, PathBuf) {
    let dir = temp_dir("admin-token");
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    (dir, path)
}
