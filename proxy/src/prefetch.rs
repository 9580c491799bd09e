//! Prefetch: fetch an image into the node cache before anyone pulls it.
//!
//! [`run`] walks one image the way a client pulls it, in process through
//! [`App::fetch`] (so authorization, tags, single-flight fills, peers and
//! the uplink budget's prefetch lane all apply): the manifest or index by
//! tag or digest; from an index, only the manifest of the wanted platform
//! (`refs`); then config and layers, a few at a time, skipping those the
//! cache holds. Requests carry the `--prefetch-auth-file` credential
//! (`authfile`), or none. `admin` answers `POST /admin/prefetch` with the
//! events of every ref as NDJSON; `regproxy prefetch` (`crate::ctl`) draws them.

mod admin;
pub mod authfile;
mod refs;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::api::App;
use crate::body::Body;
use crate::digest::{Digest, Reference};

pub use admin::admin_prefetch;
pub use refs::{parse_ref, Platform, Target};

/// The manifest kinds a prefetch asks for: indexes first, as clients ask.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Blobs of one image fetched at once: a prefetch stays gentle.
const CONCURRENCY: usize = 3;

/// Most often a progress event goes out.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Largest manifest read (Distribution's limit).
const MAX_MANIFEST: usize = 4 << 20;

/// What a prefetch fetched, or found already on the node.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// Every manifest (the index too), the config and the layers.
    pub digests: Vec<Digest>,
    /// What the ref resolved to: the index, or the manifest if there is none.
    pub top: Digest,
    /// Bytes of config and layers.
    pub bytes: u64,
    /// Of those, the bytes this run fetched (the rest were cached).
    pub fetched: u64,
    /// Blobs the cache had no room to keep (the pins fill it): not
    /// downloaded. A pin of the image is kept and tried again later.
    pub unkept: Vec<Digest>,
}

/// What a prefetch reports as it goes. [`run`] sends `Resolved` and
/// `Progress`; whoever runs it ends with `Done` or `Failed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Resolved {
        /// The top digest (index or manifest).
        digest: String,
        /// The platform's manifest.
        manifest: String,
        platform: String,
        /// Bytes of config and layers, and of those already cached.
        bytes: u64,
        cached: u64,
        blobs: usize,
    },
    Progress {
        done: u64,
        total: u64,
    },
    Done {
        digest: String,
        bytes: u64,
        fetched: u64,
        seconds: f64,
        pinned: bool,
    },
    Failed {
        error: String,
    },
}

