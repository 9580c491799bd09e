//! What an admin sees and does in the cache, behind the admin API (see
//! `crate::server::admin_api`, which checks the token first):
//!
//! - `GET /admin/cache`: every committed entry, most recently used first:
//!   digest, size, kind (blob or manifest), the repositories it was served
//!   under (at most `seen::REPOS_PER_DIGEST`, 8, in memory: a restart
//!   forgets them), the remembered tags that point at it, its last use
//!   (the file's mtime after a restart) and whether it is pinned.
//! - `POST /admin/cache/rm` `{"target": DIGEST|REF}`: a digest removes that
//!   content. A ref (`[HOST/]NAME:TAG` or `NAME@DIGEST`) removes its
//!   manifest, the config and layers it lists (for an index: its platform
//!   manifests that are cached, and theirs), whether or not other cached
//!   images share them, and forgets the tag. All or nothing: 409 while any
//!   of it is being sent to a client or filled, or is pinned.
//! - `POST /admin/cache/verify` `{"rate": "50MiB/s"}`: see `verify`.
//!
//! Removal goes through the index (under its lock, files unlinked before it
//! is released, so that no commit of the same digest lands in between): the
//! cache's bytes, its metrics and the disk stay in step.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use serde_json::{json, Value};

use super::{type_path, Cache, State};
use crate::api::App;
use crate::body::Body;
use crate::digest::{Digest, Reference};
use crate::server::admin_api::{error, json_response};

mod verify;

/// Largest manifest read to find what a ref removes.
const MAX_MANIFEST: u64 = 4 << 20;

/// Why content was not removed.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// Nothing of it is cached.
    NotCached(String),
    /// Being sent to a client or filled.
    InUse(String),
    Pinned(Digest),
}

impl Refused {
    fn response(&self) -> Response<Body> {
        match self {
            Refused::NotCached(what) => {
                error(StatusCode::NOT_FOUND, &format!("not cached: {what}"))
            }
            Refused::InUse(why) => error(StatusCode::CONFLICT, &format!("in use: {why}")),
            Refused::Pinned(d) => error(
                StatusCode::CONFLICT,
                &format!("{d} is pinned; unpin it first"),
            ),
        }
    }
}

/// Whether `d` is pinned (see [`crate::pins`]). Asked before the book's and
/// the index's locks are taken: the pinned set has a lock of its own.
fn pinned(cache: &Cache, d: &Digest) -> bool {
    cache.is_pinned(d)
}

/// A committed entry as `cache ls` shows it.
struct Listed {
    digest: Digest,
    size: u64,
    manifest: bool,
    used: SystemTime,
    /// Least recent first.
    repositories: Vec<String>,
}

impl Cache {
    /// Every committed entry, most recently used first.
    fn entries(&self) -> Vec<Listed> {
        let rows: Vec<_> = {
            let st = self.lock();
            st.index.iter().map(|(d, e)| (d.clone(), *e)).collect()
        };
        let book = self.book.lock();
        rows.into_iter()
            .map(|(digest, e)| Listed {
                repositories: book.seen.get(&digest).cloned().unwrap_or_default(),
                digest,
                size: e.size,
                manifest: e.manifest,
                used: e.used,
            })
            .collect()
    }

    /// Removes the cached ones of `ds`, all or none (see the module doc);
    /// `pinned` are those of them that are pinned. Blocks: unlinks files.
    pub fn remove(
        &self,
        ds: &[Digest],
        pinned: &HashSet<Digest>,
    ) -> Result<Vec<(Digest, u64)>, Refused> {
        let book = self.book.lock();
        let mut st = self.lock();
        let mut cached = Vec::new();
        for d in ds {
            if st.fills.contains_key(d) {
                return Err(Refused::InUse(format!("{d} is being filled")));
            }
            if let Some(n) = book.serving.get(d) {
                let clients = if *n == 1 { "client" } else { "clients" };
                return Err(Refused::InUse(format!(
                    "{d} is being sent to {n} {clients}"
                )));
            }
            if st.index.contains(d) {
                if pinned.contains(d) {
                    return Err(Refused::Pinned(d.clone()));
                }
                cached.push(d.clone());
            }
        }
        if cached.is_empty() {
            let what = ds.iter().map(Digest::to_string).collect::<Vec<_>>();
            return Err(Refused::NotCached(what.join(", ")));
        }
        let removed = cached
            .into_iter()
            .filter_map(|d| {
                let size = self.take_out(&mut st, &d)?;
                tracing::info!(digest = %d, size, "removed from the cache by the admin");
                Some((d, size))
            })
            .collect();
        self.publish(&st);
        Ok(removed)
    }

