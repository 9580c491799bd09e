//! A fill's first bytes from the peer that owns the digest (see
//! [`crate::peers`]): its answer, or `None` when the upstream is to be asked
//! instead. What the peer sends is checked like the upstream's: the digest
//! at the end, the size on the way (`source::Resumable`).

use http::StatusCode;
use hyper::body::Incoming;

use super::source::content_length;
use crate::digest::Digest;
use crate::metrics::Fallback;
use crate::peers::Ask;

/// Asks the owner for the blob at `path`: its size and body.
pub(super) async fn start(ask: &Ask, path: &str, digest: &Digest) -> Option<(u64, Incoming)> {
    let owner = ask.owner;
    let why = match ask.peers.get(owner, path).await {
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
