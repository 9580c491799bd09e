//! Tag → digest, remembered for `--tag-ttl` and kept in `<cache-dir>/state.json`
//! (written atomically), so that a tag resolved once keeps resolving while
//! the upstream is down, across restarts too. Revalidation is single-flight
//! per tag: concurrent requests for a stale tag wait for the one in flight.
//!
//! Freshness is decided on [`tokio::time::Instant`], so that tests can
//! advance the clock past `--tag-ttl`; the file keeps wall-clock times.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Most tags remembered; the least recently checked go first.
const MAX_TAGS: usize = 50_000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: String,
    pub media_type: String,
    /// When the upstream last confirmed it, in ms since the Unix epoch.
    pub checked_ms: u64,
}

/// The file. It once also held `upstream_open`, now in `open.json` (see
/// [`crate::auth`], which reads it from here once).
#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    #[serde(default)]
    tags: Vec<(String, String, TagEntry)>,
}

type Key = (String, String);

pub struct Tags {
    path: PathBuf,
    ttl: Duration,
    state: Mutex<State>,
    /// Serializes writes of the state file; the snapshot is taken under it,
    /// so the last write carries the newest state. Holds whether the last
    /// write failed.
    write: Mutex<bool>,
}

struct State {
    map: HashMap<Key, Remembered>,
    flights: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

/// A tag's entry, and when the upstream confirmed it on the clock that
/// decides freshness.
struct Remembered {
    entry: TagEntry,
    /// `None`: too long ago for the clock to tell, so stale.
    checked: Option<Instant>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a loaded entry is one [`Tags::put`] could have written: a valid
/// repository name, tag and digest.
fn storable((name, tag, entry): &(String, String, TagEntry)) -> bool {
    use crate::digest::{validate_name, Digest, Reference};
    validate_name(name).is_ok()
        && matches!(Reference::parse(tag), Ok(Reference::Tag(_)))
        && Digest::parse(&entry.digest).is_ok()
}

impl Tags {
    /// Loads the state file in `dir`; a missing or unreadable one starts empty.
    pub fn open(dir: &std::path::Path, ttl: Duration) -> Tags {
        let path = dir.join("state.json");
        let p: Persisted = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
                Persisted::default()
            }),
            Err(_) => Persisted::default(),
        };
        let (now, now_ms) = (Instant::now(), now_ms());
        // Only what the proxy could have stored: a damaged entry (say, a cut
        // digest) would otherwise answer a valid pull DIGEST_INVALID.
        let read = p.tags.len();
        let tags: Vec<_> = p.tags.into_iter().filter(storable).collect();
        if tags.len() < read {
            tracing::warn!(path = %path.display(), ignored = read - tags.len(), "ignoring malformed entries of the state file");
        }
        let map = tags
            .into_iter()
            .map(|(n, t, entry)| {
                let age = Duration::from_millis(now_ms.saturating_sub(entry.checked_ms));
                let checked = now.checked_sub(age);
                ((n, t), Remembered { entry, checked })
            })
            .collect();
        Tags {
            path,
            ttl,
            state: Mutex::new(State {
                map,
                flights: HashMap::new(),
            }),
            write: Mutex::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for a tag, and whether it is within the TTL.
    pub fn get(&self, name: &str, tag: &str) -> Option<(TagEntry, bool)> {
        let st = self.lock();
        let r = st.map.get(&(name.to_owned(), tag.to_owned()))?;
        let fresh = r.checked.is_some_and(|t| t.elapsed() < self.ttl);
        Some((r.entry.clone(), fresh))
    }

    /// Every remembered tag: its repository, the tag and its entry.
    pub fn all(&self) -> Vec<(String, String, TagEntry)> {
        let st = self.lock();
        st.map
            .iter()
            .map(|((n, t), r)| (n.clone(), t.clone(), r.entry.clone()))
            .collect()
    }

    /// Records what the upstream just said about a tag.
    pub async fn put(
        self: &Arc<Self>,
        name: &str,
        tag: &str,
        digest: String,
        media_type: String,
    ) -> TagEntry {
        let (changed, entry) = {
            let mut st = self.lock();
            let key = (name.to_owned(), tag.to_owned());
            let e = TagEntry {
                digest,
                media_type,
                checked_ms: now_ms(),
            };
            let changed = st
                .map
                .get(&key)
                .is_none_or(|o| o.entry.digest != e.digest || o.entry.media_type != e.media_type);
            let r = Remembered {
                entry: e.clone(),
                checked: Some(Instant::now()),
            };
            st.map.insert(key, r);
            if st.map.len() > MAX_TAGS {
                if let Some(k) = st
                    .map
                    .iter()
                    .min_by_key(|(_, r)| r.entry.checked_ms)
                    .map(|(k, _)| k.clone())
                {
                    st.map.remove(&k);
                }
            }
            (changed, e)
        };
        // A mere re-check is not worth a write: after a restart the entry
        // is only older, which makes it revalidate sooner.
        if changed {
            self.save().await;
        }
        entry
    }

    pub async fn remove(self: &Arc<Self>, name: &str, tag: &str) {
        let had = self
            .lock()
            .map
            .remove(&(name.to_owned(), tag.to_owned()))
            .is_some();
        if had {
            self.save().await;
        }
    }

    /// Forgets every tag of `name` that points at `digest` (the upstream
    /// deleted that manifest).
    pub async fn remove_digest(self: &Arc<Self>, name: &str, digest: &str) {
        let removed = {
            let mut st = self.lock();
            let before = st.map.len();
            st.map
                .retain(|(n, _), r| !(n == name && r.entry.digest == digest));
            st.map.len() != before
        };
        if removed {
            self.save().await;
        }
    }

    /// Waits for the revalidation of this tag in flight, if any, and holds
    /// the right to revalidate it until the guard drops.
    pub async fn flight(&self, name: &str, tag: &str) -> Flight<'_> {
        let key = (name.to_owned(), tag.to_owned());
        let m = Arc::clone(self.lock().flights.entry(key.clone()).or_default());
        let guard = Arc::clone(&m).lock_owned().await;
        Flight {
            tags: self,
            key,
            _guard: guard,
        }
    }