    /// Takes `d` out of the index and unlinks its files, under the state
    /// lock; returns its size if it was there.
    fn take_out(&self, st: &mut State, d: &Digest) -> Option<u64> {
        let e = st.index.pop(d)?;
        st.committed -= e.size;
        st.open.pop(d);
        let p = self.path(d);
        let mut paths = vec![p.clone()];
        if e.manifest {
            paths.push(type_path(&p));
        }
        self.unlink(paths);
        Some(e.size)
    }

    /// What removing `name:reference` takes away: the manifest's digest,
    /// and every digest it lists, with the cached manifests of an index
    /// opened in turn. Blocks: reads manifests.
    fn closure(&self, top: &Digest) -> Vec<Digest> {
        let mut out = vec![top.clone()];
        let mut i = 0;
        while i < out.len() {
            let d = out[i].clone();
            i += 1;
            let Some(m) = self.cached_manifest(&d) else {
                continue;
            };
            let desc = |v: &Value| Digest::parse(v.get("digest")?.as_str()?).ok();
            let children = m["manifests"].as_array().into_iter().flatten();
            let blobs = m["layers"].as_array().into_iter().flatten();
            let listed = children.chain(std::iter::once(&m["config"])).chain(blobs);
            for c in listed.filter_map(desc) {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The manifest `d` as JSON, if it is cached as a manifest.
    fn cached_manifest(&self, d: &Digest) -> Option<Value> {
        if !self.lock().index.peek(d)?.manifest {
            return None;
        }
        let f = fs::File::open(self.path(d)).ok()?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, MAX_MANIFEST), &mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// `GET /admin/cache`.
pub async fn admin_ls(app: &Arc<App>, _body: Bytes) -> Response<Body> {
    let cache = app.cache();
    let mut tags: HashMap<String, Vec<String>> = HashMap::new();
    for (name, tag, e) in app.tags().all() {
        tags.entry(e.digest)
            .or_default()
            .push(format!("{name}:{tag}"));
    }
    let mut bytes = 0;
    let entries: Vec<Value> = cache
        .entries()
        .into_iter()
        .map(|e| {
            bytes += e.size;
            let digest = e.digest.to_string();
            let mut tags = tags.remove(&digest).unwrap_or_default();
            tags.sort();
            let unix = e.used.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
            json!({
                "digest": digest,
                "size": e.size,
                "kind": if e.manifest { "manifest" } else { "blob" },
                "repositories": e.repositories,
                "tags": tags,
                "last_use": humantime::format_rfc3339_seconds(e.used).to_string(),
                "last_use_unix": unix,
                "pinned": pinned(cache, &e.digest),
            })
        })
        .collect();
    let total = json!({"entries": entries.len(), "bytes": bytes, "capacity": cache.capacity()});
    ok(json!({"entries": entries, "total": total}))
}

/// `POST /admin/cache/rm` `{"target": DIGEST|REF}`.
pub async fn admin_rm(app: &Arc<App>, body: Bytes) -> Response<Body> {
    let target = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v["target"].as_str().map(str::to_owned),
        Err(_) => None,
    };
    let Some(target) = target else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"target\": DIGEST or REF}",
        );
    };
    let (top, tag) = match Digest::parse(&target) {
        Ok(d) => (d, None),
        Err(_) => match crate::prefetch::parse_ref(target.trim()) {
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            Ok((_, Reference::Digest(d))) => (d, None),
            Ok((name, Reference::Tag(t))) => match app.tags().get(&name, &t) {
                Some((e, _)) => match Digest::parse(&e.digest) {
                    Ok(d) => (d, Some((name, t))),
                    Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                },
                None => {
                    let msg = format!("no tag {name}:{t} is remembered");
                    return error(StatusCode::NOT_FOUND, &msg);
                }
            },
        },
    };
    let by_ref = target != top.to_string();
    let cache = Arc::clone(app.cache());
    let removed = tokio::task::spawn_blocking(move || {
        let ds = if by_ref {
            cache.closure(&top)
        } else {
            vec![top]
        };
        let pins = ds.iter().filter(|d| pinned(&cache, d)).cloned().collect();
        cache.remove(&ds, &pins)
    })
    .await;
    let removed = match removed {
        Ok(Ok(r)) => r,
        // A tag whose manifest is gone from the cache: forgetting it is all.
        Ok(Err(Refused::NotCached(_))) if tag.is_some() => Vec::new(),
        Ok(Err(r)) => return r.response(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    if let Some((name, t)) = &tag {
        app.tags().remove(name, t).await;
    }
    let bytes: u64 = removed.iter().map(|(_, s)| s).sum();
    let removed: Vec<Value> = removed
        .iter()
        .map(|(d, size)| json!({"digest": d.to_string(), "size": size}))
        .collect();
    let untagged = tag.map(|(n, t)| format!("{n}:{t}"));
    ok(json!({"removed": removed, "bytes": bytes, "untagged": untagged}))
}

/// The slowest `cache verify` rate, bytes per second.
const MIN_VERIFY_RATE: u64 = 1 << 20;

/// `POST /admin/cache/verify` `{"rate": "50MiB/s"}` (or bytes per second;
/// `0`/`"off"`: unlimited): NDJSON progress, then the report.
pub async fn admin_verify(app: &Arc<App>, body: Bytes) -> Response<Body> {
    let rate = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(verify::DEFAULT_RATE)
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => match &v["rate"] {
                Value::Null => Ok(verify::DEFAULT_RATE),
                Value::Number(n) => n
                    .as_u64()
                    .ok_or_else(|| format!("rate {n} is no whole number")),
                Value::String(s) => crate::units::parse_rate(s).map_err(|e| e.to_string()),
                other => Err(format!("rate {other} is no rate such as \"50MiB/s\"")),
            },
            Err(e) => Err(format!("expected {{\"rate\": ...}}: {e}")),
        }
    };
    let rate = match rate {
        // Below it a run's 1 MiB steps sleep so long that it holds the one
        // verify place for days, deaf to its client hanging up.
        Ok(r) if r != 0 && r < MIN_VERIFY_RATE => {
            return error(StatusCode::BAD_REQUEST, "a verify rate is at least 1MiB/s")
        }
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    match verify::start(Arc::clone(app.cache()), rate) {
        Some(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(body)
            .expect("valid response"),
        None => error(StatusCode::CONFLICT, "a cache verify is running already"),
    }
}

fn ok(v: Value) -> Response<Body> {
    json_response(StatusCode::OK, &v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn removal_is_all_or_nothing_and_keeps_the_index_true() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let c =
            Arc::new(Cache::open(&tmp.path().join("c"), 1 << 20, Arc::clone(&m), true).unwrap());
        let (a, b) = (Digest::of(b"aaaa"), Digest::of(b"bb"));
        for (d, x) in [(&a, &b"aaaa"[..]), (&b, b"bb")] {
            c.put_manifest(d.clone(), "t".into(), Bytes::copy_from_slice(x))
                .await;
        }
        let none = HashSet::new();
        let held = c.serving(&b);
        assert!(
            matches!(
                c.remove(&[a.clone(), b.clone()], &none),
                Err(Refused::InUse(_))
            ),
            "content being sent is not removed"
        );
        assert!(
            c.path(&a).exists(),
            "nothing is removed when a part is refused"
        );
        let pins = HashSet::from([a.clone()]);
        assert_eq!(
            c.remove(std::slice::from_ref(&a), &pins),
            Err(Refused::Pinned(a.clone()))
        );
        drop(held);
        let removed = c.remove(&[a.clone(), b.clone()], &none).unwrap();
        assert_eq!(removed, vec![(a.clone(), 4), (b.clone(), 2)]);
        assert!(
            !c.path(&a).exists() && !type_path(&c.path(&a)).exists(),
            "files are unlinked"
        );
        assert_eq!(m.cache_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(matches!(c.remove(&[a], &none), Err(Refused::NotCached(_))));
    }
}
