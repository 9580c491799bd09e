//! The truth a soak checks every completed response against: the bytes of
//! every blob and manifest it seeded or pushed, and each tag's history with
//! times, so that a manifest by tag is right only if the tag pointed at it
//! within the TTL window (or, during an upstream outage, ever: regproxy then
//! serves the tag it resolved last, by design).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::synth;

/// What a completed response is, against the truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Right,
    /// Right only because the upstream was unreachable when it was asked:
    /// a tag served stale during an outage, as documented.
    StaleDuringOutage,
    Wrong(String),
}

/// A blob's content: synthetic (regenerated from its seed) or literal.
#[derive(Debug, Clone)]
enum Content {
    Synth { seed: u64, size: u64 },
    Literal(Bytes),
}

impl Content {
    fn size(&self) -> u64 {
        match self {
            Content::Synth { size, .. } => *size,
            Content::Literal(b) => b.len() as u64,
        }
    }

    fn slice(&self, start: u64, end: u64) -> Vec<u8> {
        match self {
            Content::Literal(b) => b[start as usize..end as usize].to_vec(),
            Content::Synth { seed, size } => {
                let mut out = Vec::with_capacity((end - start) as usize);
                let mut pos = 0u64;
                for c in synth::chunks(*seed, *size) {
                    let (cs, ce) = (pos, pos + c.len() as u64);
                    pos = ce;
                    if ce <= start {
                        continue;
                    }
                    if cs >= end {
                        break;
                    }
                    let a = start.max(cs) - cs;
                    let b = end.min(ce) - cs;
                    out.extend_from_slice(&c[a as usize..b as usize]);
                }
                out
            }
        }
    }
}

/// One value of a tag: current from `from` until `until` (open while current).
#[derive(Debug, Clone)]
struct TagValue {
    digest: String,
    from: Instant,
    until: Option<Instant>,
}

/// The truth of a soak run.
pub struct Oracle {
    blobs: Mutex<HashMap<String, Content>>,
    tags: Mutex<HashMap<(String, String), Vec<TagValue>>>,
    /// Times the upstream was unreachable from regproxy (killed, cut).
    outages: Mutex<Vec<(Instant, Option<Instant>)>>,
    locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    ttl: Duration,
    /// Added to both ends of every window: clocks of separate processes, a
    /// revalidation's own round trip, a retry after a broken connection.
    slack: Duration,
}

