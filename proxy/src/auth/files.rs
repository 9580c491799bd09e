//! The files authorization keeps in the cache dir: the HMAC key
//! (`auth.key`), and whether the upstream is open (`open.json`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub(super) fn random_key() -> std::io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(k)
}

/// The key in `path`, or a new random one written there 0600.
pub(super) fn load_or_create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    if let Ok(b) = std::fs::read(path) {
        if let Ok(k) = <[u8; 32]>::try_from(b.as_slice()) {
            return Ok(k);
        }
        tracing::warn!(path = %path.display(), "replacing a malformed auth key");
    }
    let k = random_key()?;
    let tmp = crate::instance::temp_for(path)?;
    let mut f = create_private(&tmp)?;
    f.write_all(&k)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    Ok(k)
}

/// A new file only its owner may read: a leftover of the same name (a crash
/// between create and rename) is removed first, never reused with its mode.
pub(super) fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

pub(super) fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn parse_key(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

/// Where whether the upstream is open is kept.
const OPEN_FILE: &str = "open.json";

/// The content of `open.json`.
#[derive(Serialize, Deserialize)]
struct OpenFile {
    /// Whether the upstream was last seen letting anonymous clients in.
    #[serde(default)]
    upstream_open: bool,
}

/// What the cache dir says of whether the upstream is open (`false` when
/// nothing does).
///
/// Before `open.json`, the answer was kept in the tag map's `state.json`
/// under the same key: when `open.json` is missing it is read from there,
/// once, and written to `open.json` at once, so that an upgrade keeps it
/// (the tag map no longer writes that key).
pub(super) fn load_open(dir: &Path) -> bool {
    let read = |name: &str| -> Option<bool> {
        let b = std::fs::read(dir.join(name)).ok()?;
        serde_json::from_slice::<OpenFile>(&b)
            .ok()
            .map(|f| f.upstream_open)
    };
    if let Some(open) = read(OPEN_FILE) {
        return open;
    }
    let legacy = read("state.json").unwrap_or(false);
    if legacy {
        if let Err(e) = save_open(dir, true) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not save whether the upstream is open");
        }
    }
    legacy
}

/// Writes whether the upstream is open to `open.json` in `dir`, atomically.
/// Blocking.
pub(super) fn save_open(dir: &Path, open: bool) -> std::io::Result<()> {
    let path = dir.join(OPEN_FILE);
    let tmp = crate::instance::temp_for(&path)?;
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&serde_json::to_vec(&OpenFile {
            upstream_open: open,
        })?)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)
    });
    if let Err(e) = written {
        // A full disk: the last file stays, and no temp file is left.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself on stable storage: after a power loss, a "closed"
    // just learned must not come back as the "open" before it.
    std::fs::File::open(dir)?.sync_all()
}
