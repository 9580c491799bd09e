//! `<cache-dir>/pins.json`: the pins, written whole to a temp file, synced,
//! renamed over the last one (and the directory synced), so that a crash
//! leaves the old file or the new one, never a part. `Cache::open` reads
//! the pinned digests from it before its start-up eviction.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Where a pin came from: the prefetch file (`--prefetch-file`, removed
/// with its line) or the admin API (`regproxy pin`, removed by `unpin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Api => "api",
        }
    }
}

/// One pin: a ref and platform, from one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// `NAME:TAG` or `NAME@DIGEST`, the registry host dropped.
    #[serde(rename = "ref")]
    pub reference: String,
    /// `os/arch[/variant]`.
    pub platform: String,
    pub source: Source,
    /// The manifest (or index) the ref resolved to last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top: Option<String>,
    /// Every manifest, config and layer of the image it resolved to last;
    /// empty until a prefetch of it ended.
    #[serde(default)]
    pub digests: Vec<String>,
    /// While `digests` is not complete: the last set that was, kept pinned
    /// so that an outage during a rollout still finds the old image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<String>,
    /// What the prefetch counted of `digests`' sizes.
    #[serde(default)]
    pub bytes: u64,
    /// Whether every one of `digests` was in the cache when its prefetch
    /// ended.
    #[serde(default)]
    pub complete: bool,
}

impl Pin {
    /// Every digest this pin keeps from eviction.
    pub fn pinned(&self) -> impl Iterator<Item = Digest> + '_ {
        self.digests
            .iter()
            .chain(&self.previous)
            .filter_map(|d| Digest::parse(d).ok())
    }
}

#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    #[serde(default)]
    pins: Vec<Pin>,
}

/// The file in `dir`.
pub fn path_in(dir: &Path) -> std::path::PathBuf {
    dir.join("pins.json")
}

/// The pins in `path`; none when there is no file. One that cannot be read
/// is logged and taken as none (it is written whole or not at all, so that
/// takes a damaged disk).
pub fn load(path: &Path) -> Vec<Pin> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the pins; starting with none");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<Persisted>(&bytes) {
        Ok(p) => p.pins,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable pins file");
            Vec::new()
        }
    }
}

/// The digests `pins` keep from eviction.
pub fn pinned_set(pins: &[Pin]) -> HashSet<Digest> {
    pins.iter().flat_map(Pin::pinned).collect()
}

/// Writes `pins` to `path` atomically.
pub fn save(path: &Path, pins: &[Pin]) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(&Persisted {
        pins: pins.to_vec(),
    })?;
    let tmp = crate::instance::temp_for(path)?;
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a power cut once the directory is synced.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn pins_round_trip_and_only_digests_are_pinned() {
        let tmp = tempfile::tempdir().unwrap();
        let path = path_in(tmp.path());
        assert!(load(&path).is_empty(), "no file is no pins");
        let pin = Pin {
            reference: "team/app:v1".into(),
            platform: "linux/amd64".into(),
            source: Source::File,
            top: Some(D.into()),
            digests: vec![D.into(), "sha256:cut".into()],
            previous: vec![],
            bytes: 3,
            complete: false,
        };
        save(&path, std::slice::from_ref(&pin)).unwrap();
        let loaded = load(&path);
        assert_eq!(loaded, vec![pin]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"source\": \"file\""), "{text}");
        assert_eq!(
            pinned_set(&loaded),
            [Digest::parse(D).unwrap()].into_iter().collect(),
            "a malformed digest pins nothing"
        );
        std::fs::write(&path, b"{\"pins\": [").unwrap();
        assert!(load(&path).is_empty(), "a damaged file is no pins");
    }
}
