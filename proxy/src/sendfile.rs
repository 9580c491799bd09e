//! Cache hits at `sendfile(2)` cost: the bytes of a cached blob or manifest
//! go from the page cache to the client's socket without a copy through
//! this process.
//!
//! Two halves, meeting at an address:
//!
//! - [`Mapped`]: a committed cache file's memory map, which registers the
//!   address range it occupies, and the file behind it, for as long as it
//!   is mapped. A hit's body is a slice of one, as before.
//! - [`Conn`]: the socket under every hyper connection of the API and peer
//!   listeners. When hyper writes a buffer that lies in a registered
//!   mapping, it sends the file's bytes at the same offset with `sendfile`
//!   instead of copying the mapped bytes with `writev`. Everything else is
//!   written as it was.
//!
//! **Why this, and not a front that parses requests itself.** hyper hands a
//! body's `Bytes` to the socket untouched (its write queue keeps each
//! frame's buffer, and vectored writes point into it), so the pointer it
//! writes says which file and offset the bytes come from. Hits are then
//! decided, authorized, counted and given their headers by the same handler
//! code as before (`api/blob`, `api/manifest`, `api/peer`); HEAD and `Range`
//! are slices like any other. And hyper still parses every request: header
//! and idle timeouts, keep-alive, pipelining, `Expect: 100-continue`,
//! chunked bodies, HTTP/1.0, absolute-form targets, bad heads, the
//! connection cap, the drain and the handover are what they were, with no
//! second HTTP parser to keep in step with it. The bytes are the same either
//! way: a committed file is never written or truncated (see
//! `cache/growing`), and the mapping and `sendfile` read the same page
//! cache. A fill's temp file is not registered: followers of a fill, relays
//! and everything else are written from memory, as before.
//!
//! A client that stops reading: `sendfile` returns `EAGAIN`, and the write
//! waits for the socket's readiness like any other; nothing is buffered in
//! this process beyond the slice hyper already holds (a mapping). A client
//! that hung up: `sendfile` cannot take `MSG_NOSIGNAL`, and needs none, as
//! Rust's runtime ignores `SIGPIPE` (the write fails with `EPIPE`).
//! A cache dir on a file system that cannot splice: the first failure says
//! so once, and hits are written from their mappings from then on.
//! `regproxy_sendfile_bytes_total` counts the bytes that left by
//! `sendfile`, on the API and the peer listener.
//!
//! Each mapped file keeps its descriptor open while mapped (the cache keeps
//! up to `cache::OPEN_FILES` of them): `serve` counts them in the open
//! files it asks for.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use rustix::net::SendFlags;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The mapped cache files: start address → (length, file).
static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());

struct Region {
    len: usize,
    file: Arc<File>,
}

/// A committed cache file's memory map, registered so that [`Conn`] sends
/// the bytes of slices of it with `sendfile`.
pub struct Mapped {
    map: memmap2::Mmap,
}

impl Mapped {
    /// Registers `map`, which maps `file` from offset 0, and wraps it as
    /// `Bytes`. The caller vouches that the file's bytes never change while
    /// mapped (see `cache/growing`).
    pub(crate) fn bytes(map: memmap2::Mmap, file: File) -> Bytes {
        let (start, len) = (map.as_ptr() as usize, map.len());
        let region = Region {
            len,
            file: Arc::new(file),
        };
        regions_mut().insert(start, region);
        Bytes::from_owner(Mapped { map })
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    // Before the unmap (the field is dropped after this): no other mapping
    // can take the address while it is still registered.
    fn drop(&mut self) {
        regions_mut().remove(&(self.map.as_ptr() as usize));
    }
}

fn regions_mut() -> std::sync::RwLockWriteGuard<'static, BTreeMap<usize, Region>> {
    // The map is consistent whatever panicked while holding it: every
    // change is one insert or remove.
    REGIONS.write().unwrap_or_else(|e| e.into_inner())
}

/// The file and offset `buf`'s bytes are mapped from, if `buf` lies wholly
/// in a registered mapping.
fn source(regions: &BTreeMap<usize, Region>, buf: &[u8]) -> Option<(Arc<File>, u64)> {
    if buf.is_empty() {
        return None;
    }
    let at = buf.as_ptr() as usize;
    let (&start, r) = regions.range(..=at).next_back()?;
    let offset = at - start;
    (offset.checked_add(buf.len())? <= r.len).then(|| (Arc::clone(&r.file), offset as u64))
}

/// Set for good once `sendfile` failed for a reason other than the socket:
/// a cache dir on a file system that cannot splice. Hits are written from
/// their mappings then, as before this path existed.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Whether `e`, from `sendfile`, says it cannot work here at all.
fn unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    matches!(errno, Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP))
}

/// How [`Conn`] writes a run of buffers: the plain ones before the first
/// mapped one, then that one's file bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Buffers at the start written from memory.
    pub plain: usize,
    /// Then, if any, the mapped buffer at index `plain`: its offset in its
    /// file.
    pub file_offset: Option<u64>,
}

