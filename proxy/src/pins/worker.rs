//! The background work of [`Pins`]: the prefetch file's watcher, and one
//! worker that runs the prefetches due, one at a time (at prefetch
//! priority: the engine's requests are marked as a prefetch), revalidates
//! each pinned tag a period after its last prefetch, and retries what
//! failed with a backoff.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{backoff, file, Job, Key, Pins, POLL};
use crate::digest::Digest;

/// What a prefetch of an image got.
#[derive(Clone, Debug)]
pub struct Got {
    /// The manifest (or index) the ref resolved to.
    pub top: Digest,
    /// Every manifest, the config and the layers.
    pub digests: Vec<Digest>,
    /// Their sizes, summed.
    pub bytes: u64,
}

/// Fetches an image into the cache: the prefetch engine, or a test's.
pub trait Engine: Send + Sync + 'static {
    fn run<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, Result<Got, String>>;
}

impl Pins {
    /// Starts the watcher of the prefetch file (if any) and the worker; both
    /// end when `stop` is cancelled.
    pub fn start(self: &Arc<Self>, engine: Arc<dyn Engine>, stop: CancellationToken) {
        if let Some(path) = self.prefetch_file.clone() {
            tokio::spawn(watch(Arc::clone(self), path, stop.clone()));
        }
        tokio::spawn(work(Arc::clone(self), engine, stop));
    }

    /// Fetches `key` again after its `failures`-th failure in a row (an
    /// incomplete pin counts as one), if it is still wanted.
    pub(super) fn retry(&self, key: &Key, failures: u32) {
        if !self.wanted(key) {
            return;
        }
        // Over the cap, more of it will not fit before something changes:
        // not worth the uplink more often than the revalidation.
        let wait = if self.over_cap() {
            self.every
        } else {
            backoff(failures.saturating_sub(1))
        };
        self.lock()
            .jobs
            .insert(key.clone(), Job::after(wait, failures));
        self.wake.notify_one();
    }

    /// Schedules what follows a prefetch of `key` that ended with its
    /// pins `incomplete` or not, after `failures` failures before it: the
    /// rest of an incomplete one soon, a pinned tag's revalidation in a
    /// period (counted from now, so that the tag is past `--tag-ttl` then).
    pub(super) fn after_fetch(&self, key: &Key, incomplete: bool, failures: u32) {
        if incomplete {
            return self.retry(key, failures + 1);
        }
        let mut st = self.lock();
        if key.is_tag() && st.pins.iter().any(|p| super::is(p, key)) {
            st.jobs.insert(key.clone(), Job::after(self.every, 0));
            self.wake.notify_one();
        }
    }

    /// Schedules a prefetch of every pin with content missing from the
    /// cache (removed by `cache verify`, say) that has none scheduled.
    fn heal(&self) {
        let missing: Vec<Key> = self
            .list()
            .iter()
            .filter(|p| !p.digests.is_empty() && !self.offline_ready(p))
            .filter_map(|p| Key::new(&p.reference, Some(&p.platform)).ok())
            .collect();
        let mut st = self.lock();
        for k in missing {
            if let std::collections::hash_map::Entry::Vacant(e) = st.jobs.entry(k) {
                tracing::info!(key = %e.key(), "pinned content is missing from the cache; fetching it again");
                e.insert(Job::after(POLL, 1));
            }
        }
    }

    /// Takes the job due first, if it is due by `now`.
    fn take_due(&self, now: Instant) -> Option<(Key, Job)> {
        let mut st = self.lock();
        let key = st
            .jobs
            .iter()
            .filter(|(_, j)| j.due <= now)
            .min_by_key(|(_, j)| j.due)
            .map(|(k, _)| k.clone())?;
        let job = st.jobs.remove(&key)?;
        Some((key, job))
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.lock().jobs.values().map(|j| j.due).min()
    }
}

/// Reads the prefetch file every [`POLL`]; a content that changed is
/// parsed and taken in. A file that cannot be read keeps the last entries.
async fn watch(pins: Arc<Pins>, path: std::path::PathBuf, stop: CancellationToken) {
    let (mut last, mut failing) = (None::<Vec<u8>>, false);
    let shown = path.display().to_string();
    loop {
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                if std::mem::replace(&mut failing, false) {
                    tracing::info!(path = %shown, "the prefetch file can be read again");
                }
                if last.as_ref() != Some(&bytes) {
                    let (entries, errors) = file::parse(&String::from_utf8_lossy(&bytes));
                    for e in &errors {
                        tracing::warn!(path = %shown, "prefetch file: {e}; the line is skipped");
                    }
                    let pinned = entries.iter().filter(|e| e.pin).count();
                    tracing::info!(path = %shown, images = entries.len(), pinned, skipped = errors.len(), "read the prefetch file");
                    pins.file_read(entries).await;
                    last = Some(bytes);
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(path = %shown, error = %e, "cannot read the prefetch file; its last entries stay");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Runs the prefetches due, one at a time, and the revalidation.
async fn work(pins: Arc<Pins>, engine: Arc<dyn Engine>, stop: CancellationToken) {
    loop {
        let now = Instant::now();
        if let Some((key, job)) = pins.take_due(now) {
            if !pins.wanted(&key) {
                continue;
            }
            let got = tokio::select! {
                got = engine.run(&key) => got,
                _ = stop.cancelled() => return,
            };
            match got {
                Ok(got) => {
                    tracing::info!(%key, top = %got.top, bytes = got.bytes, "prefetched");
                    let incomplete = pins.fetched(&key, None, &got).await;
                    pins.after_fetch(&key, incomplete, job.failures);
                }
                Err(e) => {
                    let failures = job.failures + 1;
                    tracing::warn!(%key, error = %e, failures, "prefetch failed; it is tried again later");
                    pins.retry(&key, failures);
                }
            }
            continue;
        }
        // Committed fills change what the pins hold: the over-cap state
        // follows within a poll. Over the cap, incomplete pins wait for
        // their (slower) retries.
        if !pins.over_cap() {
            pins.heal();
        }
        let next = pins
            .next_due()
            .map_or(now + POLL, |due| due.min(now + POLL));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = pins.wake.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}
