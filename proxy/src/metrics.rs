//! Counters and gauges, rendered in the Prometheus text format on the admin port.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// What a request was about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
    Tag,
    /// Uploads, manifest pushes and deletes relayed to upstream.
    Push,
    Other,
}

/// How it was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the node cache.
    Hit,
    /// Started a fill from upstream.
    Miss,
    /// Joined a fill another request had started.
    Coalesced,
    /// Relayed to upstream without caching.
    Passthrough,
    /// Answered with an error.
    Error,
}

const KINDS: [(Kind, &str); 5] = [
    (Kind::Blob, "blob"),
    (Kind::Manifest, "manifest"),
    (Kind::Tag, "tag"),
    (Kind::Push, "push"),
    (Kind::Other, "other"),
];
const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Hit, "hit"),
    (Outcome::Miss, "miss"),
    (Outcome::Coalesced, "coalesced"),
    (Outcome::Passthrough, "passthrough"),
    (Outcome::Error, "error"),
];

#[derive(Default)]
pub struct Metrics {
    requests: [[AtomicU64; 5]; 5],
    /// Body bytes sent to clients out of the node cache (including followers of a fill).
    pub served_cache_bytes: Arc<AtomicU64>,
    /// Bytes of cache files sent by `sendfile(2)` (see
    /// [`crate::sendfile`]), to clients and to peers.
    pub sendfile_bytes: Arc<AtomicU64>,
    /// Body bytes relayed from upstream without going through the cache.
    pub served_upstream_bytes: AtomicU64,
    /// Body bytes received from upstream.
    pub upstream_bytes: AtomicU64,
    pub upstream_requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub upstream_resumes: AtomicU64,
    pub digest_mismatches: AtomicU64,
    pub fills_started: AtomicU64,
    pub fills_inflight: AtomicU64,
    pub cache_bytes: AtomicU64,
    pub cache_entries: AtomicU64,
    pub cache_capacity: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Cached files `cache verify` found corrupt (and removed).
    pub cache_verify_bad: AtomicU64,
    pub commits: AtomicU64,
    pub uncached_fills: AtomicU64,
    /// Of those, the fills not kept because the cache disk had no room.
    pub uncached_no_room: AtomicU64,
    /// 1 while the cache disk is full (see `cache::disk`).
    pub cache_disk_full: AtomicU64,
    /// 1 while the pins alone are more than the cap (see `cache::pinned`).
    pub pins_over_cap: AtomicU64,
    pub tag_revalidations: AtomicU64,
    pub tags_stale_served: AtomicU64,
    pub auth_checks: AtomicU64,
    pub auth_denied: AtomicU64,
    /// Connections answered 503 and closed because their listener was at
    /// `--max-connections`.
    pub connections_refused: AtomicU64,
    /// The node path's checks and repairs (`--registry-name`).
    pub node_path: NodePath,
    /// Fills from other nodes (`--peers`).
    pub peers: PeerMetrics,
}

/// Why a miss that a peer owned went to the upstream after all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// No connection, or the peer is known to be down.
    Unreachable,
    /// The peer answered something other than the blob.
    Error,
    /// No answer within `--peer-timeout`.
    Timeout,
    /// The peer's bytes did not match the digest.
    BadBytes,
    /// The peer's body broke off or stalled mid-blob: the rest came from
    /// the upstream.
    Broken,
}

const FALLBACKS: [(Fallback, &str); 5] = [
    (Fallback::Unreachable, "unreachable"),
    (Fallback::Error, "error"),
    (Fallback::Timeout, "timeout"),
    (Fallback::BadBytes, "bad_bytes"),
    (Fallback::Broken, "broken"),
];

/// How the peer listener answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAnswer {
    /// From the node cache.
    Hit,
    /// From a fill (started or joined).
    Miss,
    /// 404: not here, and not to be fetched for a peer.
    NotFound,
    /// No secret, or a wrong one.
    Unauthorized,
}

