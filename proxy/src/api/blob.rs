//! Blobs: from the node cache, or from a single-flight fill that this and
//! every concurrent request follow; ranges from either.

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use super::{Answer, App};
use crate::auth::Credential;
use crate::body::Body;
use crate::budget::Prefetching;
use crate::cache::fill::{self, FillRequest};
use crate::cache::{Failure, Join};
use crate::digest::Digest;
use crate::error::{Error, UpstreamError};
use crate::headers::CONTENT_DIGEST;
use crate::metrics::Outcome;
use crate::peers::Ask;

impl App {
    pub(super) async fn blob(&self, parts: &Parts, name: &str, d: Digest, head: bool) -> Answer {
        let path = format!("/v2/{name}/blobs/{d}");
        // A few rounds at most: a miss that finds the blob committed meanwhile
        // looks again, and a follower whose leader was refused by the
        // upstream starts a fill with its own credentials.
        // Why the last round gave nothing, if every round does.
        const VANISHED: &str = "the blob vanished from the cache as it was committed";
        let mut last = Error::Internal(VANISHED);
        // A prefetch's fill yields to clients' on the uplink budget.
        let prefetching = parts.extensions.get::<Prefetching>().is_some();
        for _ in 0..3 {
            if let Some(hit) = self.cache.get(&d, false).await {
                let serving = self.cache.serving(&d);
                self.authorize(parts, name, &d, false).await?;
                self.cache.seen(&d, name);
                let size = hit.data.len() as u64;
                let (status, start, end) = ranged(&parts.headers, size)?;
                let resp = blob_response(status, &d, start, end, size);
                let body = self.cached_body(hit.data.slice(start as usize..end as usize), head);
                let body = serving.hold(body);
                return Ok((Outcome::Hit, resp.body(body).expect("valid response")));
            }
            if head {
                // A HEAD starts no download; the upstream answers it.
                return self
                    .relay(parts, None)
                    .await
                    .map(|r| (Outcome::Passthrough, r));
            }
            // In a handover, the process being replaced may be filling this
            // blob: follow its fill rather than fetch the blob again. Its
            // upstream GET spoke for another client: ask for this one.
            let filling = self.cache.filling(&d);
            let mut sibling = match filling {
                // Joining this process's own fill: nothing to look for.
                true => None,
                false => self.cache.sibling_fill(&d).await,
            };
            // A peer that owns this digest is asked before the upstream
            // (see `crate::peers`). Neither its answer nor the other
            // process's spoke for this client: ask for it first.
            let mut owner = match (&self.peers, filling || sibling.is_some()) {
                (Some(peers), false) => peers.owner(&d).map(|owner| Ask {
                    peers: Arc::clone(peers),
                    owner,
                }),
                _ => None,
            };
            if sibling.is_some() || owner.is_some() {
                self.authorize(parts, name, &d, false).await?;
            }
            let vouched = sibling.is_none() && owner.is_none();
            let (fill, leader) = match self.cache.join(&d) {
                Join::Committed => {
                    last = Error::Internal(VANISHED);
                    continue;
                }
                Join::Follower(f) => {
                    self.authorize(parts, name, &d, false).await?;
                    if !prefetching {
                        f.wanted();
                    }
                    (f, false)
                }
                Join::Leader(f) => {
                    if prefetching {
                        f.prefetching();
                    }
                    if let Some(peers) = &self.peers {
                        peers.counted_owner(owner.is_some());
                    }
                    self.upstream_contacted();
                    // The fill fetches the whole blob, whatever range this client wants.
                    let mut headers = parts.headers.clone();
                    headers.remove(header::RANGE);
                    let fr = FillRequest {
                        name: name.to_owned(),
                        headers,
                        sibling: sibling.take(),
                        peer: owner.take(),
                    };
                    let upstream = Arc::clone(&self.upstream);
                    self.cache.spawn_fill(upstream, Arc::clone(&f), fr);
                    (f, true)
                }
            };
            return match fill.started().await {
                Ok(size) => {
                    if leader && vouched {
                        // The upstream served this blob of this repository to this client.
                        self.auth.allow(&Credential::of(&parts.headers), name, &d);
                    }
                    let (status, start, end) = ranged(&parts.headers, size)?;
                    let stream =
                        fill.reader(start, end, Arc::clone(&self.metrics.served_cache_bytes));
                    let body = Body::stream(stream, Some(end - start));
                    let body = self.cache.serving(&d).hold(body);
                    self.cache.seen(&d, name);
                    let outcome = if leader {
                        Outcome::Miss
                    } else {
                        Outcome::Coalesced
                    };
                    Ok((
                        outcome,
                        blob_response(status, &d, start, end, size)
                            .body(body)
                            .expect("valid response"),
                    ))
                }
                // The leader's answer was about its credentials and its
                // repository; this client asks with its own.
                Err(Failure::Relay { status, .. }) if !leader => {
                    last = Error::status("the fill of another client", status);
                    continue;
                }

                Err(Failure::Relay {
                    status,
                    mut headers,
                    body,
                }) => {
                    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                        self.auth
                            .deny(&Credential::of(&parts.headers), name, Some(&d));
                    }
                    // The body was read (and may be cut short); hyper sets its length.
                    headers.remove(header::CONTENT_LENGTH);
                    Ok((
                        Outcome::Passthrough,
                        self.relayed(parts, status, &headers, Body::full(body)),
                    ))
                }
                Err(Failure::Error(e)) => Err(e),
                // A prefetch is for the cache: no room, no download.
                Err(Failure::Uncached) if prefetching => Err(Error::NoRoom),
                Err(Failure::Uncached) => self
                    .blob_uncached(parts, &path, d)
                    .await
                    .map(|r| (Outcome::Passthrough, r)),
            };
        }
        Err(last)
    }

    /// A blob that will not be kept: straight from upstream, still verified.
    async fn blob_uncached(
        &self,
        parts: &Parts,
        path: &str,
        d: Digest,
    ) -> Result<Response<Body>, Error> {
        let mut headers = parts.headers.clone();
        headers.remove(header::RANGE);
        let resp = self.upstream.send(Method::GET, path, &headers, &[]).await?;
        if resp.status() != StatusCode::OK {
            return Ok(self.relayed_upstream(parts, resp));
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| {
                self.upstream
                    .failed(UpstreamError::Invalid("blob without Content-Length".into()))
            })?;
        if !d.admits_size(size) {
            self.metrics
                .digest_mismatches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let e = UpstreamError::Invalid(format!("upstream announced {d} with 0 bytes"));
            return Err(self.upstream.failed(e));
        }
        let stream = fill::verified_stream(
            resp.into_body(),
            d.clone(),
            size,
            self.upstream.timeout(),
            Arc::clone(&self.metrics),
            Arc::clone(self.upstream.budget()),
        );
        Ok(blob_response(StatusCode::OK, &d, 0, size, size)
            .body(Body::stream(stream, Some(size)))
            .expect("valid response"))
    }
}

