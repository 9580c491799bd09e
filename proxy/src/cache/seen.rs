//! What the admin's view of the cache knows beyond the index: under which
//! repositories each digest was served (for `cache ls`), and which digests
//! are being served right now (so that `cache rm` never takes content away
//! from a response that is still sending it).
//!
//! Repositories are kept in memory only, at most [`REPOS_PER_DIGEST`] per
//! digest (the most recent), so a restart forgets them; tags survive it in
//! `state.json` (see [`crate::tags`]). A response body holds a [`Serving`]
//! guard until it ends or is dropped: a hit's mapped file and a fill
//! follower's bytes alike.
//!
//! Lock order: this book's lock before the cache's state lock, never the
//! other way (`cache rm` checks both and removes under both).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use http_body::Body as _;

use super::{Cache, Entry};
use crate::body::{Body, BoxError};
use crate::digest::Digest;

/// Most repositories remembered per digest; the least recent goes first.
pub const REPOS_PER_DIGEST: usize = 8;
/// Digests whose repositories are remembered before those no longer in the
/// index are forgotten (the limit grows with the index).
const SEEN_DIGESTS: usize = 50_000;

impl Entry {
    /// An entry committed now.
    pub(super) fn new(size: u64, manifest: bool, generation: u64) -> Entry {
        Entry {
            size,
            manifest,
            generation,
            used: SystemTime::now(),
        }
    }
}

/// Marks an entry used now; a copy of it.
pub(super) fn used(e: &mut Entry) -> Entry {
    e.used = SystemTime::now();
    *e
}

/// Repositories seen and responses in flight, for the admin.
#[derive(Default)]
pub(super) struct Book {
    inner: Mutex<Inner>,
    /// Whether a `cache verify` runs: one at a time.
    pub(super) verifying: AtomicBool,
}

#[derive(Default)]
pub(super) struct Inner {
    /// Repositories each digest was served under, least recent first.
    pub(super) seen: HashMap<Digest, Vec<String>>,
    /// Response bodies sending each digest now.
    pub(super) serving: HashMap<Digest, usize>,
    /// `seen`'s size at which it is pruned next.
    limit: usize,
}

impl Book {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A response is sending a digest: `cache rm` refuses it until this drops.
pub struct Serving {
    cache: Arc<Cache>,
    digest: Digest,
}

impl Cache {
    /// A response is about to send `d`: until the guard drops (held by its
    /// body, `Serving::hold`), `cache rm` leaves `d` alone. Taken right
    /// after the cache lookup; a removal between the two takes nothing from
    /// the response, which has the file mapped already.
    pub fn serving(self: &Arc<Self>, d: &Digest) -> Serving {
        *self.book.lock().serving.entry(d.clone()).or_default() += 1;
        Serving {
            cache: Arc::clone(self),
            digest: d.clone(),
        }
    }

    /// Remembers that a client was given `d` under repository `name` (once
    /// it was authorized), for `cache ls`.
    pub fn seen(&self, d: &Digest, name: &str) {
        let mut book = self.book.lock();
        let book = &mut *book;
        if let Some(repos) = book.seen.get_mut(d) {
            if let Some(i) = repos.iter().position(|r| r == name) {
                // Already the most recent: the common case, no allocation.
                if i + 1 != repos.len() {
                    let r = repos.remove(i);
                    repos.push(r);
                }
                return;
            }
            if repos.len() >= REPOS_PER_DIGEST {
                repos.remove(0);
            }
            repos.push(name.to_owned());
            return;
        }
        if book.seen.len() >= book.limit.max(SEEN_DIGESTS) {
            // Forget evicted digests (book → state: the lock order).
            let st = self.lock();
            book.seen.retain(|d, _| st.index.contains(d));
            book.limit = 2 * book.seen.len();
        }
        book.seen.insert(d.clone(), vec![name.to_owned()]);
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut book = self.cache.book.lock();
        if let Some(n) = book.serving.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                book.serving.remove(&self.digest);
            }
        }
    }
}

impl Serving {
    /// `body`, holding this guard until it has sent its last byte or is
    /// dropped (the client hung up). A body with nothing to send drops it
    /// at once.
    pub fn hold(self, body: Body) -> Body {
        if body.is_end_stream() {
            return body;
        }
        let len = body.size_hint().exact();
        Body::stream(
            Held {
                body,
                guard: Some(self),
            },
            len,
        )
    }
}

/// A body that drops its guard at its end.
struct Held {
    body: Body,
    guard: Option<Serving>,
}

impl Stream for Held {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.guard = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.guard = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(f))) => {
                    // Trailers are not sent by these bodies: skip any.
                    if let Ok(data) = f.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_guard_counts_until_its_body_ends_and_repositories_are_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let c =
            Arc::new(Cache::open(&tmp.path().join("c"), 1 << 20, Arc::default(), true).unwrap());
        let d = Digest::of(b"x");
        let body = c.serving(&d).hold(Body::full(&b"xyz"[..]));
        assert_eq!(
            c.book.lock().serving.get(&d),
            Some(&1),
            "a held body counts"
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"xyz", "the held body sends what it wraps");
        assert!(
            c.book.lock().serving.is_empty(),
            "the guard drops at the end of its body"
        );
        let dropped = c.serving(&d).hold(Body::full(&b"xyz"[..]));
        drop(dropped);
        assert!(c.book.lock().serving.is_empty(), "and when it is dropped");

        c.seen(&d, "a");
        for i in 0..REPOS_PER_DIGEST + 2 {
            c.seen(&d, &format!("r{i}"));
        }
        c.seen(&d, "r4");
        let repos = c.book.lock().seen[&d].clone();
        assert_eq!(repos.len(), REPOS_PER_DIGEST, "repositories are bounded");
        assert_eq!(
            repos.last().map(String::as_str),
            Some("r4"),
            "most recent last"
        );
        assert!(
            !repos.contains(&"a".to_owned()),
            "the least recent went first"
        );
    }
}
