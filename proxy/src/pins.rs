//! Pinned images: a ref (and platform) resolved by a prefetch to its
//! digests (every manifest, the config and the layers), which the cache
//! then never evicts, so that a workload can restart offline.
//!
//! - `store`: `<cache-dir>/pins.json`, written atomically; `Cache::open`
//!   reads the pinned digests from it before its start-up eviction.
//! - `file`: the prefetch file (`--prefetch-file`), `REF [PLATFORM] [pin]`.
//! - `worker`: re-reads the file every [`POLL`] by content (a ConfigMap
//!   update swaps a symlink, so mtimes say nothing) and prefetches new
//!   entries in the background; re-runs the prefetch of a pinned tag
//!   `--tag-ttl` (at least [`MIN_REVALIDATE`]) after its last one, when the
//!   tag is due for revalidation; retries what failed with a backoff.
//! - `admin`: `GET /admin/pins`, `POST /admin/unpin` and the metrics
//!   `regproxy_offline_ready{ref,platform}` and `regproxy_pinned_bytes`.
//! - `engine`: the prefetch engine ([`crate::prefetch`]) behind
//!   [`worker::Engine`], and [`pin_fetched`] for the admin API's prefetch.
//!
//! A pin's digests are pinned as soon as a prefetch of it ended; the pin is
//! complete once all of them are in the cache. When a tag moves, the new
//! digests are pinned at once (so that nothing evicts them while they are
//! fetched) and the old ones stay pinned until the new set is complete:
//! a rollout and an outage can overlap.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::Cache;
use crate::digest::Digest;

mod admin;
mod engine;
pub mod file;
pub mod store;
mod worker;

pub use admin::{admin_pins, admin_unpin};
pub use engine::{pin_fetched, start};
pub use file::Key;
pub use store::{Pin, Source};
pub use worker::{Engine, Got};

/// How often the prefetch file is read.
pub const POLL: Duration = Duration::from_secs(5);
/// The shortest period of the revalidation of pinned tags.
pub const MIN_REVALIDATE: Duration = Duration::from_secs(30);
/// The longest wait before a failed prefetch is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The pinned digests recorded in `dir`'s `pins.json`.
pub fn pinned_set_in(dir: &Path) -> HashSet<Digest> {
    store::pinned_set(&store::load(&store::path_in(dir)))
}

/// The pins, the prefetch file's entries, and the prefetches to run.
pub struct Pins {
    path: PathBuf,
    cache: Arc<Cache>,
    state: Mutex<State>,
    /// Serializes writes of `pins.json`; the snapshot is taken under it, so
    /// the last write carries the newest state.
    write: Mutex<()>,
    /// Told when a job is added.
    wake: tokio::sync::Notify,
    /// `--prefetch-file`.
    prefetch_file: Option<PathBuf>,
    /// How long after its last prefetch a pinned tag is revalidated.
    every: Duration,
}

struct State {
    pins: Vec<Pin>,
    /// The prefetch file's entries as last read.
    file: Vec<file::Entry>,
    /// Prefetches to run: when, and how many in a row failed.
    jobs: HashMap<Key, Job>,
}

#[derive(Clone, Copy, Debug)]
struct Job {
    due: Instant,
    failures: u32,
}

