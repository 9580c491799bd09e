//! `cache verify`: re-hashes every committed entry at a bounded I/O rate,
//! removing what no longer matches its digest (bit rot on a cheap disk).
//!
//! One at a time. Reads go 1 MiB at a time on the blocking pool, never on
//! the runtime, paced to hold the rate on average; each file's clean cached
//! pages are dropped first (`POSIX_FADV_DONTNEED`), so that the bytes come
//! from the disk (pages a response has mapped stay: those are read as they
//! are). A mismatch is removed through the index even while it is being
//! sent: its readers' maps keep their bytes, and their clients verify what
//! they get. An entry removed or replaced meanwhile is skipped; a read that
//! fails with an I/O error counts as bad; other failures are reported and
//! leave the entry.
//!
//! The answer streams NDJSON: `{"event":"start",...}`, then
//! `{"event":"progress",...}` at most once a second and `{"event":"bad",...}`
//! per mismatch, then `{"event":"report","checked":N,"bytes":B,"bad":[..],
//! "errors":[..],"seconds":S}`. A client that hangs up stops the run.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::body::Body;
use crate::cache::Cache;
use crate::digest::Digest;

/// The rate when the request names none: 50 MiB/s.
pub const DEFAULT_RATE: u64 = 50 << 20;
/// Bytes read (and hashed) per step.
const CHUNK: usize = 1 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Starts a run at `rate` bytes/s (0: unlimited); its NDJSON body, or
/// `None` while another runs.
pub(super) fn start(cache: Arc<Cache>, rate: u64) -> Option<Body> {
    if cache.book.verifying.swap(true, SeqCst) {
        return None;
    }
    let running = Running(Arc::clone(&cache));
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let span = tracing::info_span!("cache_verify", rate);
    tokio::spawn(
        async move {
            let _running = running;
            run(&cache, rate, tx).await;
        }
        .instrument(span),
    );
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok(line), rx))
    });
    Some(Body::stream(lines, None))
}

/// Marks the run over, however it ends.
struct Running(Arc<Cache>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.book.verifying.store(false, SeqCst);
    }
}

/// Holds reads to `rate` bytes/s on average since the run began.
struct Pace {
    rate: u64,
    began: Instant,
    bytes: u64,
}

impl Pace {
    async fn took(&mut self, n: u64) {
        self.bytes += n;
        if self.rate == 0 {
            return;
        }
        let due = self.began + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
    }
}

/// What re-hashing one file found.
enum Checked {
    Good,
    Bad(String),
    /// Removed or replaced since the run's list was taken.
    Gone,
}

/// A run's reporting: where its lines go, and how far it got.
struct Report {
    tx: mpsc::Sender<Bytes>,
    entries: usize,
    total: u64,
    /// Entries checked, and their bytes.
    checked: u64,
    bytes: u64,
    last: Instant,
}

impl Report {
    /// Sends a line; false once the client is gone.
    async fn send(&self, v: Value) -> bool {
        self.tx.send(Bytes::from(format!("{v}\n"))).await.is_ok()
    }

    /// `into` bytes of the entry being checked are read: a progress line
    /// if the last is a second old, so that a large file shows progress
    /// too. False once the client is gone.
    async fn reading(&mut self, into: u64) -> bool {
        if self.last.elapsed() < PROGRESS_EVERY {
            return !self.tx.is_closed();
        }
        self.last = Instant::now();
        let line = json!({"event": "progress", "checked": self.checked, "entries": self.entries,
                          "bytes": self.bytes + into, "total_bytes": self.total});
        self.send(line).await
    }
}

async fn run(cache: &Arc<Cache>, rate: u64, tx: mpsc::Sender<Bytes>) {
    let list: Vec<(Digest, u64, u64)> = {
        let st = cache.lock();
        st.index
            .iter()
            .map(|(d, e)| (d.clone(), e.size, e.generation))
            .collect()
    };
    let total: u64 = list.iter().map(|(_, s, _)| s).sum();
    let began = Instant::now();
    let mut report = Report {
        tx,
        entries: list.len(),
        total,
        checked: 0,
        bytes: 0,
        last: began,
    };
    tracing::info!(entries = list.len(), bytes = total, "cache verify started");
    let start = json!({"event": "start", "entries": list.len(), "bytes": total, "rate": rate});
    if !report.send(start).await {
        return;
    }
    let mut pace = Pace {
        rate,
        began,
        bytes: 0,
    };
    let (mut bad, mut errors) = (Vec::new(), Vec::new());
    for (d, size, generation) in &list {
        let entry = (d, *size, *generation);
        let found = match check(cache, entry, &mut pace, &mut report).await {
            Ok(found) => found,
            Err(e) if report.tx.is_closed() => {
                tracing::info!(error = %e, "cache verify stopped: its client hung up");
                return;
            }
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "cache verify could not read an entry");
                errors.push(json!({"digest": d.to_string(), "error": e.to_string()}));
                continue;
            }
        };
        match found {
            Checked::Gone => continue,
            Checked::Good => {}
            Checked::Bad(why) => {
                let removed = cache.remove_bad(d, *generation);
                tracing::warn!(digest = %d, size, why, removed, "cache verify: content no longer matches its digest");
                bad.push(d.to_string());
                let line = json!({"event": "bad", "digest": d.to_string(), "size": size, "why": why, "removed": removed});
                if !report.send(line).await {
                    return;
                }
            }
        }
        report.checked += 1;
        report.bytes += size;
    }
    let seconds = began.elapsed().as_secs_f64();
    let (checked, bytes) = (report.checked, report.bytes);
    tracing::info!(
        checked,
        bytes,
        bad = bad.len(),
        seconds,
        "cache verify done"
    );
    let line = json!({"event": "report", "checked": checked, "bytes": bytes, "bad": bad, "errors": errors, "seconds": seconds});
    report.send(line).await;
}