impl Event {
    /// The final event of a prefetch that started at `started`.
    pub fn finished(r: &Result<Fetched, String>, started: Instant, pinned: bool) -> Event {
        match r {
            Ok(f) => Event::Done {
                digest: f.top.to_string(),
                bytes: f.bytes,
                fetched: f.fetched,
                seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                pinned,
            },
            Err(e) => Event::Failed { error: e.clone() },
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    urls: Vec<String>,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Prefetches `t` into the node cache.
pub async fn run(
    app: &Arc<App>,
    t: &Target,
    events: &mut (dyn FnMut(Event) + Send),
) -> Result<Fetched, String> {
    let (top, media_type, body) = manifest(app, t, &t.tag_or_digest.to_string()).await?;
    let mut digests = vec![top.clone()];
    let mut m = parse(&media_type, &body)?;
    if !m.manifests.is_empty() {
        let chosen = choose(&m.manifests, &t.platform)?;
        // Fetched by digest: `manifest` checks the bytes against it.
        let (d, media_type, body) = manifest(app, t, &chosen.to_string()).await?;
        digests.push(d);
        m = parse(&media_type, &body)?;
        if !m.manifests.is_empty() {
            return Err(format!("the index entry {chosen} is an index itself"));
        }
    }
    let image = digests.last().expect("the top manifest").to_string();
    let Some(config) = m.config else {
        return Err(format!("the manifest for {} has no config", t.platform));
    };
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    // Foreign layers live elsewhere; the upstream has no copy to give.
    for b in std::iter::once(config).chain(m.layers).filter(|b| {
        b.urls.is_empty()
            && !b.media_type.contains("foreign")
            && !b.media_type.contains("nondistributable")
    }) {
        let d = Digest::parse(&b.digest).map_err(|e| format!("in the manifest: {e}"))?;
        if !blobs.iter().any(|(x, _)| *x == d) {
            blobs.push((d, b.size));
        }
    }
    digests.extend(blobs.iter().map(|(d, _)| d.clone()));
    let total = blobs
        .iter()
        .try_fold(0u64, |sum, (_, s)| sum.checked_add(*s))
        .ok_or("the manifest's sizes add up past 2^64 bytes")?;
    let (cached, missing): (Vec<_>, Vec<_>) =
        blobs.iter().partition(|(d, _)| app.cache().contains(d));
    let cached_bytes: u64 = cached.iter().map(|(_, s)| s).sum();
    // Such a blob would stream through uncached: the uplink spent for nothing.
    let cap = app.cache().capacity();
    if let Some((d, size)) = missing.iter().find(|(_, size)| *size > cap) {
        return Err(format!(
            "blob {d} ({size} bytes) is larger than the cache (--cache-size {cap} bytes)"
        ));
    }
    events(Event::Resolved {
        digest: top.to_string(),
        manifest: image,
        platform: t.platform.to_string(),
        bytes: total,
        cached: cached_bytes,
        blobs: blobs.len(),
    });
    let done = AtomicU64::new(cached_bytes);
    // The futures made up front: a closure in the stream would borrow for
    // a lifetime the spawned task cannot name.
    let fetches: Vec<_> = missing
        .iter()
        .map(|(d, size)| blob(app, t, d, *size, &done))
        .collect();
    let mut pending = futures_util::stream::iter(fetches).buffer_unordered(CONCURRENCY);
    let mut unkept = Vec::new();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            r = pending.next() => match r {
                None => break,
                Some(r) => unkept.extend(r?),
            },
            _ = tick.tick() => events(Event::Progress { done: done.load(Relaxed), total }),
        }
    }
    Ok(Fetched {
        digests,
        top,
        bytes: total,
        fetched: total - cached_bytes,
        unkept,
    })
}

/// A manifest of `t`'s repository by tag or digest, as a client gets it:
/// its digest, media type and bytes.
async fn manifest(
    app: &Arc<App>,
    t: &Target,
    reference: &str,
) -> Result<(Digest, String, Bytes), String> {
    let what = format!("manifest {}:{reference}", t.name);
    let path = format!("/v2/{}/manifests/{reference}", t.name);
    let mut h = headers(app);
    h.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    let resp = app.fetch(Method::GET, &path, h).await;
    let (p, body) = refused(resp, &what).await?.into_parts();
    let bytes = http_body_util::Limited::new(body, MAX_MANIFEST)
        .collect()
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .to_bytes();
    let d = Digest::of(&bytes);
    if let Ok(Reference::Digest(want)) = Reference::parse(reference) {
        if want != d {
            return Err(format!("{what}: its bytes are {d}"));
        }
    }
    let media_type = p
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((d, media_type, bytes))
}

fn parse(media_type: &str, body: &[u8]) -> Result<Manifest, String> {
    let m: Manifest =
        serde_json::from_slice(body).map_err(|e| format!("the manifest is not JSON: {e}"))?;
    let kind = if m.media_type.is_empty() {
        media_type
    } else {
        &m.media_type
    };
    if m.schema_version == Some(1)
        || kind.starts_with("application/vnd.docker.distribution.manifest.v1")
    {
        return Err(format!("{kind} (schema 1) manifests are not supported"));
    }
    Ok(m)
}

/// The index entry for `p`: the best rank, the first of equals.
fn choose(entries: &[Descriptor], p: &Platform) -> Result<Digest, String> {
    let best = entries
        .iter()
        .filter_map(|e| Some((p.rank(e.platform.as_ref()?)?, e)))
        .min_by_key(|(rank, _)| *rank);
    match best {
        Some((_, e)) => Digest::parse(&e.digest).map_err(|e| format!("in the index: {e}")),
        None => {
            let has: Vec<String> = entries
                .iter()
                .filter_map(|e| Some(e.platform.as_ref()?.to_string()))
                .collect();
            Err(format!(
                "the index has no manifest for {p} (it has {})",
                has.join(", ")
            ))
        }
    }
}

/// Fetches one blob through the proxy and drains it, adding to `done`;
/// `Some(d)` when the cache had no room to keep it.
async fn blob(
    app: &Arc<App>,
    t: &Target,
    d: &Digest,
    size: u64,
    done: &AtomicU64,
) -> Result<Option<Digest>, String> {
    let what = format!("blob {d}");
    let path = format!("/v2/{}/blobs/{d}", t.name);
    let resp = app.fetch(Method::GET, &path, headers(app)).await;
    if resp.status() == StatusCode::INSUFFICIENT_STORAGE {
        return Ok(Some(d.clone()));
    }
    let resp = refused(resp, &what).await?;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{what} after {got} bytes: {e}"))?;
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            done.fetch_add(data.len() as u64, Relaxed);
        }
    }
    if got != size {
        return Err(format!("{what}: {got} bytes, the manifest says {size}"));
    }
    Ok(None)
}

fn headers(app: &App) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(cred) = app.prefetch_auth() {
        h.insert(header::AUTHORIZATION, cred.clone());
    }
    h
}

/// The response if it is a 200, else the error a client would have seen.
async fn refused(resp: Response<Body>, what: &str) -> Result<Response<Body>, String> {
    let status = resp.status();
    if status == StatusCode::OK {
        return Ok(resp);
    }
    let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    #[derive(Deserialize)]
    struct Oci {
        errors: Vec<OciError>,
    }
    #[derive(Deserialize)]
    struct OciError {
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Oci>(&body) {
        Ok(o) if !o.errors.is_empty() => o
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_owned(),
    };
    Err(format!("{what}: {status} {detail}").trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn index() -> Manifest {
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"digest": A, "size": 1, "platform": {"os": "unknown", "architecture": "unknown"}},
                {"digest": B, "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
                {"digest": C, "size": 1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"digest": A, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            ]
        });
        parse("", json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_platforms_manifest_is_chosen_from_an_index() {
        let m = index();
        let want = |p| choose(&m.manifests, &Platform::parse(p).unwrap());
        assert_eq!(
            want("linux/arm64").unwrap().to_string(),
            C,
            "the first of equals"
        );
        assert_eq!(want("linux/arm/v7").unwrap().to_string(), B, "v7 runs v6");
        let err = want("linux/amd64").unwrap_err();
        assert_eq!(
            err,
            "the index has no manifest for linux/amd64 (it has unknown/unknown, \
             linux/arm/v6, linux/arm64/v8, linux/arm64)"
        );
    }

    #[test]
    fn schema_1_is_refused() {
        let v1 = br#"{"schemaVersion": 1, "name": "a", "fsLayers": []}"#;
        let err = parse(
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            v1,
        )
        .err()
        .unwrap();
        assert!(err.contains("schema 1"), "{err}");
        assert!(parse("", b"<html>").is_err());
    }
}