/// The plan for `bufs` (see [`Plan`]), and the file of its mapped buffer.
fn plan(bufs: &[IoSlice<'_>]) -> (Plan, Option<Arc<File>>) {
    let regions = REGIONS.read().unwrap_or_else(|e| e.into_inner());
    for (i, b) in bufs.iter().enumerate() {
        if let Some((file, offset)) = source(&regions, b) {
            let p = Plan {
                plain: i,
                file_offset: Some(offset),
            };
            return (p, Some(file));
        }
    }
    let p = Plan {
        plain: bufs.len(),
        file_offset: None,
    };
    (p, None)
}

/// A loopback connection (the node's own runtime) gets Reno, which every
/// kernel has and lets anyone set, whatever the node's default congestion
/// control. With BBR, a common default, the kernel paces every flow with
/// timers, loopback ones included: there is no link to probe, and the
/// pacing only costs CPU and holds a hit below what the socket could take.
/// Connections from elsewhere (peers) keep the node's choice. A failure only
/// costs that.
fn unpaced(stream: &TcpStream) {
    let _ = rustix::net::sockopt::set_tcp_congestion(stream, "reno");
}

/// File bytes in one write from which [`Conn`] corks the socket: a smaller
/// slice (a manifest, a small layer) goes out in one segment anyway, behind
/// its head (`MSG_MORE`), and two `setsockopt` calls would only add to it.
const CORK_FROM: usize = 64 << 10;

/// A client connection's socket: mapped cache bytes leave by `sendfile`,
/// everything else as from a plain [`TcpStream`].
pub struct Conn {
    stream: TcpStream,
    /// `regproxy_sendfile_bytes_total`.
    sent: Arc<AtomicU64>,
    /// `TCP_CORK` is set: file bytes are being sent, and only whole
    /// segments leave until hyper's next flush (see [`Conn::cork`]).
    corked: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, sent: Arc<AtomicU64>) -> Conn {
        if stream.peer_addr().is_ok_and(|a| a.ip().is_loopback()) {
            unpaced(&stream);
        }
        Conn {
            stream,
            sent,
            corked: false,
        }
    }

    /// Holds partial segments back while file bytes are sent, until hyper
    /// flushes (its buffers are all in the socket then): what nginx's
    /// `tcp_nopush` does around `sendfile`. Without it, each `sendfile`
    /// pushes its tail as a segment of its own, which costs more CPU per
    /// byte than the copy it saves on loopback. A failure only costs that.
    fn cork(&mut self, on: bool) {
        if self.corked != on {
            self.corked = on;
            let _ = rustix::net::sockopt::set_tcp_cork(&self.stream, on);
        }
    }

    /// Runs `op` once the socket is writable; `EAGAIN` waits for readiness
    /// again (`try_io` clears it), so a client that does not read costs no
    /// spinning.
    fn poll_io<R>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_io(Interest::WRITABLE, &mut op) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Stops using `sendfile` in this process, saying why once.
    fn give_up(&self, e: &io::Error) {
        if !UNSUPPORTED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "sendfile cannot send cache files here; hits are written from memory");
        }
    }

    /// Sends `len` bytes of `file` from `offset`. A file shorter than its
    /// mapping (it cannot be, see [`Mapped::bytes`]) ends the connection
    /// rather than the body being taken for complete.
    fn send_file(&self, file: &File, offset: u64, len: usize) -> io::Result<usize> {
        let mut at = offset;
        let n = rustix::fs::sendfile(&self.stream, file, Some(&mut at), len)?;
        if n == 0 && len > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "a cached file is shorter than its mapping",
            ));
        }
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if UNSUPPORTED.load(Ordering::Relaxed) {
            return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        }
        let (plan, file) = plan(bufs);
        let (Some(file), Some(offset)) = (file, plan.file_offset) else {
            return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        };
        let mapped = bufs[plan.plain].len();
        if mapped >= CORK_FROM {
            self.cork(true);
        }
        if plan.plain == 0 {
            return match ready!(self.poll_io(cx, || self.send_file(&file, offset, mapped))) {
                Err(e) if unsupported(&e) => {
                    self.give_up(&e);
                    Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
                }
                r => Poll::Ready(r),
            };
        }
        // The head before the file's bytes, held back (`MSG_MORE`) to share
        // their first packet.
        let head = &bufs[..plan.plain];
        let want: usize = head.iter().map(|b| b.len()).sum();
        let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
        let wrote = ready!(self.poll_io(cx, || {
            let mut none = rustix::net::SendAncillaryBuffer::default();
            rustix::net::sendmsg(&self.stream, head, &mut none, flags).map_err(io::Error::from)
        }))?;
        if wrote < want {
            return Poll::Ready(Ok(wrote));
        }
        // What was written is reported even if the file's bytes must wait.
        match self
            .stream
            .try_io(Interest::WRITABLE, || self.send_file(&file, offset, mapped))
        {
            Ok(n) => Poll::Ready(Ok(wrote + n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Poll::Ready(Ok(wrote))
            }
            // The head is out; the next write takes the plain path.
            Err(e) if unsupported(&e) => {
                self.give_up(&e);
                Poll::Ready(Ok(wrote))
            }
            // The head went out: say so. The next write starts with the
            // file's bytes and meets the error again.
            Err(_) => Poll::Ready(Ok(wrote)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper queues bodies' buffers (rather than copying them into one)
        // only for a vectored writer: that is what keeps their addresses.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes once everything it had to write is written.
        self.cork(false);
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
