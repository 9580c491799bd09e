//! The uplink budget, `--upstream-rate`: a token bucket over the bytes this
//! node takes from the upstream, shared by every fill, with priority lanes.
//!
//! A reader of an upstream body takes tokens for each chunk after it arrives
//! and before it reads the next, so while it waits the socket's buffer fills
//! and TCP slows the sender: the shaping holds no bytes of its own. What the
//! buffers can hold is paid for as soon as it can arrive ([`Horizon`]): a
//! blob fill is charged up to a window past what it has read, so a burst of
//! new connections filling their buffers at link speed is paid for at once,
//! not a window late. The bucket holds at most [`burst`] (64 KiB, or 50 ms
//! at the rate), and may go into debt by one charge, so over any few seconds
//! the upstream sends at most the rate and one burst.
//!
//! Lanes, so that a prefetch never delays a pull:
//! - [`Lane::Meta`]: manifests and tag revalidations. Charged, never waits,
//!   so it goes before everything else.
//! - [`Lane::Pull`]: a fill that a client waits on. Waits for tokens.
//! - [`Lane::Prefetch`]: a fill that no client waits on (a prefetch, until a
//!   client joins it). While a pull has asked for tokens within the last
//!   [`PULL_RECENT`], a prefetch also needs its share, a second bucket filled
//!   at 1/[`PREFETCH_SHARE`] of the rate; otherwise it takes all there is.
//!
//! Only bytes from the upstream are counted: peers and a sibling process
//! serve from the LAN and the node. The rate changes live
//! ([`Budget::set_rate`], `PUT /admin/rate`); waiters look again at least
//! every [`RECHECK`], so a change takes effect within it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Who waits on the bytes being counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Meta,
    Pull,
    Prefetch,
}

/// A request extension: this request is a prefetch of this proxy's own
/// (`App::fetch`), not a client's, so the fill it starts is in
/// [`Lane::Prefetch`] until a client joins it.
#[derive(Clone, Copy, Debug)]
pub struct Prefetching;

/// While a client waits, a prefetch gets at most 1/this of the rate.
pub const PREFETCH_SHARE: u64 = 10;
/// How long after a pull last asked for tokens a prefetch still yields.
pub const PULL_RECENT: Duration = Duration::from_millis(500);
/// Longest a waiter sleeps before it looks at the rate again.
pub const RECHECK: Duration = Duration::from_millis(100);

pub struct Budget {
    /// Bytes per second; 0: no limit.
    rate: AtomicU64,
    state: Mutex<State>,
    /// Nanoseconds spent waiting, per lane that waits.
    waited_pull: AtomicU64,
    waited_prefetch: AtomicU64,
}

struct State {
    tokens: f64,
    share: f64,
    last: Instant,
    last_pull: Option<Instant>,
}

/// The bucket's depth at `rate`: 64 KiB, or 50 ms of the rate.
pub fn burst(rate: u64) -> f64 {
    (rate as f64 / 20.0).max(64.0 * 1024.0)
}

impl Budget {
    pub fn new(rate: u64) -> Budget {
        Budget {
            rate: AtomicU64::new(rate),
            state: Mutex::new(State {
                tokens: burst(rate),
                share: burst(rate) / PREFETCH_SHARE as f64,
                last: Instant::now(),
                last_pull: None,
            }),
            waited_pull: AtomicU64::new(0),
            waited_prefetch: AtomicU64::new(0),
        }
    }

    /// Bytes per second; 0: no limit.
    pub fn rate(&self) -> u64 {
        self.rate.load(Relaxed)
    }

    /// Changes the rate; waiters see it within [`RECHECK`].
    pub fn set_rate(&self, rate: u64) {
        let mut st = self.lock();
        self.refill(&mut st, Instant::now());
        self.rate.store(rate, Relaxed);
        st.tokens = st.tokens.min(burst(rate));
        st.share = st.share.min(burst(rate) / PREFETCH_SHARE as f64);
        drop(st);
        tracing::info!(rate = %crate::units::format_rate(rate), "upstream rate set");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refill(&self, st: &mut State, now: Instant) {
        let rate = self.rate() as f64;
        let dt = now.saturating_duration_since(st.last).as_secs_f64();
        st.last = now;
        st.tokens = (st.tokens + rate * dt).min(burst(self.rate()));
        let share_rate = rate / PREFETCH_SHARE as f64;
        st.share = (st.share + share_rate * dt).min(burst(self.rate()) / PREFETCH_SHARE as f64);
    }

    /// Counts `n` bytes of [`Lane::Meta`]: never waits.
    pub fn charge(&self, n: u64) {
        let _ = self.try_take(n, Lane::Meta, Instant::now());
    }

    /// Counts `n` bytes just read from the upstream for `lane`, waiting
    /// until the budget allows them (never for [`Lane::Meta`]).
    pub async fn take(&self, n: u64, lane: Lane) {
        let started = Instant::now();
        while let Some(wait) = self.try_take(n, lane, Instant::now()) {
            tokio::time::sleep(wait.min(RECHECK)).await;
        }
        let waited = started.elapsed().as_nanos() as u64;
        match lane {
            Lane::Pull => self.waited_pull.fetch_add(waited, Relaxed),
            Lane::Prefetch => self.waited_prefetch.fetch_add(waited, Relaxed),
            Lane::Meta => 0,
        };
    }

    /// Takes `n` bytes' tokens, or says how long until they may be there.
    fn try_take(&self, n: u64, lane: Lane, now: Instant) -> Option<Duration> {
        let rate = self.rate();
        if rate == 0 {
            return None;
        }
        let mut st = self.lock();
        self.refill(&mut st, now);
        let n = n as f64;
        let until = |deficit: f64, rate: f64| Duration::from_secs_f64(deficit / rate);
        match lane {
            Lane::Meta => {}
            Lane::Pull => {
                st.last_pull = Some(now);
                if st.tokens < 0.0 {
                    return Some(until(-st.tokens, rate as f64));
                }
            }
            Lane::Prefetch => {
                if st.tokens < 0.0 {
                    return Some(until(-st.tokens, rate as f64));
                }
                let yielding = st
                    .last_pull
                    .is_some_and(|t| now.saturating_duration_since(t) < PULL_RECENT);
                if yielding {
                    if st.share < 0.0 {
                        return Some(until(-st.share, rate as f64 / PREFETCH_SHARE as f64));
                    }
                    st.share -= n;
                }
            }
        }
        st.tokens -= n;
        None
    }

    /// The budget's lines in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let ms = |a: &AtomicU64| a.load(Relaxed) / 1_000_000;
        let _ = write!(
            out,
            "# HELP regproxy_upstream_rate_bytes The upstream budget in bytes per second (--upstream-rate); 0: no limit.\n\
             # TYPE regproxy_upstream_rate_bytes gauge\n\
             regproxy_upstream_rate_bytes {}\n\
             # HELP regproxy_budget_wait_milliseconds_total Time fills waited for the upstream budget, by lane.\n\
             # TYPE regproxy_budget_wait_milliseconds_total counter\n\
             regproxy_budget_wait_milliseconds_total{{lane=\"pull\"}} {}\n\
             regproxy_budget_wait_milliseconds_total{{lane=\"prefetch\"}} {}\n",
            self.rate(),
            ms(&self.waited_pull),
            ms(&self.waited_prefetch),
        );
    }
}

