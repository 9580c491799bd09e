//! A fill's bytes on their way from the network to the temp file: gathered
//! in batches within a process-wide memory budget, written and hashed on the
//! blocking pool while the next batch is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;

use super::{Fill, Progress};
use crate::cache::growing::Growing;

/// Upstream bytes gathered before one write to the temp file, when the
/// budget allows: few large writes while memory is plentiful.
const WRITE_BATCH: usize = 256 << 10;
/// A chunk that comes this long after the last batch was sent to disk is
/// written at once however small the batch, and a batch's bytes are
/// published as soon as they are on disk: on a slow uplink (or a slow owner,
/// for the nodes that fill from this one) readers see bytes as they trickle
/// in, not once per [`WRITE_BATCH`].
const BATCH_AGE: std::time::Duration = std::time::Duration::from_millis(500);
/// Bytes that all fills together may hold between the upstream socket and
/// the temp file (gathering, or on their way to disk), whatever the number
/// of fills. Past half of it, fills stop gathering and write each chunk as
/// it comes; when it is spent, a fill waits for room before it takes the
/// next chunk off its connection, so the upstream is slowed by TCP instead
/// of memory growing. Chunks are at most the upstream client's read buffer
/// (`upstream::READ_BUF`), so a fill never waits for more than exists.
pub const BUFFER_BUDGET: usize = 16 << 20;
/// Below this many free bytes of the budget, fills write chunk by chunk.
const GATHER_FLOOR: usize = BUFFER_BUDGET / 2;

/// The process-wide budget of [`BUFFER_BUDGET`] bytes, in permits of a byte.
static BUFFERS: Semaphore = Semaphore::const_new(BUFFER_BUDGET);

/// The temp file and the hash of what is in it; they travel together to the
/// blocking pool and back.
pub(super) struct Sink {
    pub file: Growing,
    pub hasher: Sha256,
    /// Where how many bytes are final is published for other processes
    /// sharing the cache dir (see `cache::shared`).
    pub progress: File,
}

/// Writes a fill's chunks to its temp file in batches and tells the fill's
/// readers each time more bytes are final. Every byte it holds is counted in
/// [`BUFFERS`].
pub(super) struct Writer {
    fill: Arc<Fill>,
    /// Away while a batch is written.
    sink: Option<Sink>,
    pending: Option<JoinHandle<io::Result<Sink>>>,
    batch: Vec<Bytes>,
    batch_len: usize,
    /// When the last batch was sent to disk.
    last_batch: tokio::time::Instant,
    /// The budget held by `batch`; it goes with the batch to disk.
    batch_room: Option<SemaphorePermit<'static>>,
}

impl Writer {
    pub(super) fn new(fill: Arc<Fill>, file: Growing, progress: File) -> Writer {
        fill.set(Progress::Streaming {
            size: file.size(),
            written: file.readable(),
        });
        Writer {
            fill,
            sink: Some(Sink {
                file,
                hasher: Sha256::new(),
                progress,
            }),
            pending: None,
            batch: Vec::new(),
            batch_len: 0,
            last_batch: tokio::time::Instant::now(),
            batch_room: None,
        }
    }

    pub(super) async fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        let room = match BUFFERS.try_acquire_many(chunk.len().min(BUFFER_BUDGET) as u32) {
            Ok(p) => p,
            Err(_) => {
                // The budget is spent: give back what this fill holds (its
                // bytes go to disk), then wait for room for this chunk.
                self.flush().await?;
                room_for(chunk.len()).await
            }
        };
        match &mut self.batch_room {
            Some(r) => r.merge(room),
            None => self.batch_room = Some(room),
        }
        self.batch_len += chunk.len();
        self.batch.push(chunk);
        if self.batch_len >= WRITE_BATCH
            || BUFFERS.available_permits() < GATHER_FLOOR
            || self.last_batch.elapsed() >= BATCH_AGE
        {
            self.start_batch().await?;
        }
        Ok(())
    }

    /// Writes everything received so far, for the readers to see.
    pub(super) async fn flush(&mut self) -> io::Result<()> {
        self.start_batch().await?;
        self.finish_pending().await
    }

    /// Writes everything and hands back the file and its hash.
    pub(super) async fn finish(mut self) -> io::Result<Sink> {
        self.flush().await?;
        Ok(self.sink.take().expect("no batch in flight after a flush"))
    }

    /// Waits for the batch in flight, publishes its bytes, and sends the
    /// gathered chunks to disk.
    async fn start_batch(&mut self) -> io::Result<()> {
        self.finish_pending().await?;
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_len = 0;
        self.last_batch = tokio::time::Instant::now();
        let room = self.batch_room.take();
        let mut sink = self.sink.take().expect("one batch at a time");
        let fill = Arc::clone(&self.fill);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            sink.file.append(&batch)?;
            for b in &batch {
                sink.hasher.update(b);
            }
            let written = sink.file.readable().len() as u64;
            // In place, in the file's only block: a full disk does not fail
            // it, and a failure only stalls a follower into the upstream.
            let _ = sink.progress.write_all_at(&written.to_le_bytes(), 0);
            // Readers see the bytes now, not when the next batch starts.
            fill.advance(sink.file.size(), sink.file.readable());
            // The bytes are on disk: their room goes back to the budget.
            drop((batch, room));
            Ok(sink)
        }));
        Ok(())
    }

    async fn finish_pending(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let sink = p.await.map_err(io::Error::other)??;
        self.fill.advance(sink.file.size(), sink.file.readable());
        self.sink = Some(sink);
        Ok(())
    }
}

/// Room in [`BUFFERS`] for `n` bytes held in memory; waits while the budget
/// is spent (waiters are served first come, first served).
async fn room_for(n: usize) -> SemaphorePermit<'static> {
    BUFFERS
        .acquire_many(n.min(BUFFER_BUDGET) as u32)
        .await
        .expect("the budget is never closed")
}
