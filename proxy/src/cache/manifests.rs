//! Manifests by digest, stored whole: small, already in memory and
//! verified by the caller, written with their media type beside them.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use super::{Cache, Stored};
use crate::digest::Digest;

impl Cache {
    /// Stores a verified manifest (small, already in memory).
    pub async fn put_manifest(self: &Arc<Self>, d: Digest, media_type: String, bytes: Bytes) {
        let this = Arc::clone(self);
        let size = bytes.len() as u64;
        let _ = tokio::task::spawn_blocking(move || {
            // Not kept: the disk's state change is logged, not each manifest.
            if this.reserve(size, false).is_err() {
                return;
            }
            let failed = |e: std::io::Error| {
                if this.disk.write_failed(&e, size) {
                    tracing::debug!(digest = %d, error = %e, "could not cache manifest: the disk is full");
                } else {
                    tracing::warn!(digest = %d, error = %e, "could not cache manifest");
                }
            };
            let (mut f, p) = match this.temp_file() {
                Ok(x) => x,
                Err(e) => {
                    failed(e);
                    return this.release(size, None);
                }
            };
            if let Err(e) = f.write_all(&bytes) {
                failed(e);
                return this.release(size, Some(&p));
            }
            // `commit` releases the reservation whatever happens.
            if let Err(e) = this.commit(&d, size, &p, Stored::Manifest(&f, &media_type)) {
                failed(e);
            }
        })
        .await;
    }
}