const PEER_ANSWERS: [(PeerAnswer, &str); 4] = [
    (PeerAnswer::Hit, "hit"),
    (PeerAnswer::Miss, "miss"),
    (PeerAnswer::NotFound, "not_found"),
    (PeerAnswer::Unauthorized, "unauthorized"),
];

/// The `regproxy_peer*` series.
#[derive(Default)]
pub struct PeerMetrics {
    /// Other nodes known (the list, or the name's addresses).
    pub known: AtomicU64,
    /// Of those, the ones that answer and are not banned.
    pub live: AtomicU64,
    /// Leader misses this node owns.
    pub owner_self: AtomicU64,
    /// Leader misses a peer owns.
    pub owner_peer: AtomicU64,
    /// Body bytes received from peers.
    pub bytes_received: AtomicU64,
    /// Body bytes sent on the peer listener.
    pub bytes_served: Arc<AtomicU64>,
    /// Peers banned for bytes that did not verify.
    pub bad: AtomicU64,
    answers: [AtomicU64; 4],
    fallbacks: [AtomicU64; 5],
}

impl PeerMetrics {
    pub fn answered(&self, a: PeerAnswer) {
        self.answers[a as usize].fetch_add(1, Relaxed);
    }

    pub fn fell_back(&self, f: Fallback) {
        self.fallbacks[f as usize].fetch_add(1, Relaxed);
    }

    pub fn fallbacks(&self, f: Fallback) -> u64 {
        self.fallbacks[f as usize].load(Relaxed)
    }

    fn render(&self, s: &mut String) {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        one(
            "regproxy_peers_known",
            "gauge",
            "Other nodes known as peers (--peers list, or the addresses of its name).",
            g(&self.known),
        );
        one(
            "regproxy_peers_live",
            "gauge",
            "Peers that answered their last probe and are not banned.",
            g(&self.live),
        );
        one(
            "regproxy_peer_bytes_received_total",
            "counter",
            "Body bytes received from peers.",
            g(&self.bytes_received),
        );
        one(
            "regproxy_peer_bytes_served_total",
            "counter",
            "Body bytes sent to peers on the peer listener.",
            g(&self.bytes_served),
        );
        one(
            "regproxy_peer_bad_total",
            "counter",
            "Peers banned for a while because their bytes did not match the digest.",
            g(&self.bad),
        );
        s.push_str("# HELP regproxy_peer_owner_total Blob misses by the node that owns the digest: this one, or a peer that is asked first.\n");
        s.push_str("# TYPE regproxy_peer_owner_total counter\n");
        for (owner, n) in [("self", &self.owner_self), ("peer", &self.owner_peer)] {
            let _ = writeln!(s, "regproxy_peer_owner_total{{owner=\"{owner}\"}} {}", g(n));
        }
        s.push_str("# HELP regproxy_peer_requests_total Requests on the peer listener, by how they were answered.\n");
        s.push_str("# TYPE regproxy_peer_requests_total counter\n");
        for (a, name) in PEER_ANSWERS {
            let n = g(&self.answers[a as usize]);
            let _ = writeln!(s, "regproxy_peer_requests_total{{outcome=\"{name}\"}} {n}");
        }
        s.push_str("# HELP regproxy_peer_fallbacks_total Misses a peer owned that went to the upstream after all, by why.\n");
        s.push_str("# TYPE regproxy_peer_fallbacks_total counter\n");
        for (f, name) in FALLBACKS {
            let _ = writeln!(
                s,
                "regproxy_peer_fallbacks_total{{reason=\"{name}\"}} {}",
                self.fallbacks(f)
            );
        }
    }
}

/// `regproxy_node_path_ok{check}` (only the checks that ran) and
/// `regproxy_node_path_repairs_total{file}`.
#[derive(Default)]
pub struct NodePath {
    ok: std::sync::Mutex<std::collections::BTreeMap<&'static str, bool>>,
    /// The hosts-file line put back.
    pub repairs_etc_hosts: AtomicU64,
    /// hosts.toml written again.
    pub repairs_hosts_toml: AtomicU64,
}

