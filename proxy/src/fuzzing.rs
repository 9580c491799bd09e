//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` wrap them, and
//! `tests/fuzz_corpus.rs` replays the checked-in inputs through them on
//! stable): they live in the crate because they check invariants on its
//! internal parsers, not just that nothing panics. Each target covers a
//! family; its first byte picks the parser, the rest is the input.
//!
//! A broken invariant panics, which the fuzzer reports as a crash.
//! Files go to a directory of this process under the system temp dir
//! ([`workdir`]), never anywhere else.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

use crate::digest::{validate_name, Digest, Reference};
use crate::error::Error;

/// A target's body: one input, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: [(&str, Target); 7] = [
    ("names", names),
    ("headers", headers),
    ("units", units),
    ("node_files", node_files),
    ("state", state),
    ("request", request),
    ("conn", conn),
];

/// This process's scratch directory (`$TMPDIR/regproxy-fuzz-<pid>`), made
/// on first use; whoever runs the targets removes it.
pub fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("regproxy-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("the fuzz scratch dir can be made");
        d
    })
}

/// The selector byte and the text after it.
fn split(data: &[u8]) -> Option<(u8, String)> {
    let (&sel, rest) = data.split_first()?;
    Some((sel, String::from_utf8_lossy(rest).into_owned()))
}

/// Whether `p` is `root` followed only by plain names: no `..`, no root.
fn inside(root: &Path, p: &Path) -> bool {
    p.strip_prefix(root)
        .is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
}

// ---- names: digests, repository names, references, the router's paths ----

/// Digests, names and references, and the router's parse of a path.
/// Invariant: what parses makes a path inside the cache dir, and prints
/// back as it was read.
pub fn names(data: &[u8]) {
    let Some((sel, s)) = split(data) else { return };
    let root = Path::new("/var/lib/regproxy");
    match sel % 4 {
        0 => {
            if let Ok(d) = Digest::parse(&s) {
                assert_eq!(d.to_string(), s, "a digest prints as it was read");
                let p = crate::cache::content_path(root, &d);
                assert!(inside(root, &p), "{p:?} is outside the cache dir");
            }
        }
        1 => {
            if validate_name(&s).is_ok() {
                assert!(inside(root, &root.join(&s)), "name {s:?} leaves the dir");
                assert!(s.len() <= 255 && !s.contains("//"));
            }
        }
        2 => match Reference::parse(&s) {
            Ok(Reference::Tag(t)) => {
                assert_eq!(t, s);
                assert!(inside(root, &root.join(&t)), "tag {t:?} leaves the dir");
            }
            Ok(Reference::Digest(d)) => assert_eq!(d.to_string(), s),
            Err(_) => {}
        },
        _ => {
            if let Ok(route) = crate::api::route(&s) {
                route_invariants(&s, &route);
            }
        }
    }
}

fn route_invariants(path: &str, route: &crate::api::Route<'_>) {
    use crate::api::Route;
    let checked = |name: &str| {
        assert!(
            validate_name(name).is_ok(),
            "{path:?} routed with name {name:?}"
        );
    };
    match route {
        Route::Blob(name, d) => {
            checked(name);
            assert!(path.ends_with(&d.to_string()));
        }
        Route::Manifest(name, r) => {
            checked(name);
            assert!(path.ends_with(&r.to_string()));
        }
        Route::Ping | Route::Listing | Route::Upload => {}
    }
    assert!(
        !path.split('/').any(|seg| seg == ".." || seg == "."),
        "{path:?} with a dot segment was routed"
    );
}

// ---- headers: Range, WWW-Authenticate, Link/Location rewriting ----

/// The upstream's origin the rewriting targets use, and the proxy's.
const UPSTREAM: &str = "http://10.0.0.5:5000";
const PROXY: &str = "http://node:80";

/// `Range` against a blob size; a challenge's realm; origin rewriting of
/// `Location`, `Link` and challenges. Invariant: a Range answer lies within
/// the blob.
pub fn headers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => range(rest),
        1 => {
            let s = String::from_utf8_lossy(rest);
            if let Some(p) = crate::api::realm_path(&s, UPSTREAM) {
                assert!(p.starts_with('/') && !p.starts_with("/v2"), "realm {p:?}");
                assert!(
                    s.contains(&format!("{UPSTREAM}{p}")),
                    "realm {p:?} not in {s:?}"
                );
            }
        }
        _ => {
            let s = String::from_utf8_lossy(rest);
            let out = crate::api::replace_origin(&s, UPSTREAM, PROXY);
            if !s.contains(UPSTREAM) {
                assert_eq!(out, s, "nothing to rewrite, nothing rewritten");
            }
            assert_eq!(
                crate::api::replace_origin(&out, UPSTREAM, PROXY),
                out,
                "a rewritten value has no upstream origin left"
            );
            assert_eq!(crate::api::replace_origin(&s, UPSTREAM, UPSTREAM), s);
        }
    }
}

