//! An upstream behind a shaped link, for the uplink budget's tests (issue
//! 12): Debian's `docker-registry` inside a network namespace of the test's
//! own whose veth is shaped with `tc tbf`, so that its responses cross the
//! shaped link to a proxy in the root namespace; and the registry's own
//! account of what it sent, from which the tests compute rates.
//!
//! Distribution logs a `response completed` line per response when it is
//! done writing it, with the time of that moment (`time=`), how long the
//! response took (`http.response.duration=`, a Go duration) and its body
//! bytes (`http.response.written=`). A response is taken to have sent its
//! bytes evenly from `time - duration` to `time`. Bytes count as written
//! once they are in the socket's send buffer: the namespace keeps that
//! small, so that written is close to sent.
//!
//! The log says when each response started and ended, not how its bytes
//! spread in between; for the bytes in any few seconds, [`Acked`] samples
//! the kernel's count of the payload bytes the upstream's connections got
//! acknowledged (`ss` in the namespace, every 100 ms).

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::Registry;

/// A registry inside a namespace whose link is shaped to `mbit` Mbit/s.
/// The registry is stopped before the namespace is removed (field order).
pub struct ShapedUpstream {
    pub registry: Registry,
    pub ns: Netns,
}

impl ShapedUpstream {
    pub fn start(mbit: u32) -> ShapedUpstream {
        let ns = Netns::create();
        ns.shape(mbit);
        // Distribution counts a response's bytes as written once they are in
        // its socket's send buffer, which the kernel grows up to 4 MiB: up
        // to a second early at 20 Mbit/s. Capped at 256 KiB in this
        // namespace (its own sysctl), the log tracks what crossed the link
        // within a few percent, and the link is still filled without a rate.
        ns.sysctl("net.ipv4.tcp_wmem", "4096 16384 262144");
        let registry = Registry::start_in(&ns);
        ShapedUpstream { registry, ns }
    }

    pub fn url(&self) -> String {
        self.registry.url()
    }
}

/// One response as the registry logged it; times in seconds since the epoch.
#[derive(Clone, Debug)]
pub struct Sent {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub bytes: u64,
    pub start: f64,
    pub end: f64,
}

impl Sent {
    /// Its own rate, in bits per second.
    pub fn bit_rate(&self) -> f64 {
        self.bytes as f64 * 8.0 / (self.end - self.start).max(1e-3)
    }

    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.uri.contains("/blobs/sha256:")
    }
}

/// The value of `key=` in a logrus text line: quoted or bare.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}=")).or_else(|| {
        // `time=` opens the line.
        line.starts_with(&format!("{key}=")).then_some(usize::MAX)
    })?;
    let rest = if at == usize::MAX {
        &line[key.len() + 1..]
    } else {
        &line[at + key.len() + 2..]
    };
    match rest.strip_prefix('"') {
        Some(q) => q.split('"').next(),
        None => rest.split(' ').next(),
    }
}

/// Every response in a registry's log (`response completed`, with or
/// without error), in log order.
pub fn sent(log: &str) -> Vec<Sent> {
    log.lines()
        .filter(|l| l.contains("msg=\"response completed"))
        .filter_map(|l| {
            let end = rfc3339_seconds(field(l, "time")?)?;
            let took = go_duration_seconds(field(l, "http.response.duration")?)?;
            Some(Sent {
                method: field(l, "http.request.method")?.to_owned(),
                uri: field(l, "http.request.uri")?.to_owned(),
                status: field(l, "http.response.status")?.parse().ok()?,
                bytes: field(l, "http.response.written")
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(0),
                start: end - took,
                end,
            })
        })
        .collect()
}

/// `2026-11-29T02:32:00.025734475Z` as seconds since the epoch.
pub fn rfc3339_seconds(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard
    // Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// A Go `time.Duration` as printed (`7.081107ms`, `1m2.5s`, `512µs`) in seconds.
pub fn go_duration_seconds(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (unit, scale) = [
            ("ns", 1e-9),
            ("µs", 1e-6),
            ("us", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))?;
        total += value * scale;
        rest = &rest[unit.len()..];
    }
    Some(total)
}

/// What a set of responses sent, in bits per second.
#[derive(Debug)]
pub struct Rates {
    /// All their bytes over the wall time from the first start to the last end.
    pub overall: f64,
    /// Each response's own rate.
    pub each: Vec<f64>,
    /// Seconds from the first start to the last end.
    pub span: f64,
    pub bytes: u64,
}

/// [`Rates`] of `sent`.
pub fn rates(sent: &[Sent]) -> Rates {
    let first = sent.iter().map(|s| s.start).fold(f64::INFINITY, f64::min);
    let last = sent.iter().map(|s| s.end).fold(f64::NEG_INFINITY, f64::max);
    let span = (last - first).max(1e-3);
    let bytes: u64 = sent.iter().map(|s| s.bytes).sum();
    Rates {
        overall: bytes as f64 * 8.0 / span,
        each: sent.iter().map(Sent::bit_rate).collect(),
        span,
        bytes,
    }
}

/// Samples, every 100 ms, the payload bytes the upstream's connections
/// (local port 5000 in its namespace) got acknowledged: `bytes_acked` of
/// `ss -ti`, summed over every connection seen since the start (a closed
/// one keeps its last count).
pub struct Acked {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The connections to port 5000 in namespace `ns` and their `bytes_acked`.
fn acked_now(ns: &str) -> Vec<(String, u64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-tinOH", "state", "established"])
        .arg("( sport = :5000 )")
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let peer = l.split_whitespace().nth(3)?.to_owned();
            let acked = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("bytes_acked:"))?
                .parse()
                .ok()?;
            Some((peer, acked))
        })
        .collect()
}

impl Acked {
    pub fn start(up: &ShapedUpstream) -> Acked {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, ns) = (Arc::clone(&samples), Arc::clone(&stop), up.ns.name.clone());
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<String, u64> = HashMap::new();
            // One more sample once stopped: the last bytes were acknowledged
            // before the clients had them.
            loop {
                let last = st.load(Ordering::SeqCst);
                for (peer, n) in acked_now(&ns) {
                    let e = seen.entry(peer).or_default();
                    *e = (*e).max(n);
                }
                let total = seen.values().sum();
                s.lock().unwrap().push((Instant::now(), total));
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Acked {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the highest rate, in bits per second, between two
    /// samples at least `window` apart (the nearest such pair for each
    /// start), and the bytes acknowledged in all.
    pub fn finish(mut self, window: Duration) -> (f64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = self.samples.lock().unwrap();
        let max = s
            .iter()
            .enumerate()
            .filter_map(|(i, (t0, b0))| {
                let (t1, b1) = s[i..].iter().find(|(t, _)| *t - *t0 >= window)?;
                Some((b1 - b0) as f64 * 8.0 / (*t1 - *t0).as_secs_f64())
            })
            .fold(0.0, f64::max);
        (
            max,
            s.last().map_or(0, |l| l.1) - s.first().map_or(0, |f| f.1),
        )
    }
}

impl Drop for Acked {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
