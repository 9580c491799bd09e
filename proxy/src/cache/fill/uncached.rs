//! A blob that will not be kept: streamed straight from the upstream to one
//! client, still checked against its digest and size.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};

use crate::body::BoxError;
use crate::budget::{Budget, Lane};
use crate::digest::Digest;
use crate::error::{Cause, Error, UpstreamError, Wait};
use crate::metrics::Metrics;

/// Streams a blob straight from upstream for one client, checking its digest
/// and size on the way; the last chunk is held back until they match, so a
/// wrong blob never ends cleanly. Used when a blob is not kept in the cache.
pub fn verified_stream(
    body: Incoming,
    digest: Digest,
    size: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    struct St {
        body: Incoming,
        hasher: Sha256,
        seen: u64,
        held: Option<Bytes>,
        done: bool,
    }
    let st = St {
        body,
        hasher: Sha256::new(),
        seen: 0,
        held: None,
        done: false,
    };
    stream::unfold(st, move |mut st| {
        let digest = digest.clone();
        let metrics = Arc::clone(&metrics);
        let budget = Arc::clone(&budget);
        async move {
            if st.done {
                return None;
            }
            loop {
                let next = tokio::time::timeout(timeout, st.body.frame()).await;
                let fail = |st: St, e: UpstreamError| {
                    let mut st = st;
                    st.done = true;
                    Some((Err(Error::Upstream(e).into()), st))
                };
                let url = || format!("blob {digest}");
                match next {
                    Err(_) => {
                        let wait = Wait::Body(timeout);
                        return fail(st, UpstreamError::Timeout { url: url(), wait });
                    }
                    Ok(Some(Err(e))) => {
                        let cause = Cause::new(e);
                        return fail(st, UpstreamError::Broken { url: url(), cause });
                    }
                    Ok(Some(Ok(f))) => {
                        let Ok(chunk) = f.into_data() else { continue };
                        st.seen += chunk.len() as u64;
                        // A client waits on this body: a pull.
                        budget.take(chunk.len() as u64, Lane::Pull).await;
                        st.hasher.update(&chunk);
                        metrics
                            .upstream_bytes
                            .fetch_add(chunk.len() as u64, Relaxed);
                        metrics
                            .served_upstream_bytes
                            .fetch_add(chunk.len() as u64, Relaxed);
                        if st.seen > size {
                            metrics.digest_mismatches.fetch_add(1, Relaxed);
                            let why = format!("{digest}: longer than announced");
                            return fail(st, UpstreamError::Invalid(why));
                        }
                        if let Some(prev) = st.held.replace(chunk) {
                            return Some((Ok(prev), st));
                        }
                    }
                    Ok(None) => {
                        let got = Digest::from_hasher(std::mem::take(&mut st.hasher));
                        if st.seen != size || got != digest {
                            metrics.digest_mismatches.fetch_add(1, Relaxed);
                            let expected = digest.clone();
                            return fail(st, UpstreamError::DigestMismatch { expected, got });
                        }
                        st.done = true;
                        return st.held.take().map(|b| (Ok(b), st));
                    }
                }
            }
        }
    })
}