/// Re-hashes entry `generation` of `d`, of `size` bytes.
async fn check(
    cache: &Arc<Cache>,
    (d, size, generation): (&Digest, u64, u64),
    pace: &mut Pace,
    report: &mut Report,
) -> io::Result<Checked> {
    let current = |c: &Cache| {
        c.lock()
            .index
            .peek(d)
            .is_some_and(|e| e.generation == generation)
    };
    if !current(cache) {
        return Ok(Checked::Gone);
    }
    let path = cache.path(d);
    let opened = blocking(move || {
        let f = File::open(path)?;
        // Advice only: without it the bytes may come from memory.
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
        Ok(f)
    })
    .await;
    let file = match opened {
        Ok(f) => Arc::new(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Evicted by a process sharing the dir: the index forgets it.
            cache.forget(d, generation);
            return Ok(Checked::Gone);
        }
        Err(e) => return Err(e),
    };
    let (mut hasher, mut buf, mut pos) = (Sha256::new(), vec![0u8; CHUNK], 0u64);
    loop {
        let f = Arc::clone(&file);
        let read = blocking(move || {
            let n = read_full(&f, &mut buf, pos)?;
            hasher.update(&buf[..n]);
            Ok((hasher, buf, n))
        })
        .await;
        let n;
        (hasher, buf, n) = match read {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                return Ok(Checked::Bad(format!("read error: {e}")));
            }
            Err(e) => return Err(e),
        };
        pos += n as u64;
        pace.took(n as u64).await;
        if !report.reading(pos).await {
            return Err(io::Error::other("the client hung up"));
        }
        if n < CHUNK || pos > size {
            break;
        }
    }
    if pos != size {
        return Ok(Checked::Bad(format!("{pos} bytes on disk, {size} indexed")));
    }
    let got = Digest::from_hasher(hasher);
    if got != *d {
        return Ok(Checked::Bad(format!("the bytes hash to {got}")));
    }
    Ok(Checked::Good)
}

/// Fills `buf` from `pos` on, short only at the end of the file.
fn read_full(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], pos + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

impl Cache {
    /// Removes entry `generation` of `d`, found corrupt, even while it is
    /// being sent; false if it was removed or replaced meanwhile.
    fn remove_bad(&self, d: &Digest, generation: u64) -> bool {
        let mut st = self.lock();
        if st.index.peek(d).is_none_or(|e| e.generation != generation) {
            return false;
        }
        self.take_out(&mut st, d);
        self.metrics.cache_verify_bad.fetch_add(1, Relaxed);
        self.publish(&st);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::io::Write;

    #[tokio::test]
    async fn a_corrupt_entry_is_found_and_removed_and_a_good_one_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let c =
            Arc::new(Cache::open(&tmp.path().join("c"), 8 << 20, Arc::clone(&m), true).unwrap());
        let big: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i * 7) as u8).collect();
        let (good, bad) = (Digest::of(&big), Digest::of(b"will rot"));
        c.put_manifest(good.clone(), "t".into(), Bytes::from(big))
            .await;
        c.put_manifest(bad.clone(), "t".into(), Bytes::from_static(b"will rot"))
            .await;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.path(&bad))
            .unwrap();
        f.write_all(b"W").unwrap();
        drop(f);

        let body = start(Arc::clone(&c), 0).expect("no run yet");
        assert!(start(Arc::clone(&c), 0).is_none(), "one run at a time");
        let out = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let lines: Vec<Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let report = lines.last().unwrap();
        assert_eq!(report["event"], "report");
        assert_eq!(report["checked"], 2);
        assert_eq!(
            report["bad"],
            json!([bad.to_string()]),
            "only the rotten entry is bad"
        );
        assert!(!c.path(&bad).exists(), "the bad entry is removed");
        assert!(c.get(&good, true).await.is_some(), "the good one stays");
        assert_eq!(m.cache_verify_bad.load(Relaxed), 1);
        assert!(start(c, 0).is_some(), "a new run may start once one ended");
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_stops_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let c =
            Arc::new(Cache::open(&tmp.path().join("c"), 8 << 20, Arc::default(), true).unwrap());
        let big = vec![7u8; 3 * CHUNK];
        c.put_manifest(Digest::of(&big), "t".into(), Bytes::from(big))
            .await;
        let mut body = start(Arc::clone(&c), 1 << 20).expect("no run yet");
        let first = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        assert!(
            first.data_ref().unwrap().starts_with(b"{"),
            "the start line"
        );
        drop(body);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while c.book.verifying.load(SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the run ends once its client is gone"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_holds_the_rate() {
        let began = Instant::now();
        let mut p = Pace {
            rate: 10 << 20,
            began,
            bytes: 0,
        };
        for _ in 0..20 {
            p.took(1 << 20).await;
        }
        assert_eq!(
            began.elapsed(),
            Duration::from_secs(2),
            "20 MiB at 10 MiB/s take 2 s"
        );
    }
}