/// What one upstream response has been charged: bytes up to `window` past
/// what was read (the socket's receive buffer and the client's read buffer
/// hold that much), never past the response's length.
#[derive(Debug)]
pub struct Horizon {
    len: u64,
    window: u64,
    read: u64,
    charged: u64,
}

impl Horizon {
    /// A response of `len` bytes on a connection that buffers `window`.
    pub fn new(len: u64, window: u64) -> Horizon {
        Horizon {
            len,
            window,
            read: 0,
            charged: 0,
        }
    }

    /// `n` more bytes were read: the bytes to charge now.
    pub fn read(&mut self, n: u64) -> u64 {
        self.read += n;
        // Past its length (a lying upstream): every byte read, at least.
        let reach = (self.read + self.window).min(self.len).max(self.read);
        let owed = reach.saturating_sub(self.charged);
        self.charged += owed;
        owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes each lane gets in `secs` of paused time, both always asking.
    async fn race(rate: u64, secs: u64, lanes: &[Lane]) -> Vec<u64> {
        let budget = std::sync::Arc::new(Budget::new(rate));
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for &lane in lanes {
            let b = std::sync::Arc::clone(&budget);
            tasks.push(tokio::spawn(async move {
                let mut got = 0;
                while Instant::now() < end {
                    b.take(16 << 10, lane).await;
                    got += 16 << 10;
                }
                got
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_alone_gets_the_rate_and_no_more() {
        let rate = 2_500_000; // 20 Mbit/s
        for lane in [Lane::Pull, Lane::Prefetch] {
            let got = race(rate, 10, &[lane]).await[0] as f64;
            let per_s = got / 10.0;
            assert!(
                per_s <= rate as f64 * 1.02 && per_s >= rate as f64 * 0.95,
                "{lane:?}: {per_s} bytes/s at a rate of {rate}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefetch_gets_at_most_its_share_while_a_pull_waits() {
        let rate = 2_500_000;
        let got = race(rate, 10, &[Lane::Pull, Lane::Prefetch]).await;
        let (pull, prefetch) = (got[0] as f64 / 10.0, got[1] as f64 / 10.0);
        assert!(pull + prefetch <= rate as f64 * 1.02, "{pull} + {prefetch}");
        assert!(
            prefetch <= rate as f64 / PREFETCH_SHARE as f64 * 1.1,
            "prefetch took {prefetch} bytes/s beside a pull"
        );
        assert!(
            pull >= rate as f64 * 0.85,
            "the pull got only {pull} bytes/s"
        );
    }

    #[test]
    fn a_horizon_charges_the_window_ahead_and_the_length_in_all() {
        let mut h = Horizon::new(1000, 300);
        assert_eq!(
            h.read(100),
            400,
            "the first read pays for what is buffered behind it"
        );
        assert_eq!(h.read(100), 100);
        assert_eq!(h.read(500), 500);
        assert_eq!(h.read(300), 0, "the last window was paid for");
        assert_eq!(h.read(50), 50, "bytes past the length are still charged");
        let mut small = Horizon::new(10, 300);
        assert_eq!(small.read(10), 10, "never more than the response");
    }

    #[tokio::test(start_paused = true)]
    async fn meta_never_waits_and_is_charged() {
        let b = Budget::new(100_000);
        let t = Instant::now();
        b.take(1 << 20, Lane::Meta).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // The debt is the pulls' to wait out: ~10 s at 100 kB/s.
        b.take(1, Lane::Pull).await;
        assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_is_seen_within_a_recheck() {
        let b = std::sync::Arc::new(Budget::new(1_000));
        b.take(1 << 20, Lane::Meta).await; // ~17 min of debt at 1 kB/s
        let waiter = {
            let b = std::sync::Arc::clone(&b);
            tokio::spawn(async move {
                let t = Instant::now();
                b.take(1, Lane::Pull).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.set_rate(0);
        let waited = waiter.await.unwrap();
        assert!(waited <= Duration::from_secs(1) + RECHECK, "{waited:?}");
    }
}
