//! Pinned digests: content eviction never takes (see [`crate::pins`], which
//! owns what is pinned and tells the cache with [`Cache::set_pinned`]).
//!
//! Pinned bytes count against the cap like any others, so eviction looks
//! from the least recently used end for the first entry that is not pinned;
//! when only pinned entries are left, nothing more is evicted and a fill
//! that does not fit is streamed uncached (`NoRoom::Cap`), as for a blob
//! larger than the cap: a client still gets its bytes. When the pins alone
//! are more than the cap, the log says so once per change, and
//! `regproxy_pins_over_cap` is 1; the pins are kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use lru::LruCache;

use super::{type_path, Cache, Entry, State};
use crate::digest::Digest;

/// The pinned set, and whether the pins are over the cap.
#[derive(Default)]
pub(super) struct Pinned {
    set: Mutex<HashSet<Digest>>,
    /// The last over-cap state reported: logged only when it changes.
    over: Mutex<bool>,
}

impl Pinned {
    /// The set in `<root>/pins.json`, for the eviction at start-up.
    pub fn load(root: &Path) -> Pinned {
        Pinned {
            set: Mutex::new(crate::pins::pinned_set_in(root)),
            over: Mutex::new(false),
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<Digest>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `need` more bytes fit under `cap` once every entry that is
    /// not pinned is evicted: if not, evicting any is a loss for nothing.
    pub fn could_fit(&self, st: &State, need: u64, cap: u64) -> bool {
        let set = self.set();
        if set.is_empty() {
            return true;
        }
        let pinned: u64 = set
            .iter()
            .filter_map(|d| st.index.peek(d))
            .map(|e| e.size)
            .sum();
        pinned + st.reserved + need <= cap
    }

    /// The least recently used entry of `index` that is not pinned.
    pub fn lru_unpinned(&self, index: &LruCache<Digest, Entry>) -> Option<Digest> {
        let set = self.set();
        if set.is_empty() {
            return index.peek_lru().map(|(d, _)| d.clone());
        }
        index
            .iter()
            .rev()
            .find(|(d, _)| !set.contains(*d))
            .map(|(d, _)| d.clone())
    }
}

impl Cache {
    /// Evicts the least recently used entry that is not pinned, adding its
    /// files to `out`; false when there is none.
    pub(super) fn evict_one(&self, st: &mut State, out: &mut Vec<PathBuf>) -> bool {
        let Some((d, e)) = self
            .pinned
            .lru_unpinned(&st.index)
            .and_then(|d| st.index.pop_entry(&d))
        else {
            return false;
        };
        st.committed -= e.size;
        st.open.pop(&d);
        self.metrics.evictions.fetch_add(1, Relaxed);
        self.metrics.evicted_bytes.fetch_add(e.size, Relaxed);
        tracing::debug!(digest = %d, size = e.size, "evicted");
        let p = self.path(&d);
        if e.manifest {
            out.push(type_path(&p));
        }
        out.push(p);
        true
    }

    /// Replaces the pinned set: from now on eviction skips these digests.
    pub fn set_pinned(&self, set: HashSet<Digest>) {
        *self.pinned.set() = set;
    }

    /// Whether `d` is pinned (never evicted, and not to be removed).
    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.pinned.set().contains(d)
    }

    /// The size of committed content `d`, without making it more recent.
    pub fn committed_size(&self, d: &Digest) -> Option<u64> {
        self.lock().index.peek(d).map(|e| e.size)
    }

    /// Bytes of pinned content held in the cache now.
    pub fn pinned_bytes(&self) -> u64 {
        // The state lock first, as eviction takes them.
        let st = self.lock();
        let set = self.pinned.set();
        set.iter()
            .filter_map(|d| st.index.peek(d))
            .map(|e| e.size)
            .sum()
    }

    /// Takes in the pins' bytes, `needed` (held or to be fetched): over the
    /// cap, the log says so once and `regproxy_pins_over_cap` is 1, until
    /// they fit again.
    pub fn pins_need(&self, needed: u64) {
        let over = needed > self.cap;
        let mut was = self.pinned.over.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut *was, over) == over {
            return;
        }
        self.metrics.pins_over_cap.store(u64::from(over), Relaxed);
        if over {
            tracing::warn!(
                pinned = needed,
                cap = self.cap,
                "pinned images alone are more than --cache-size: they are kept, nothing else \
                 is cached, and pinned content that does not fit is served without being kept"
            );
        } else {
            tracing::info!(
                pinned = needed,
                cap = self.cap,
                "pinned images fit in --cache-size again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn eviction_skips_pinned_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let m = Arc::new(Metrics::default());
        let c = Arc::new(Cache::open(&dir, 12, m.clone(), true).unwrap());
        let d = |b: &[u8]| Digest::of(b);
        for b in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            c.put_manifest(d(b), "t".into(), Bytes::copy_from_slice(b))
                .await;
        }
        c.set_pinned([d(b"aaaa"), d(b"bbbb")].into_iter().collect());
        assert!(c.is_pinned(&d(b"aaaa")));
        c.put_manifest(d(b"dddd"), "t".into(), Bytes::from_static(b"dddd"))
            .await;
        assert!(
            c.get(&d(b"aaaa"), true).await.is_some(),
            "the least recently used entry is pinned and stays"
        );
        assert!(
            c.get(&d(b"cccc"), true).await.is_none(),
            "the least recently used entry that is not pinned goes"
        );
        assert_eq!(c.pinned_bytes(), 8);
        c.put_manifest(d(b"eeeeeeee"), "t".into(), Bytes::from_static(b"eeeeeeee"))
            .await;
        assert!(
            c.get(&d(b"eeeeeeee"), true).await.is_none(),
            "what does not fit beside the pins is not kept"
        );
        assert!(c.get(&d(b"bbbb"), true).await.is_some());

        c.pins_need(13);
        c.pins_need(14);
        assert_eq!(m.pins_over_cap.load(Relaxed), 1);
        c.pins_need(8);
        assert_eq!(m.pins_over_cap.load(Relaxed), 0);
        drop(c);

        // The set is read from pins.json before the eviction at start-up.
        let pins = serde_json::json!({"pins": [{
            "ref": "team/app:v1", "platform": "linux/amd64", "source": "api",
            "digests": [d(b"aaaa").to_string()], "complete": true,
        }]});
        std::fs::write(dir.join("pins.json"), pins.to_string()).unwrap();
        let c = Arc::new(Cache::open(&dir, 4, m, true).unwrap());
        assert!(
            c.get(&d(b"aaaa"), true).await.is_some(),
            "a pinned entry survives a restart with a smaller cap"
        );
        assert!(c.get(&d(b"bbbb"), true).await.is_none());
    }
}
