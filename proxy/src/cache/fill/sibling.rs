//! A fill's bytes taken from another process's fill of the same digest:
//! during a handover, the process being replaced may be filling a blob
//! that a client of its successor asks for. The successor reads the bytes
//! the other process has written (it publishes how many are final beside
//! its temp file) instead of fetching the blob again, and checks them
//! against the digest as it would the upstream's. If the other fill stops
//! (its process died, or it failed and removed its file) or stalls, the
//! fill resumes from the upstream with `Range` from the first byte it
//! lacks (see `source`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::cache::shared::SiblingFill;
use crate::error::Error;

/// How often the other fill's progress is read while it has nothing new.
const POLL: Duration = Duration::from_millis(10);
/// How often, without progress, whether the other fill can still make any.
const CHECK_ALIVE: Duration = Duration::from_millis(500);
/// Largest chunk read at once.
const CHUNK: u64 = 256 << 10;

/// The bytes of a sibling process's fill, in order, as they become final.
pub(super) struct Tail {
    sibling: SiblingFill,
    part: std::sync::Arc<File>,
    written: std::sync::Arc<File>,
    pos: u64,
    /// Longest wait for new bytes (the upstream timeout: the other fill
    /// waits that long for its upstream before it gives up).
    stall: Duration,
}

impl Tail {
    pub(super) fn open(sibling: SiblingFill, stall: Duration) -> io::Result<Tail> {
        // Opened now, the temp file stays readable when the other process
        // renames it into place (or removes it).
        let part = File::open(&sibling.part)?;
        let written = File::open(&sibling.written)?;
        Ok(Tail {
            sibling,
            part: part.into(),
            written: written.into(),
            pos: 0,
            stall,
        })
    }

    pub(super) fn size(&self) -> u64 {
        self.sibling.size
    }

    /// The next bytes; `None` once all have come. An error says the other
    /// fill will bring no more.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        let size = self.sibling.size;
        let mut since = Instant::now();
        let mut checked = Instant::now();
        loop {
            if self.pos == size {
                return Ok(None);
            }
            let (part, written, pos) = (self.part.clone(), self.written.clone(), self.pos);
            let read = tokio::task::spawn_blocking(move || -> io::Result<Option<Bytes>> {
                let ready = SiblingFill::written(&written)?.min(size);
                if ready <= pos {
                    return Ok(None);
                }
                let mut buf = BytesMut::zeroed((ready - pos).min(CHUNK) as usize);
                part.read_exact_at(&mut buf, pos)?;
                Ok(Some(buf.freeze()))
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
            match read {
                Ok(Some(chunk)) => {
                    self.pos += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Ok(None) => {}
                Err(e) => return Err(stopped(e)),
            }
            if since.elapsed() > self.stall {
                return Err(stopped(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no progress",
                )));
            }
            if checked.elapsed() > CHECK_ALIVE {
                checked = Instant::now();
                let s = self.sibling.clone();
                if !tokio::task::spawn_blocking(move || s.alive())
                    .await
                    .unwrap_or(false)
                {
                    // A last look: it may have written its last bytes and
                    // committed between two polls.
                    since = Instant::now() - self.stall;
                    continue;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn stopped(e: io::Error) -> Error {
    Error::disk("follow another process's fill", e)
}
