//! What the soak's clients saw: every request counted once as right, wrong
//! (completed, and not the truth), cut (the body broke off: the client knows
//! it failed), or an error by kind (refused, timed out, a status).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::Serialize;

use super::oracle::Verdict;

/// The counts of one kind of operation.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub right: u64,
    pub wrong: u64,
    pub cut: u64,
    pub errors: u64,
    /// Tags served stale while the upstream was out (right, and counted in `right`).
    pub stale_during_outage: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct TallyData {
    pub by_op: BTreeMap<String, Counts>,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// The first few wrong responses, whole.
    pub wrong_examples: Vec<String>,
    /// The first message of each error kind.
    pub error_examples: BTreeMap<String, String>,
    pub cut_examples: Vec<String>,
    /// When errors and cuts happened (seconds into the run, the first 5000 of
    /// each kind): the report tells those in a fault's window from the rest.
    pub error_times: BTreeMap<String, Vec<f64>>,
}

impl TallyData {
    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in self.by_op.values() {
            t.requests += c.requests;
            t.right += c.right;
            t.wrong += c.wrong;
            t.cut += c.cut;
            t.errors += c.errors;
            t.stale_during_outage += c.stale_during_outage;
        }
        t
    }
}

/// Shared by every client of a run.
#[derive(Default)]
pub struct Tally {
    data: Mutex<TallyData>,
    /// Completed right responses and their payload bytes, for throughput over time.
    pub done: AtomicU64,
    pub bytes: AtomicU64,
    /// When traffic started.
    pub start: std::sync::OnceLock<std::time::Instant>,
}

impl Tally {
    fn op<R>(&self, op: &str, f: impl FnOnce(&mut TallyData, &mut Counts) -> R) -> R {
        let mut d = self.data.lock().expect("tally lock");
        let mut c = d.by_op.remove(op).unwrap_or_default();
        c.requests += 1;
        let r = f(&mut d, &mut c);
        d.by_op.insert(op.to_string(), c);
        r
    }

    /// A completed response and what the oracle says of it; `true` if right.
    pub fn verdict(&self, op: &str, v: Verdict, bytes: u64) -> bool {
        self.op(op, |d, c| match v {
            Verdict::Right | Verdict::StaleDuringOutage => {
                c.right += 1;
                if v == Verdict::StaleDuringOutage {
                    c.stale_during_outage += 1;
                }
                self.done.fetch_add(1, Relaxed);
                self.bytes.fetch_add(bytes, Relaxed);
                true
            }
            Verdict::Wrong(why) => {
                c.wrong += 1;
                if d.wrong_examples.len() < 20 {
                    d.wrong_examples.push(format!("{op}: {why}"));
                }
                eprintln!("WRONG {op}: {why}");
                false
            }
        })
    }

    fn when(&self, d: &mut TallyData, kind: &str) {
        let t = self.start.get().map_or(0.0, |s| s.elapsed().as_secs_f64());
        let v = d.error_times.entry(kind.to_string()).or_default();
        if v.len() < 5000 {
            v.push((t * 10.0).round() / 10.0);
        }
    }

    /// A response whose body broke off.
    pub fn cut(&self, op: &str, why: String) {
        self.op(op, |d, c| {
            c.cut += 1;
            self.when(d, "cut");
            if d.cut_examples.len() < 10 {
                d.cut_examples.push(format!("{op}: {why}"));
            }
        })
    }

    /// A request that got no usable answer: `kind` is what the counts group by.
    pub fn error(&self, op: &str, kind: &str, why: String) {
        self.op(op, |d, c| {
            c.errors += 1;
            self.when(d, kind);
            *d.errors_by_kind.entry(kind.to_string()).or_default() += 1;
            d.error_examples
                .entry(kind.to_string())
                .or_insert_with(|| format!("{op}: {why}"));
        })
    }

    /// A request that ended as planned without a verdict (a client hanging up).
    pub fn hung_up(&self, op: &str) {
        self.op(op, |_, c| c.right += 1)
    }

    pub fn snapshot(&self) -> TallyData {
        self.data.lock().expect("tally lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_verdict_is_counted_wrong() {
        let t = Tally::default();
        assert!(t.verdict("get", Verdict::Right, 10));
        assert!(!t.verdict("get", Verdict::Wrong("planted".into()), 10));
        t.cut("get", "broke off".into());
        t.error("head", "status 502", "x".into());
        let s = t.snapshot().total();
        assert_eq!(
            (s.requests, s.right, s.wrong, s.cut, s.errors),
            (4, 1, 1, 1, 1)
        );
    }
}
