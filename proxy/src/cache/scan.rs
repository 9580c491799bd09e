//! The index rebuilt from what is in the cache dir at start-up: the content
//! files and which of them are manifests, oldest first. Sidecars without
//! their content are removed; anything else that is not cache content is
//! left alone.

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
pub(super) fn state(root: &Path) -> io::Result<State> {
    let mut state = State {
        index: LruCache::unbounded(),
        committed: 0,
        reserved: 0,
        fills: HashMap::new(),
        next_generation: 0,
        open: LruCache::new(std::num::NonZeroUsize::new(OPEN_FILES).expect("non-zero")),
    };
    for (_, d, mut e) in content(root)? {
        e.generation = state.next_generation;
        state.next_generation += 1;
        state.committed += e.size;
        state.index.put(d, e);
    }
    Ok(state)
}

/// Every content file under `root/sha256`, least recently used first
/// (recency from mtime), as index entries of generation 0.
fn content(root: &Path) -> io::Result<Vec<(SystemTime, Digest, Entry)>> {
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
            let meta = f.metadata()?;
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
            } else {
                let _ = fs::remove_file(fan.path().join(format!("{hex}.type")));
            }
        }
    }
    found.sort_by_key(|(t, _, _)| *t);
    Ok(found)
}