impl Pins {
    /// Loads the pins of cache dir `dir`; incomplete ones are to be fetched.
    /// `tag_ttl`: how often pinned tags are revalidated (at least
    /// [`MIN_REVALIDATE`]).
    pub fn open(
        dir: &Path,
        cache: Arc<Cache>,
        prefetch_file: Option<PathBuf>,
        tag_ttl: Duration,
    ) -> Pins {
        let path = store::path_in(dir);
        let pins = store::load(&path);
        cache.set_pinned(store::pinned_set(&pins));
        let every = tag_ttl.max(MIN_REVALIDATE);
        // Incomplete pins are fetched at once, pinned tags revalidated in a
        // period.
        let mut jobs = HashMap::new();
        for p in &pins {
            let Ok(k) = Key::new(&p.reference, Some(&p.platform)) else {
                continue;
            };
            let wait = if p.complete { every } else { Duration::ZERO };
            if !p.complete || k.is_tag() {
                let job = jobs.entry(k).or_insert(Job::after(wait, 0));
                job.due = job.due.min(Instant::now() + wait);
            }
        }
        Pins {
            path,
            cache,
            state: Mutex::new(State {
                pins,
                file: Vec::new(),
                jobs,
            }),
            write: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            prefetch_file,
            every,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pins now.
    pub fn list(&self) -> Vec<Pin> {
        self.lock().pins.clone()
    }

    /// Whether every digest of `pin` is in the cache now.
    pub fn offline_ready(&self, pin: &Pin) -> bool {
        !pin.digests.is_empty()
            && pin
                .digests
                .iter()
                .all(|d| Digest::parse(d).is_ok_and(|d| self.cache.committed_size(&d).is_some()))
    }

    /// Takes in a prefetch of `key` that ended with `got`: every pin of the
    /// key gets its digests, and one from `source` is made if there is none.
    /// Returns whether a pin of the key is incomplete (to be fetched again).
    pub async fn fetched(self: &Arc<Self>, key: &Key, source: Option<Source>, got: &Got) -> bool {
        let (incomplete, changed) = {
            let mut st = self.lock();
            let before = st.pins.clone();
            if let Some(source) = source {
                let has = st.pins.iter().any(|p| p.source == source && is(p, key));
                if !has {
                    st.pins.push(new_pin(key, source));
                    tracing::info!(%key, source = source.as_str(), "pinned");
                }
            }
            let mut incomplete = false;
            for p in st.pins.iter_mut().filter(|p| is(p, key)) {
                self.apply(p, got);
                incomplete |= !p.complete;
            }
            let changed = st.pins != before;
            if changed {
                self.cache.set_pinned(store::pinned_set(&st.pins));
            }
            (incomplete, changed)
        };
        if changed {
            self.save().await;
        }
        incomplete
    }

    /// Sets `p`'s digests to what a prefetch got.
    fn apply(&self, p: &mut Pin, got: &Got) {
        let new: Vec<String> = got.digests.iter().map(Digest::to_string).collect();
        if p.digests != new {
            if p.complete {
                // Kept pinned until the new set is complete.
                p.previous = std::mem::take(&mut p.digests);
            }
            if !p.digests.is_empty() || !p.previous.is_empty() {
                tracing::info!(reference = %p.reference, top = %got.top, "a pinned ref resolves to a new image; pinning it");
            }
            p.digests = new;
        }
        p.top = Some(got.top.to_string());
        p.bytes = got.bytes;
        p.complete = self.offline_ready(p);
        if p.complete && !p.previous.is_empty() {
            tracing::info!(reference = %p.reference, top = %got.top, "the new image is complete; the old one is unpinned");
            p.previous.clear();
        }
    }

    /// Removes the admin API's pins of `reference` (every platform);
    /// returns whether there was one, and whether the prefetch file pins it.
    pub async fn unpin(self: &Arc<Self>, reference: &str) -> (bool, bool) {
        let (removed, in_file) = {
            let mut st = self.lock();
            let before = st.pins.len();
            st.pins
                .retain(|p| !(p.source == Source::Api && p.reference == reference));
            let removed = st.pins.len() != before;
            let in_file = st.pins.iter().any(|p| p.reference == reference);
            if removed {
                tracing::info!(reference, "unpinned");
                self.cache.set_pinned(store::pinned_set(&st.pins));
            }
            (removed, in_file)
        };
        if removed {
            self.save().await;
        }
        (removed, in_file)
    }

    /// Takes in the prefetch file's entries: new ones are fetched, pins of
    /// lines gone (or no longer `pin`) are removed, new `pin` lines made pins.
    async fn file_read(self: &Arc<Self>, entries: Vec<file::Entry>) {
        let changed = {
            let mut st = self.lock();
            let now = Instant::now();
            for e in &entries {
                let known = st.file.iter().any(|o| o == e);
                if !known {
                    st.jobs.insert(
                        e.key.clone(),
                        Job {
                            due: now,
                            failures: 0,
                        },
                    );
                }
            }
            let before = st.pins.clone();
            st.pins.retain(|p| {
                p.source != Source::File
                    || entries.iter().any(|e| {
                        e.pin && e.key.reference == p.reference && e.key.platform == p.platform
                    })
            });
            for p in before.iter().filter(|p| !st.pins.contains(p)) {
                tracing::info!(reference = %p.reference, platform = %p.platform, "unpinned: no longer pinned in the prefetch file");
            }
            for e in entries.iter().filter(|e| e.pin) {
                if !st
                    .pins
                    .iter()
                    .any(|p| p.source == Source::File && is(p, &e.key))
                {
                    // Pins of the same image from the API lend it their digests.
                    let mut p = st
                        .pins
                        .iter()
                        .find(|p| is(p, &e.key))
                        .cloned()
                        .unwrap_or_else(|| new_pin(&e.key, Source::File));
                    p.source = Source::File;
                    tracing::info!(key = %e.key, "pinned by the prefetch file");
                    st.pins.push(p);
                }
            }
            st.file = entries;
            self.wake.notify_one();
            let changed = st.pins != before;
            if changed {
                self.cache.set_pinned(store::pinned_set(&st.pins));
            }
            changed
        };
        if changed {
            self.save().await;
        }
    }

    /// Whether a prefetch of `key` is still wanted: a pin or a line of the
    /// prefetch file names it.
    fn wanted(&self, key: &Key) -> bool {
        let st = self.lock();
        st.file.iter().any(|e| e.key == *key) || st.pins.iter().any(|p| is(p, key))
    }

    /// The pins' bytes: what the cache holds of them, and what their
    /// prefetches counted of what it does not.
    fn needed(&self) -> u64 {
        let pins = self.list();
        let held = self.cache.pinned_bytes();
        let mut seen = HashSet::new();
        let missing: u64 = pins
            .iter()
            .filter(|p| seen.insert(p.digests.clone()))
            .map(|p| {
                let have: u64 = p
                    .digests
                    .iter()
                    .filter_map(|d| Digest::parse(d).ok())
                    .filter_map(|d| self.cache.committed_size(&d))
                    .sum();
                p.bytes.saturating_sub(have)
            })
            .sum();
        held + missing
    }

    /// Tells the cache what the pins need; returns whether that is more
    /// than the cap.
    fn over_cap(&self) -> bool {
        let needed = self.needed();
        self.cache.pins_need(needed);
        needed > self.cache.capacity()
    }

    /// Writes `pins.json`. A write that fails is logged; the last one
    /// written stays whole.
    async fn save(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let res = tokio::task::spawn_blocking(move || {
            let _w = this.write.lock().unwrap_or_else(|e| e.into_inner());
            store::save(&this.path, &this.list())
        })
        .await;
        if let Ok(Err(e)) = res {
            tracing::warn!(path = %self.path.display(), error = %e, "could not save the pins; the last saved file stays");
        }
    }
}

impl Job {
    fn after(wait: Duration, failures: u32) -> Job {
        Job {
            due: Instant::now() + wait,
            failures,
        }
    }
}

/// How long to wait after `failures` prefetches of an image failed in a row.
fn backoff(failures: u32) -> Duration {
    POLL.saturating_mul(1 << failures.min(16)).min(MAX_BACKOFF)
}

fn is(p: &Pin, key: &Key) -> bool {
    p.reference == key.reference && p.platform == key.platform
}

fn new_pin(key: &Key, source: Source) -> Pin {
    Pin {
        reference: key.reference.clone(),
        platform: key.platform.clone(),
        source,
        top: None,
        digests: Vec::new(),
        previous: Vec::new(),
        bytes: 0,
        complete: false,
    }
}

#[cfg(test)]
mod tests;