fn range(data: &[u8]) {
    // A small size in one byte (most blobs the fuzzer needs), or eight.
    let (size, value) = match data.split_first() {
        Some((&b, rest)) if b < 0x80 => (u64::from(b), rest),
        Some((_, rest)) if rest.len() >= 8 => {
            let (n, v) = rest.split_at(8);
            (u64::from_le_bytes(n.try_into().expect("8 bytes")), v)
        }
        _ => return,
    };
    let Ok(v) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(header::RANGE, v);
    match crate::api::ranged(&h, size) {
        Ok((StatusCode::OK, start, end)) => assert_eq!((start, end), (0, size)),
        Ok((StatusCode::PARTIAL_CONTENT, start, end)) => {
            assert!(
                start < end && end <= size,
                "{value:?} of {size} gave {start}..{end}"
            );
        }
        Ok(other) => panic!("{value:?} of {size}: unexpected {other:?}"),
        Err(Error::RangeNotSatisfiable { size: s }) => assert_eq!(s, size),
        Err(e) => panic!("{value:?} of {size}: unexpected error {e}"),
    }
}

// ---- units: sizes, size lists, durations, the upstream URL ----

/// The size and duration grammars, and `--upstream`. Invariant: what parses
/// reads the same again written plainly.
pub fn units(data: &[u8]) {
    use crate::units::{parse_duration, parse_size, parse_size_list};
    let Some((sel, s)) = split(data) else { return };
    match sel % 4 {
        0 => {
            if let Ok(n) = parse_size(&s) {
                assert_eq!(parse_size(&n.to_string()), Ok(n));
                assert_eq!(
                    parse_size(&s.to_ascii_uppercase()),
                    Ok(n),
                    "units ignore case"
                );
            }
        }
        1 => {
            if let Ok(v) = parse_size_list(&s) {
                let items = if s.trim().is_empty() {
                    0
                } else {
                    s.split(',').count()
                };
                assert_eq!(v.len(), items, "one size per item of {s:?}");
            }
        }
        2 => {
            if let Ok(d) = parse_duration(&s) {
                let again = humantime::format_duration(d).to_string();
                assert_eq!(parse_duration(&again), Ok(d), "{s:?} printed as {again:?}");
            }
        }
        _ => {
            if let Ok(uri) = crate::config::parse_upstream(&s) {
                assert!(matches!(uri.scheme_str(), Some("http" | "https")));
                assert!(uri.authority().is_some() && uri.query().is_none());
            }
        }
    }
}

// ---- node_files: the /etc/hosts and hosts.toml editors ----

const HOST_NAMES: [&str; 4] = [
    "registry.local",
    "knative.registry.svc.cluster.local",
    "A.B",
    "x",
];
const ADDRS: [&str; 4] = ["127.0.0.2", "10.0.0.1", "::1", "fd00::5"];
const ENDPOINTS: [&str; 2] = ["http://127.0.0.2:80", "http://[::1]:5000"];

/// The `/etc/hosts` editor on arbitrary content, the `hosts.toml` editor on
/// an arbitrary existing file, and the name and endpoint grammars with the
/// `hosts.toml` they produce. Invariants: ensure then remove gives back the
/// exact bytes; a file not ours is never changed; what is written parses.
pub fn node_files(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let name = HOST_NAMES[usize::from(sel >> 4) % HOST_NAMES.len()];
    let addr: IpAddr = ADDRS[usize::from(sel >> 6)].parse().expect("an address");
    match sel % 3 {
        0 => etc_hosts(rest, name, addr),
        1 => containerd_file(rest, name, sel & 8 != 0),
        _ => grammars(&String::from_utf8_lossy(rest)),
    }
}

fn etc_hosts(old: &[u8], name: &str, addr: IpAddr) {
    use crate::hosts::Outcome;
    use crate::hosts::{ensure_entry, lookup, remove_entry};
    let path = Path::new("/etc/hosts");
    let had_ours = remove_entry(old, name).0.is_some();
    let Ok((new, outcome)) = ensure_entry(old, name, addr, path) else {
        return;
    };
    let Some(new) = new else {
        return;
    };
    assert!(matches!(outcome, Outcome::Added | Outcome::Updated));
    assert!(
        matches!(ensure_entry(&new, name, addr, path), Ok((None, _))),
        "a second ensure changes nothing"
    );
    if !had_ours {
        assert!(matches!(outcome, Outcome::Added));
        assert_eq!(
            remove_entry(&new, name).0.as_deref(),
            Some(old),
            "ensure then remove gives back the exact bytes"
        );
    }
    if let Some((_, a)) = lookup(&new, name) {
        assert_eq!(
            a.parse::<IpAddr>().ok(),
            Some(addr),
            "the name resolves elsewhere"
        );
    }
}

