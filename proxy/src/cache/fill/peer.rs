//! A fill's first bytes from the peer that owns the digest (see
//! [`crate::peers`]): its answer, or `None` when the upstream is to be asked
//! instead. What the peer sends is checked like the upstream's: the digest
//! at the end, the size on the way (`source::Resumable`).

use http::StatusCode;
use hyper::body::Incoming;

use super::source::{content_length, content_range};
use crate::digest::Digest;
use crate::metrics::Fallback;
use crate::peers::Ask;

/// Asks the owner for the blob at `path`: its size and body.
pub(super) async fn start(ask: &Ask, path: &str, digest: &Digest) -> Option<(u64, Incoming)> {
    let owner = ask.owner;
    let why = match ask.peers.get(owner, path, None).await {
        Ok(r) if r.status() == StatusCode::OK => match content_length(r.headers()) {
            Some(size) if digest.admits_size(size) => {
                tracing::debug!(%digest, %owner, size, "filling from the peer that owns it");
                return Some((size, r.into_body()));
            }
            _ => Fallback::BadBytes,
        },
        Ok(r) => {
            tracing::debug!(%digest, %owner, status = %r.status(), "the owner has no blob for us");
            Fallback::Error
        }
        Err(why) => why,
    };
    tracing::info!(%digest, %owner, reason = ?why, "the owner did not serve it; asking the upstream");
    ask.peers.fell_back(owner, why);
    None
}

/// After `prev` broke off at byte `from`: the rest of the blob from the
/// digest's owner now (`prev` is no longer live), if that is another node
/// and it answers with exactly the bytes `from..size`. `None`: the upstream
/// sends the rest.
pub(super) async fn resume(
    prev: &Ask,
    digest: &Digest,
    path: &str,
    (from, size): (u64, u64),
    used: &[std::net::SocketAddr],
) -> Option<(Ask, Incoming)> {
    let owner = prev.peers.owner_among_unused(digest, used)?;
    let why = match prev.peers.get(owner, path, Some(from)).await {
        Ok(r)
            if r.status() == StatusCode::PARTIAL_CONTENT
                && content_range(r.headers()) == Some((from, Some(size))) =>
        {
            tracing::info!(%digest, %owner, from, "the digest's new owner sends the rest");
            let next = Ask {
                peers: std::sync::Arc::clone(&prev.peers),
                owner,
            };
            return Some((next, r.into_body()));
        }
        Ok(_) => Fallback::Error,
        Err(why) => why,
    };
    prev.peers.fell_back(owner, why);
    None
}