pub(super) fn blob_response(
    status: StatusCode,
    d: &Digest,
    start: u64,
    end: u64,
    size: u64,
) -> http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(CONTENT_DIGEST, d.to_string())
        .header(header::ETAG, format!("\"{d}\""))
        .header(header::CACHE_CONTROL, "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    b
}

/// The status and byte range `start..end` to send for a blob of `size` bytes.
/// One `bytes=` range is honoured; anything else that is not a valid single
/// range is ignored (RFC 9110 allows that), an unsatisfiable one is a 416.
pub(crate) fn ranged(h: &HeaderMap, size: u64) -> Result<(StatusCode, u64, u64), Error> {
    let full = Ok((StatusCode::OK, 0, size));
    let Some(v) = h.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return full;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return full;
    };
    if spec.contains(',') {
        return full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return full;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else { return full };
        if n == 0 {
            return Err(Error::RangeNotSatisfiable { size });
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return full;
        };
        let end = if b.is_empty() {
            size
        } else {
            let Ok(last) = b.parse::<u64>() else {
                return full;
            };
            if last < start {
                return full;
            }
            last.saturating_add(1).min(size)
        };
        (start, end)
    };
    if start >= size {
        return Err(Error::RangeNotSatisfiable { size });
    }
    Ok((StatusCode::PARTIAL_CONTENT, start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn range(v: &str, size: u64) -> Result<(StatusCode, u64, u64), Error> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        ranged(&h, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(
            range("bytes=0-9", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 0, 10)
        );
        assert_eq!(
            range("bytes=90-", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 90, 100)
        );
        assert_eq!(
            range("bytes=-10", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 90, 100)
        );
        assert_eq!(
            range("bytes=50-500", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 50, 100)
        );
        assert_eq!(
            range("bytes=0-1,5-6", 100).unwrap(),
            (StatusCode::OK, 0, 100),
            "multiple ranges are ignored"
        );
        assert_eq!(range("items=0-1", 100).unwrap(), (StatusCode::OK, 0, 100));
        assert_eq!(
            range("bytes=1-18446744073709551615", 100).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 1, 100),
            "a last byte at u64::MAX does not overflow"
        );

        assert!(matches!(
            range("bytes=100-", 100),
            Err(Error::RangeNotSatisfiable { size: 100 })
        ));
        assert!(matches!(
            range("bytes=-0", 100),
            Err(Error::RangeNotSatisfiable { .. })
        ));
    }
}