/// `sha256:<hex>` of some bytes.
pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl Oracle {
    pub fn new(ttl: Duration, slack: Duration) -> Oracle {
        Oracle {
            blobs: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            outages: Mutex::new(Vec::new()),
            locks: Mutex::new(HashMap::new()),
            ttl,
            slack,
        }
    }

    pub fn add_synth(&self, digest: &str, seed: u64, size: u64) {
        self.blobs
            .lock()
            .expect("oracle lock")
            .insert(digest.to_string(), Content::Synth { seed, size });
    }

    pub fn add_literal(&self, bytes: Bytes) -> String {
        let d = sha(&bytes);
        self.blobs
            .lock()
            .expect("oracle lock")
            .insert(d.clone(), Content::Literal(bytes));
        d
    }

    /// Adds an image's manifest, config and layers.
    pub fn add_image(&self, img: &synth::ImageSpec) {
        self.add_literal(img.manifest.bytes.clone());
        self.add_literal(img.config.bytes.clone());
        for l in &img.layers {
            self.add_synth(&l.digest, l.seed, l.size);
        }
    }

    fn content(&self, digest: &str) -> Option<Content> {
        self.blobs.lock().expect("oracle lock").get(digest).cloned()
    }

    /// The bytes of a literal blob (a manifest, a config).
    pub fn literal(&self, digest: &str) -> Option<Bytes> {
        match self.content(digest)? {
            Content::Literal(b) => Some(b),
            Content::Synth { .. } => None,
        }
    }

    /// Held while a tag moves, so that the history is in the upstream's order.
    pub fn tag_lock(&self, name: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("oracle lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn size(&self, digest: &str) -> Option<u64> {
        self.content(digest).map(|c| c.size())
    }

    /// The tag moves to `digest`: asked at `asked`, confirmed at `done`. The
    /// old value counts as current until `done`, the new one from `asked`.
    pub fn set_tag(&self, name: &str, tag: &str, digest: &str, asked: Instant, done: Instant) {
        let mut tags = self.tags.lock().expect("oracle lock");
        let h = tags.entry((name.to_string(), tag.to_string())).or_default();
        if let Some(last) = h.last_mut() {
            if last.until.is_none() {
                last.until = Some(done);
            }
        }
        h.push(TagValue {
            digest: digest.to_string(),
            from: asked,
            until: None,
        });
    }

    /// The current value of a tag.
    pub fn tag(&self, name: &str, tag: &str) -> Option<String> {
        let tags = self.tags.lock().expect("oracle lock");
        let h = tags.get(&(name.to_string(), tag.to_string()))?;
        h.last().map(|v| v.digest.clone())
    }

    /// The upstream becomes unreachable; returns the index to end it with.
    pub fn outage_begins(&self) -> usize {
        let mut o = self.outages.lock().expect("oracle lock");
        o.push((Instant::now(), None));
        o.len() - 1
    }

    pub fn outage_ends(&self, i: usize) {
        let mut o = self.outages.lock().expect("oracle lock");
        if let Some(e) = o.get_mut(i) {
            e.1 = Some(Instant::now());
        }
    }

    fn outage_within(&self, start: Instant, end: Instant) -> bool {
        let o = self.outages.lock().expect("oracle lock");
        o.iter()
            .any(|(b, e)| *b <= end + self.slack && e.is_none_or(|e| e + self.slack >= start))
    }

    /// A whole blob body: `len` bytes that hash to `got`.
    pub fn blob(&self, digest: &str, len: u64, got: &str) -> Verdict {
        let Some(c) = self.content(digest) else {
            return Verdict::Wrong(format!("{digest}: a blob the soak never made was served"));
        };
        if len != c.size() {
            return Verdict::Wrong(format!(
                "{digest}: a complete body of {len} bytes, the blob has {}",
                c.size()
            ));
        }
        if got != digest {
            return Verdict::Wrong(format!("{digest}: a complete body that hashes to {got}"));
        }
        Verdict::Right
    }

    /// A `206` body: `bytes` should be the blob's bytes from `start` on.
    pub fn range(&self, digest: &str, start: u64, bytes: &[u8]) -> Verdict {
        let Some(c) = self.content(digest) else {
            return Verdict::Wrong(format!("{digest}: a blob the soak never made was served"));
        };
        let end = start + bytes.len() as u64;
        if end > c.size() {
            return Verdict::Wrong(format!(
                "{digest}: a range {start}..{end} past the blob's {} bytes",
                c.size()
            ));
        }
        let truth = c.slice(start, end);
        if truth != bytes {
            let at = truth.iter().zip(bytes).position(|(a, b)| a != b);
            return Verdict::Wrong(format!(
                "{digest}: range {start}..{end} differs from the blob at byte {:?}",
                at.map(|i| start + i as u64)
            ));
        }
        Verdict::Right
    }

    /// A `HEAD` of a blob or manifest: its length, and the digest it names.
    pub fn head(&self, digest: &str, len: Option<u64>, named: Option<&str>) -> Verdict {
        let Some(size) = self.size(digest) else {
            return Verdict::Wrong(format!("{digest}: HEAD answered for a blob never made"));
        };
        if let Some(len) = len.filter(|l| *l != size) {
            return Verdict::Wrong(format!("HEAD {digest}: length {len}, the blob has {size}"));
        }
        if let Some(n) = named.filter(|n| *n != digest) {
            return Verdict::Wrong(format!("HEAD {digest}: Docker-Content-Digest {n}"));
        }
        Verdict::Right
    }

    /// A manifest asked for by tag, answered with `digest` (of the body, or
    /// a `HEAD`'s `Docker-Content-Digest`), asked at `start`, answered by `end`.
    pub fn tagged(
        &self,
        name: &str,
        tag: &str,
        digest: &str,
        start: Instant,
        end: Instant,
    ) -> Verdict {
        let tags = self.tags.lock().expect("oracle lock");
        let Some(h) = tags.get(&(name.to_string(), tag.to_string())) else {
            return Verdict::Wrong(format!("{name}:{tag} answered though never set"));
        };
        let earliest = start.checked_sub(self.ttl + self.slack).unwrap_or(start);
        let mut ever = false;
        for v in h.iter().filter(|v| v.digest == digest) {
            ever = true;
            if v.from <= end + self.slack && v.until.is_none_or(|u| u >= earliest) {
                return Verdict::Right;
            }
        }
        drop(tags);
        if ever && self.outage_within(start, end) {
            return Verdict::StaleDuringOutage;
        }
        Verdict::Wrong(format!(
            "{name}:{tag} answered {digest}, {} (TTL {:?})",
            if ever {
                "which it last pointed at before the TTL window, with no outage"
            } else {
                "which it never pointed at"
            },
            self.ttl
        ))
    }

    /// A manifest body by digest, or by tag with the digest it hashes to.
    pub fn manifest_body(&self, digest: &str, body: &[u8]) -> Verdict {
        let got = sha(body);
        if got != digest {
            return Verdict::Wrong(format!("manifest {digest}: the body hashes to {got}"));
        }
        match self.content(digest) {
            Some(_) => Verdict::Right,
            None => Verdict::Wrong(format!("manifest {digest}: never made")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oracle() -> (Oracle, synth::BlobSpec) {
        let o = Oracle::new(Duration::from_secs(5), Duration::from_millis(500));
        let b = synth::blob(3, 3 * synth::CHUNK as u64 + 17, synth::LAYER_TYPE);
        o.add_synth(&b.digest, b.seed, b.size);
        (o, b)
    }

    fn whole(b: &synth::BlobSpec) -> Vec<u8> {
        synth::chunks(b.seed, b.size).flatten().collect()
    }

    #[test]
    fn a_planted_wrong_blob_body_is_wrong() {
        let (o, b) = oracle();
        let mut body = whole(&b);
        assert_eq!(
            o.blob(&b.digest, body.len() as u64, &sha(&body)),
            Verdict::Right
        );
        body[1000] ^= 1;
        assert!(matches!(
            o.blob(&b.digest, body.len() as u64, &sha(&body)),
            Verdict::Wrong(_)
        ));
        body.truncate(100);
        assert!(
            matches!(o.blob(&b.digest, 100, &sha(&body)), Verdict::Wrong(_)),
            "a clean short body is wrong"
        );
    }

    #[test]
    fn ranges_are_checked_byte_for_byte() {
        let (o, b) = oracle();
        let all = whole(&b);
        let (s, e) = (synth::CHUNK as u64 - 5, 2 * synth::CHUNK as u64 + 9);
        let mut part = all[s as usize..e as usize].to_vec();
        assert_eq!(o.range(&b.digest, s, &part), Verdict::Right);
        assert_eq!(
            o.range(&b.digest, b.size - 1, &all[all.len() - 1..]),
            Verdict::Right
        );
        part[7] ^= 0x80;
        assert!(matches!(o.range(&b.digest, s, &part), Verdict::Wrong(_)));
        assert!(matches!(
            o.range(&b.digest, b.size - 1, &all[..2]),
            Verdict::Wrong(_)
        ));
    }

    #[test]
    fn heads_and_manifests() {
        let (o, b) = oracle();
        assert_eq!(o.head(&b.digest, Some(b.size), None), Verdict::Right);
        assert!(matches!(
            o.head(&b.digest, Some(b.size - 1), None),
            Verdict::Wrong(_)
        ));
        let m = Bytes::from_static(b"{\"schemaVersion\":2}");
        let d = o.add_literal(m.clone());
        assert_eq!(o.manifest_body(&d, &m), Verdict::Right);
        assert!(matches!(o.manifest_body(&d, b"{}"), Verdict::Wrong(_)));
    }

    #[test]
    fn a_tag_is_right_within_the_ttl_window_only() {
        let o = Oracle::new(Duration::from_secs(5), Duration::from_millis(500));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        o.set_tag("a", "latest", "sha256:old", t0, t0);
        o.set_tag("a", "latest", "sha256:new", at(100), at(101));
        assert_eq!(
            o.tagged("a", "latest", "sha256:old", at(50), at(50)),
            Verdict::Right
        );
        // Within the TTL after the move, the old value is still right.
        assert_eq!(
            o.tagged("a", "latest", "sha256:old", at(105), at(105)),
            Verdict::Right
        );
        assert_eq!(
            o.tagged("a", "latest", "sha256:new", at(100), at(100)),
            Verdict::Right
        );
        // Past it, wrong, unless the upstream was out then.
        assert!(matches!(
            o.tagged("a", "latest", "sha256:old", at(120), at(120)),
            Verdict::Wrong(_)
        ));
        assert!(matches!(
            o.tagged("a", "latest", "sha256:never", at(50), at(50)),
            Verdict::Wrong(_)
        ));
        // The upstream out at the time: the last value it resolved is served.
        o.outages.lock().unwrap().push((at(119), Some(at(121))));
        assert_eq!(
            o.tagged("a", "latest", "sha256:old", at(120), at(120)),
            Verdict::StaleDuringOutage
        );
        assert!(matches!(
            o.tagged("a", "latest", "sha256:old", at(130), at(130)),
            Verdict::Wrong(_)
        ));
        assert!(matches!(
            o.tagged("a", "latest", "sha256:never", at(120), at(120)),
            Verdict::Wrong(_)
        ));
    }
}