impl NodePath {
    pub fn set_ok(&self, check: &'static str, ok: bool) {
        self.ok.lock().expect("never poisoned").insert(check, ok);
    }

    fn render(&self, s: &mut String) {
        s.push_str("# HELP regproxy_node_path_repairs_total Node files put back in place by the reconcile: the hosts-file line, hosts.toml.\n");
        s.push_str("# TYPE regproxy_node_path_repairs_total counter\n");
        for (file, n) in [
            ("etc_hosts", &self.repairs_etc_hosts),
            ("hosts_toml", &self.repairs_hosts_toml),
        ] {
            let _ = writeln!(
                s,
                "regproxy_node_path_repairs_total{{file=\"{file}\"}} {}",
                n.load(Relaxed)
            );
        }
        let ok = self.ok.lock().expect("never poisoned");
        if ok.is_empty() {
            return;
        }
        s.push_str("# HELP regproxy_node_path_ok Whether a node-path check passed in its last run (1) or failed (0).\n");
        s.push_str("# TYPE regproxy_node_path_ok gauge\n");
        for (check, ok) in ok.iter() {
            let _ = writeln!(
                s,
                "regproxy_node_path_ok{{check=\"{check}\"}} {}",
                u8::from(*ok)
            );
        }
    }
}

impl Metrics {
    pub fn request(&self, kind: Kind, outcome: Outcome) {
        self.requests[kind as usize][outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, kind: Kind, outcome: Outcome) -> u64 {
        self.requests[kind as usize][outcome as usize].load(Relaxed)
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        s.push_str("# HELP regproxy_requests_total Registry API requests by kind and how they were answered.\n");
        s.push_str("# TYPE regproxy_requests_total counter\n");
        for (k, kn) in KINDS {
            for (o, on) in OUTCOMES {
                let _ = writeln!(
                    s,
                    "regproxy_requests_total{{kind=\"{kn}\",result=\"{on}\"}} {}",
                    self.requests(k, o)
                );
            }
        }
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        let g = |a: &AtomicU64| a.load(Relaxed);
        one(
            "regproxy_served_cache_bytes_total",
            "counter",
            "Body bytes sent to clients from the node cache.",
            g(&self.served_cache_bytes),
        );
        one(
            "regproxy_sendfile_bytes_total",
            "counter",
            "Bytes of cache files sent to clients and peers by sendfile(2), without a copy.",
            g(&self.sendfile_bytes),
        );
        one(
            "regproxy_served_upstream_bytes_total",
            "counter",
            "Body bytes relayed to clients straight from upstream, not through the cache.",
            g(&self.served_upstream_bytes),
        );
        one(
            "regproxy_upstream_bytes_total",
            "counter",
            "Body bytes received from the upstream registry.",
            g(&self.upstream_bytes),
        );
        one(
            "regproxy_upstream_requests_total",
            "counter",
            "Requests sent to the upstream registry.",
            g(&self.upstream_requests),
        );
        one(
            "regproxy_upstream_errors_total",
            "counter",
            "Upstream requests that failed: unreachable, timed out, 5xx or cut off.",
            g(&self.upstream_errors),
        );
        one(
            "regproxy_upstream_resumes_total",
            "counter",
            "Blob downloads resumed with a Range request after the upstream connection broke.",
            g(&self.upstream_resumes),
        );
        one(
            "regproxy_digest_mismatches_total",
            "counter",
            "Upstream content that did not match its digest or size, and was thrown away.",
            g(&self.digest_mismatches),
        );
        one(
            "regproxy_fills_total",
            "counter",
            "Blob fills started from upstream.",
            g(&self.fills_started),
        );
        one(
            "regproxy_fills_inflight",
            "gauge",
            "Blob fills running now.",
            g(&self.fills_inflight),
        );
        one("regproxy_uncached_fills_total", "counter", "Fills streamed without being kept: larger than the cache, no room next to other fills, or no room on the disk.", g(&self.uncached_fills));
        one(
            "regproxy_uncached_fills_no_room_total",
            "counter",
            "Fills streamed without being kept because the cache disk had no room for them.",
            g(&self.uncached_no_room),
        );
        one(
            "regproxy_cache_disk_full",
            "gauge",
            "1 while the cache disk is full: a fill found no room, even after eviction; 0 once a later one finds room.",
            g(&self.cache_disk_full),
        );
        one(
            "regproxy_pins_over_cap",
            "gauge",
            "1 while pinned images alone are more than --cache-size: they are kept, and what does not fit is served uncached.",
            g(&self.pins_over_cap),
        );
        one(
            "regproxy_cache_commits_total",
            "counter",
            "Verified blobs and manifests committed to the cache.",
            g(&self.commits),
        );
        one(
            "regproxy_cache_bytes",
            "gauge",
            "Bytes held in the cache, including room reserved for fills in flight.",
            g(&self.cache_bytes),
        );
        one(
            "regproxy_cache_entries",
            "gauge",
            "Blobs and manifests held in the cache.",
            g(&self.cache_entries),
        );
        one(
            "regproxy_cache_capacity_bytes",
            "gauge",
            "The cache size cap.",
            g(&self.cache_capacity),
        );
        one(
            "regproxy_cache_evictions_total",
            "counter",
            "Least recently used entries evicted to stay under the cap.",
            g(&self.evictions),
        );
        one(
            "regproxy_cache_evicted_bytes_total",
            "counter",
            "Bytes evicted to stay under the cap.",
            g(&self.evicted_bytes),
        );
        one(
            "regproxy_cache_verify_bad_total",
            "counter",
            "Cached files that `regproxy cache verify` found no longer matching their digest, and removed.",
            g(&self.cache_verify_bad),
        );
        one(
            "regproxy_tag_revalidations_total",
            "counter",
            "Tags whose digest was checked with the upstream after their TTL.",
            g(&self.tag_revalidations),
        );
        one(
            "regproxy_tags_stale_served_total",
            "counter",
            "Tag requests answered from the node because the upstream was unreachable or failing.",
            g(&self.tags_stale_served),
        );
        one(
            "regproxy_auth_checks_total",
            "counter",
            "Upstream checks that a client may read cached content.",
            g(&self.auth_checks),
        );
        one(
            "regproxy_auth_denied_total",
            "counter",
            "Requests for cached content refused because the upstream refused the client.",
            g(&self.auth_denied),
        );
        one(
            "regproxy_connections_refused_total",
            "counter",
            "Connections refused (503, closed) because their listener was at --max-connections.",
            g(&self.connections_refused),
        );
        self.node_path.render(&mut s);
        self.peers.render(&mut s);
        s
    }
}

/// `s` as a label value in the text format: backslash, double quote and
/// line feed escaped.
pub fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("team/app:v1"), "team/app:v1");
        assert_eq!(label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn render_lists_every_series() {
        let m = Metrics::default();
        m.request(Kind::Blob, Outcome::Coalesced);
        let text = m.render();
        assert!(
            text.contains("regproxy_requests_total{kind=\"blob\",result=\"coalesced\"} 1"),
            "{text}"
        );
        assert!(text.contains("regproxy_digest_mismatches_total 0"));
        assert!(
            !text.contains("regproxy_node_path_ok"),
            "no check ran: {text}"
        );
        m.node_path.set_ok("reaches_us", false);
        let text = m.render();
        assert!(
            text.contains("regproxy_node_path_ok{check=\"reaches_us\"} 0"),
            "{text}"
        );
        assert!(text.contains("regproxy_node_path_repairs_total{file=\"etc_hosts\"} 0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').expect("name value");
            v.parse::<u64>().expect("every sample is a number");
        }
    }
}
