//! The index rebuilt from what is in the cache dir: at start-up, once a
//! successor holds the dir alone, and one entry at a time for content a
//! sibling process committed. The content files and which of them are
//! manifests, oldest first. Sidecars without their content are removed by
//! the primary only (a sibling writes a media type just before its
//! content); anything else that is not cache content is left alone.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use lru::LruCache;

use super::{Entry, State, OPEN_FILES};
use crate::digest::Digest;

/// The cache's state as the disk holds it: every content file indexed,
/// recency from mtime, nothing reserved and no fill in flight.
pub(super) fn state(root: &Path, primary: bool) -> io::Result<State> {
    let mut state = State {
        index: LruCache::unbounded(),
        committed: 0,
        reserved: 0,
        fills: HashMap::new(),
        next_generation: 0,
        open: LruCache::new(std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero")),
    };
    for (_, d, mut e) in content(root, primary)? {
        e.generation = state.next_generation;
        state.next_generation += 1;
        state.committed += e.size;
        state.index.put(d, e);
    }
    Ok(state)
}

/// Every content file under `root/sha256`, least recently used first
/// (recency from mtime), as index entries of generation 0.
fn content(root: &Path, primary: bool) -> io::Result<Vec<(SystemTime, Digest, Entry)>> {
    let mut found: Vec<(SystemTime, Digest, Entry)> = Vec::new();
    for fan in fs::read_dir(root.join("sha256"))? {
        let fan = fan?;
        if !fan.file_type()?.is_dir() {
            continue;
        }
        let mut types = Vec::new();
        // Where each content file of this fan-out dir stands in `found`.
        let mut here: HashMap<String, usize> = HashMap::new();
        for f in fs::read_dir(fan.path())? {
            let f = f?;
            let name = f.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".type") {
                types.push(hex.to_owned());
                continue;
            }
            // Removed since the listing (another process evicted it): skip.
            let meta = match f.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            match Digest::parse(&format!("sha256:{name}")) {
                Ok(d)
                    if meta.is_file()
                        && name.starts_with(fan.file_name().to_string_lossy().as_ref()) =>
                {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    here.insert(d.hex().to_owned(), found.len());
                    found.push((
                        mtime,
                        d,
                        Entry {
                            size: meta.len(),
                            manifest: false,
                            generation: 0,
                            used: mtime,
                        },
                    ));
                }
                _ => {
                    tracing::warn!(path = %f.path().display(), "ignoring a file that is not cache content")
                }
            }
        }
        for hex in types {
            if let Some(&i) = here.get(&hex) {
                found[i].2.manifest = true;
            } else if primary {
                let _ = fs::remove_file(fan.path().join(format!("{hex}.type")));
            }
        }
    }
    found.sort_by_key(|(t, _, _)| *t);
    Ok(found)
}

/// The index of what is on disk now, for a process that has just become the
/// cache dir's only user: every process's commits counted, so the cap holds
/// again. Recency comes from mtimes (every process sets a file's when it
/// maps it), except that what this process keeps mapped (its most recent
/// hits, which set no mtime) is the most recent, in its order of use.
/// Known entries keep their generation; fills and reservations stay.
/// Entries this process committed since generation `since` (during the
/// scan, which runs unlocked) are kept even if the scan missed them. One
/// that it evicted during the scan may come back without its file: a
/// reader finds it gone and drops it; till then it only makes eviction
/// keep less.
pub(super) fn rebuild(st: &mut State, found: Vec<(SystemTime, Digest, Entry)>, since: u64) {
    let mut index = LruCache::unbounded();
    let mut committed = 0;
    for (_, d, mut e) in found {
        e.generation = match st.index.peek(&d) {
            // A `.type` renamed in just before the listing may be missed.
            Some(known) => {
                e.manifest |= known.manifest;
                e.used = e.used.max(known.used);
                known.generation
            }
            None => {
                st.next_generation += 1;
                st.next_generation - 1
            }
        };
        committed += e.size;
        index.put(d, e);
    }
    for (d, e) in st.index.iter().rev() {
        if e.generation >= since && !index.contains(d) {
            committed += e.size;
            index.put(d.clone(), *e);
        }
    }
    for (d, _) in st.open.iter().rev() {
        index.promote(d);
    }
    let gone: Vec<Digest> = st
        .open
        .iter()
        .filter(|(d, _)| !index.contains(*d))
        .map(|(d, _)| d.clone())
        .collect();
    for d in gone {
        st.open.pop(&d);
    }
    st.index = index;
    st.committed = committed;
}

/// Every content file, for [`rebuild`]. Sidecars without content stay: one
/// may be this process's manifest commit in flight (its media type is
/// renamed into place just before its content).
pub(super) fn all(root: &Path) -> io::Result<Vec<(SystemTime, Digest, Entry)>> {
    content(root, false)
}

/// The entry for `d` if its content is on disk (committed by a sibling
/// process, or by this one before its index was built).
pub(super) fn on_disk(content: &Path) -> Option<Entry> {
    let meta = fs::metadata(content).ok()?;
    if !meta.is_file() {
        return None;
    }
    Some(Entry {
        size: meta.len(),
        manifest: super::type_path(content).is_file(),
        generation: 0,
        used: meta.modified().unwrap_or_else(|_| SystemTime::now()),
    })
}