    /// Writes the state file. One that fails (a full disk) leaves the last
    /// one whole, and is logged once until a write succeeds again.
    async fn save(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            let mut failing = this.write.lock().unwrap_or_else(|e| e.into_inner());
            let p = {
                let st = this.lock();
                Persisted {
                    tags: st
                        .map
                        .iter()
                        .map(|((n, t), r)| (n.clone(), t.clone(), r.entry.clone()))
                        .collect(),
                }
            };
            let res = crate::instance::temp_for(&this.path).and_then(|tmp| {
                let written = std::fs::File::create(&tmp).and_then(|mut f| {
                    f.write_all(&serde_json::to_vec(&p)?)?;
                    f.sync_data()?;
                    std::fs::rename(&tmp, &this.path)
                });
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                written
            });
            let path = this.path.display();
            match res {
                Err(e) => {
                    if !std::mem::replace(&mut *failing, true) {
                        tracing::warn!(%path, error = %e, "could not save the tag state; the last saved one stays");
                    }
                }
                Ok(()) => {
                    if std::mem::replace(&mut *failing, false) {
                        tracing::info!(%path, "the tag state is saved again");
                    }
                }
            }
        })
        .await;
    }
}

/// The right to revalidate one tag; dropping it lets the next request in.
pub struct Flight<'a> {
    tags: &'a Tags,
    key: Key,
    /// Dropped after [`Flight::drop`] ran.
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut st = self.tags.lock();
        // Forget the flight's mutex once nobody else waits on it: its only
        // holders are the map and this flight's guard. A request that comes
        // after takes the state lock, so it finds a new mutex, free.
        if st
            .flights
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 2)
        {
            st.flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[tokio::test]
    async fn tags_persist_and_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        let t = Arc::new(Tags::open(&d, Duration::from_secs(60)));
        t.put("team/app", "v1", D.into(), "application/x".into())
            .await;
        let (e, fresh) = t.get("team/app", "v1").unwrap();
        assert!(fresh);
        assert_eq!(e.digest, D);
        drop(t);
        let t = Tags::open(&d, Duration::from_secs(60));
        let (e, fresh) = t.get("team/app", "v1").expect("the tag survives a restart");
        assert_eq!(e.digest, D);
        assert!(fresh, "a restart keeps a tag's age, not more");
        let t = Tags::open(&d, Duration::ZERO);
        assert!(
            !t.get("team/app", "v1").unwrap().1,
            "with a TTL of 0 every tag is revalidated"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[tokio::test]
    async fn malformed_entries_of_the_state_file_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let entry = |digest: &str| serde_json::json!({"digest": digest, "media_type": "application/x", "checked_ms": 1});
        let state = serde_json::json!({"tags": [
            ["team/app", "v1", entry(D)],
            ["team/app", "cut", entry("sha256:e3b0")],
            ["../etc", "v1", entry(D)],
            ["team/app", "a/b", entry(D)],
        ]});
        std::fs::write(tmp.path().join("state.json"), state.to_string()).unwrap();
        let t = Tags::open(tmp.path(), Duration::from_secs(60));
        assert!(t.get("team/app", "v1").is_some(), "a good entry loads");
        for (name, tag) in [("team/app", "cut"), ("../etc", "v1"), ("team/app", "a/b")] {
            assert!(
                t.get(name, tag).is_none(),
                "{name}:{tag} is no entry the proxy could have stored and should be ignored"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tag_is_fresh_until_its_ttl_and_revalidated_from_then() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        let ttl = Duration::from_secs(30);
        let t = Arc::new(Tags::open(&d, ttl));
        t.put("a", "v1", "sha256:aa".into(), "application/x".into())
            .await;
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert!(
            t.get("a", "v1").unwrap().1,
            "a tag is used without asking just before --tag-ttl"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            !t.get("a", "v1").unwrap().1,
            "a tag is revalidated once --tag-ttl has passed"
        );
        t.put("a", "v1", "sha256:aa".into(), "application/x".into())
            .await;
        assert!(
            t.get("a", "v1").unwrap().1,
            "a re-check makes it fresh again"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn one_flight_per_tag() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        let t = Arc::new(Tags::open(&d, Duration::from_secs(1)));
        let f = t.flight("a", "v1").await;
        let t2 = Arc::clone(&t);
        let waiter = tokio::spawn(async move {
            let _f = t2.flight("a", "v1").await;
        });
        let _other = t.flight("a", "v2").await; // another tag is not held up
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "a second flight for the same tag waits"
        );
        drop(f);
        waiter.await.unwrap();
        assert!(
            !t.lock().flights.contains_key(&("a".into(), "v1".into())),
            "finished flights are forgotten"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