fn containerd_file(content: &[u8], name: &str, exists: bool) {
    use crate::hosts::{ensure_containerd, hosts_toml, remove_containerd};
    use crate::hosts::{HostsError, Outcome};
    let certs = workdir().join("certs.d");
    let _ = std::fs::remove_dir_all(&certs);
    let file = crate::hosts::containerd_hosts_toml(&certs, name);
    if exists {
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&file, content).expect("write hosts.toml");
    }
    let ours = exists && content.starts_with(crate::hosts::TOML_MARK.as_bytes());
    let (endpoint, server) = (ENDPOINTS[0], ENDPOINTS[1]);
    let ensured = ensure_containerd(&certs, name, endpoint, server);
    if exists && !ours {
        assert!(
            matches!(ensured, Err(HostsError::NotOurs { .. })),
            "{ensured:?}"
        );
        assert_eq!(std::fs::read(&file).expect("still there"), content);
    } else {
        assert!(ensured.is_ok(), "{ensured:?}");
        let wanted = hosts_toml(name, endpoint, server);
        assert_eq!(std::fs::read_to_string(&file).expect("written"), wanted);
    }
    let removed = remove_containerd(&certs, name).expect("remove");
    if exists && !ours {
        assert_eq!(removed, Outcome::LeftAlone);
        assert_eq!(std::fs::read(&file).expect("still there"), content);
    } else {
        assert_eq!(removed, Outcome::Removed);
        assert!(!certs.join(name).exists(), "remove leaves nothing behind");
    }
}

fn grammars(s: &str) {
    use crate::hosts::{parse_endpoint, parse_host_name, parse_registry_host};
    let mut parts = s.splitn(3, '\n');
    let (name, endpoint, server) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let certs = Path::new("/etc/containerd/certs.d");
    if parse_host_name(name).is_ok() {
        assert!(parse_registry_host(name).is_ok());
    }
    let Ok(name) = parse_registry_host(name) else {
        return;
    };
    let path = crate::hosts::containerd_hosts_toml(certs, &name);
    assert!(inside(certs, &path), "{path:?} is outside {certs:?}");
    let (Ok(endpoint), Ok(server)) = (parse_endpoint(endpoint), parse_endpoint(server)) else {
        return;
    };
    assert_eq!(parse_endpoint(&endpoint).as_ref(), Ok(&endpoint));
    let text = crate::hosts::hosts_toml(&name, &endpoint, &server);
    let t: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(t["server"].as_str(), Some(server.as_str()));
    assert!(t["host"].get(&endpoint).is_some(), "{text}");
}

// ---- state: state.json, open.json, allowed.json ----

/// Loading the files the cache dir keeps. Invariant: a loaded tag is one
/// the proxy could have stored (valid name, tag and digest); a remembered
/// key is 64 hex digits.
pub fn state(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // A dir per parser; the auth key in the last one is kept, as it is
    // made (and synced) once.
    let dir = workdir().join(format!("state-{}", sel % 3));
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["state.json", "open.json", "allowed.json"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let ttl = Duration::from_secs(30);
    match sel % 3 {
        0 => {
            std::fs::write(dir.join("state.json"), rest).expect("write");
            let tags = crate::tags::Tags::open(&dir, ttl);
            for (name, tag) in json_pairs(rest) {
                if let Some((e, _)) = tags.get(&name, &tag) {
                    assert!(validate_name(&name).is_ok(), "loaded name {name:?}");
                    assert!(
                        matches!(Reference::parse(&tag), Ok(Reference::Tag(_))),
                        "{tag:?}"
                    );
                    assert!(
                        Digest::parse(&e.digest).is_ok(),
                        "loaded digest {:?}",
                        e.digest
                    );
                }
            }
        }
        1 => {
            let file = if sel & 8 == 0 {
                "open.json"
            } else {
                "state.json"
            };
            std::fs::write(dir.join(file), rest).expect("write");
            let config = crate::config::AuthConfig {
                ttl,
                remember: None,
            };
            crate::auth::Auth::open(&dir, &config).expect("auth opens");
        }
        _ => {
            std::fs::write(dir.join("allowed.json"), rest).expect("write");
            let config = crate::config::AuthConfig {
                ttl,
                remember: Some(Duration::from_secs(3600)),
            };
            crate::auth::Auth::open(&dir, &config).expect("auth opens");
            for s in json_strings(rest) {
                if let Some(k) = crate::auth::parse_key(&s) {
                    assert_eq!(crate::auth::hex(&k), s.to_ascii_lowercase(), "key {s:?}");
                }
            }
        }
    }
}

/// The first two strings of every array in a JSON document.
fn json_pairs(b: &[u8]) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Array(a) => {
                if let (Some(n), Some(t)) = (a.first(), a.get(1)) {
                    if let (Some(n), Some(t)) = (n.as_str(), t.as_str()) {
                        out.push((n.to_owned(), t.to_owned()));
                    }
                }
                a.iter().for_each(|x| walk(x, out));
            }
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_slice(b) {
        walk(&v, &mut out);
    }
    out
}

/// Every string in a JSON document.
fn json_strings(b: &[u8]) -> Vec<String> {
    fn walk(v: serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(a) => a.into_iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.into_iter().for_each(|(_, x)| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_slice(b) {
        walk(v, &mut out);
    }
    out
}

// ---- request: raw bytes into the real App ----

mod request;
pub use request::request;

// ---- conn: raw bytes to hyper over the sendfile socket ----

mod conn;
pub use conn::conn;
