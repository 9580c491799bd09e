//! Memory maps of cache files, and the one `unsafe` block they need.
//!
//! Two kinds of file are mapped, and the reasoning that makes the mapping
//! sound for each is kept here, next to the code it depends on:
//!
//! - committed content ([`map_committed`]): never written after its rename
//!   into `sha256/`, and removed by unlink, never truncated;
//! - a fill's temp file ([`Growing`]): sized once before it is mapped, then
//!   only appended to, by [`Growing::append`], past the bytes it has handed
//!   out; readers get slices of the bytes written so far, never more.
//!
//! Nobody else may write into the cache dir (the README says so, and the
//! cache lock keeps a second regproxy out). A successor that shares the dir
//! during a handover writes only in its own temp dir and may rename a
//! verified copy over committed content: a rename replaces the name, never
//! the bytes of the file a mapping holds.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

/// Maps a committed cache file read-only as `Bytes`.
/// The mapping is registered for `sendfile` (see [`crate::sendfile`]).
pub(super) fn map_committed(file: File) -> io::Result<Bytes> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // For `mmap`'s SAFETY: a committed file is never written after its
    // rename, and eviction unlinks it, so the whole file is final; and so
    // `sendfile` of it sends the bytes the mapping holds.
    let m = mmap(&file, len)?;
    Ok(crate::sendfile::Mapped::bytes(m, file))
}

/// A fill's temp file: its final size is set before it is mapped, and its
/// bytes are written once, in order. Readers get only the bytes written so
/// far ([`Growing::readable`]), which never change again.
///
/// It owns the file, so that nothing else can write into the mapping.
pub struct Growing {
    file: File,
    /// The whole file, mapped. Never handed out past `written`.
    map: Bytes,
    /// Bytes at the start of the file that are on disk and final.
    written: u64,
}

impl Growing {
    /// Sizes `file` (fresh and empty, created by the cache) to `size` bytes
    /// and maps it.
    pub fn new(file: File, size: u64) -> io::Result<Growing> {
        file.set_len(size)?;
        // For `map`'s SAFETY: `file` is owned from here on, and `append` is
        // the only code that writes to it.
        let map = map(&file, size)?;
        Ok(Growing {
            file,
            map,
            written: 0,
        })
    }

    /// The size the file was created with.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// The bytes written so far: a slice that never changes.
    pub fn readable(&self) -> Bytes {
        self.map.slice(..self.written as usize)
    }

    /// Appends `bufs` after the bytes written so far. Blocking: call it on
    /// the blocking pool. Writing past the size set at creation is an error,
    /// so a mapping never sees the file grow under it.
    pub fn append(&mut self, bufs: &[Bytes]) -> io::Result<()> {
        for b in bufs {
            let end = self.written + b.len() as u64;
            if end > self.size() {
                return Err(io::Error::other("write past the size of the temp file"));
            }
            // Only at and past `written`: no byte a reader was given changes.
            self.file.write_all_at(b, self.written)?;
            self.written = end;
        }
        Ok(())
    }

    /// Puts the written bytes on stable storage. Blocking.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Once every byte is written: the whole file, final from now on (any
    /// further `append` would be past the size, and is refused).
    pub fn complete(&self) -> Option<Bytes> {
        (self.written == self.size()).then(|| self.map.clone())
    }
}

/// Maps the first `len` bytes of `file` read-only; an empty file is an empty
/// buffer (a zero-length mapping is an error).
fn map(file: &File, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    Ok(Bytes::from_owner(mmap(file, len)?))
}

/// Maps the first `len` (> 0) bytes of `file` read-only.
#[allow(unsafe_code)]
fn mmap(file: &File, len: u64) -> io::Result<memmap2::Mmap> {
    // SAFETY: a mapping is undefined behaviour only if bytes that a `&[u8]`
    // into it covers change, or the file shrinks under it. The callers above
    // hold that for both kinds of file: committed content is never written
    // and never truncated; a temp file is sized before this call, owned by
    // its `Growing`, written only by `Growing::append` at offsets past every
    // slice `Growing::readable` has handed out, and never truncated.
    unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file() -> (File, tempfile::TempPath) {
        tempfile::NamedTempFile::new().unwrap().into_parts()
    }

    #[test]
    fn hands_out_only_what_is_written() {
        let (f, p) = temp_file();
        let mut g = Growing::new(f, 6).unwrap();
        assert!(
            g.readable().is_empty(),
            "nothing is readable before a write"
        );
        g.append(&[Bytes::from_static(b"abc")]).unwrap();
        let first = g.readable();
        assert_eq!(&first[..], b"abc");
        g.append(&[Bytes::from_static(b"de"), Bytes::from_static(b"f")])
            .unwrap();
        assert_eq!(&first[..], b"abc", "a slice handed out never changes");
        assert!(
            g.append(&[Bytes::from_static(b"g")]).is_err(),
            "a write past the announced size is refused"
        );
        let all = g.complete().expect("all six bytes are written");
        assert_eq!(&all[..], b"abcdef");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn an_incomplete_file_is_not_complete() {
        let (f, p) = temp_file();
        let mut g = Growing::new(f, 4).unwrap();
        g.append(&[Bytes::from_static(b"ab")]).unwrap();
        assert!(g.complete().is_none(), "two of four bytes are not all");
        let (f, _) = temp_file();
        let g = Growing::new(f, 0).unwrap();
        assert!(
            g.complete().is_some_and(|b| b.is_empty()),
            "an empty blob is complete at once"
        );
        std::fs::remove_file(p).unwrap();
    }
}
