use super::*;

use std::future::poll_fn;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};

// ---- the registry ----

/// An unnamed temp file holding `content`.
fn temp_file(content: &[u8]) -> File {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(content).unwrap();
    f
}

/// `content` in a temp file, mapped and registered as the cache maps
/// committed content (`cache/growing`).
fn mapped(content: &[u8]) -> Bytes {
    let f = temp_file(content);
    Mapped::bytes(map(&f, content.len()), f)
}

#[allow(unsafe_code)]
fn map(file: &File, len: usize) -> memmap2::Mmap {
    // SAFETY: `file` is this test's own unnamed temp file, written in full
    // before it is mapped; nothing writes or truncates it afterwards.
    unsafe { memmap2::MmapOptions::new().len(len).map(file) }.unwrap()
}

/// `len` bytes that differ from one offset to the next, so that a byte from
/// the wrong offset shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 251) as u8 ^ seed)
        .collect()
}

/// Heap memory registered as if bytes `at` of it mapped `file` from offset
/// 0: a test can then place slices anywhere around a region's ends, which
/// slices of a real mapping's `Bytes` cannot. Deregistered when dropped,
/// before the memory is freed.
struct Fake {
    mem: Vec<u8>,
    start: usize,
}

impl Fake {
    fn new(mem: Vec<u8>, at: Range<usize>, file: File) -> Fake {
        assert!(at.end <= mem.len());
        let start = mem.as_ptr() as usize + at.start;
        let region = Region {
            len: at.len(),
            file: Arc::new(file),
        };
        assert!(regions_mut().insert(start, region).is_none());
        Fake { mem, start }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        regions_mut().remove(&self.start);
    }
}

fn plain(n: usize) -> Plan {
    Plan {
        plain: n,
        file_offset: None,
    }
}

fn from_file(plain: usize, offset: u64) -> Plan {
    Plan {
        plain,
        file_offset: Some(offset),
    }
}

/// `len` bytes of `file` at `offset`.
fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    file.read_exact_at(&mut b, offset).unwrap();
    b
}

#[test]
fn heap_buffers_are_written_from_memory() {
    let (a, b) = (vec![1u8; 10], vec![2u8; 20]);
    let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
    let (p, file) = plan(&bufs);
    assert_eq!(p, plain(2));
    assert!(file.is_none());
}

#[test]
fn the_first_mapped_buffer_is_sent_from_its_file_at_its_offset() {
    let (ca, cb) = (pattern(10_000, 1), pattern(5_000, 2));
    let (a, b) = (mapped(&ca), mapped(&cb));
    let heap = vec![7u8; 100];

    let bufs = [
        IoSlice::new(&heap),
        IoSlice::new(&a[100..300]),
        IoSlice::new(&b[0..10]),
    ];
    let (p, file) = plan(&bufs);
    assert_eq!(p, from_file(1, 100));
    assert_eq!(read_at(&file.unwrap(), 100, 200), &ca[100..300]);

    // The other mapping first: its own file, its own offset.
    let bufs = [IoSlice::new(&b[4_000..4_999]), IoSlice::new(&a[..])];
    let (p, file) = plan(&bufs);
    assert_eq!(p, from_file(0, 4_000));
    assert_eq!(read_at(&file.unwrap(), 4_000, 999), &cb[4_000..4_999]);

    // The whole mapping, and its last byte.
    for (range, at) in [(0..10_000, 0), (9_999..10_000, 9_999)] {
        let bufs = [IoSlice::new(&heap), IoSlice::new(&a[range])];
        assert_eq!(plan(&bufs).0, from_file(1, at));
    }
    // Empty buffers are never sent from a file, even inside a mapping.
    let bufs = [IoSlice::new(&a[50..50]), IoSlice::new(&heap[..0])];
    assert_eq!(plan(&bufs).0, plain(2));
    let bufs = [IoSlice::new(&a[50..50]), IoSlice::new(&a[60..61])];
    assert_eq!(plan(&bufs).0, from_file(1, 60));
}

#[test]
fn buffers_not_wholly_inside_a_mapping_are_plain() {
    // Bytes 20..60 of the memory "map" the file; the rest is unregistered.
    let fake = Fake::new(vec![0; 100], 20..60, temp_file(&[0; 40]));
    let m = &fake.mem;
    let one = |r: Range<usize>| plan(&[IoSlice::new(&m[r])]).0;
    assert_eq!(one(20..60), from_file(0, 0), "exactly the mapping");
    assert_eq!(one(30..40), from_file(0, 10));
    assert_eq!(one(59..60), from_file(0, 39), "its last byte");
    assert_eq!(one(10..30), plain(1), "starts before it");
    assert_eq!(one(19..60), plain(1), "one byte before it");
    assert_eq!(one(50..70), plain(1), "runs past its end");
    assert_eq!(one(20..61), plain(1), "one byte past its end");
    assert_eq!(one(0..100), plain(1), "covers it and more");
    assert_eq!(one(60..70), plain(1), "right after it");
    assert_eq!(one(0..20), plain(1), "right before it");
    assert_eq!(one(30..30), plain(1), "empty, inside it");
    // A plain buffer that straddles does not hide a mapped one after it.
    let bufs = [IoSlice::new(&m[50..70]), IoSlice::new(&m[25..26])];
    assert_eq!(plan(&bufs).0, from_file(1, 5));
}

#[test]
fn a_mapping_is_registered_until_its_last_slice_is_dropped() {
    let content = pattern(4_096 + 17, 3);
    let whole = mapped(&content);
    let slice = whole.slice(1_000..2_000);
    let file = plan(&[IoSlice::new(&slice)]).1.expect("mapped");
    // Ours, however a parallel test's mapping may take the address later.
    let ours = || {
        let regions = REGIONS.read().unwrap();
        regions.values().any(|r| Arc::ptr_eq(&r.file, &file))
    };
    drop(whole);
    assert!(ours(), "a slice keeps the mapping, and its registration");
    assert_eq!(plan(&[IoSlice::new(&slice)]).0, from_file(0, 1_000));
    drop(slice);
    assert!(!ours(), "the dropped mapping is deregistered");
}

// ---- Conn over loopback TCP ----

/// A connected pair: the server end as a [`Conn`] counting into the
/// returned counter, and the client's end. `sndbuf`/`rcvbuf` shrink the
/// server's send and the client's receive buffer.
async fn pair(sndbuf: Option<u32>, rcvbuf: Option<u32>) -> (Conn, TcpStream, Arc<AtomicU64>) {
    let listener = TcpSocket::new_v4().unwrap();
    if let Some(n) = sndbuf {
        // Accepted sockets inherit it.
        listener.set_send_buffer_size(n).unwrap();
    }
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener: TcpListener = listener.listen(1).unwrap();
    let client = TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        client.set_recv_buffer_size(n).unwrap();
    }
    let (client, accepted) = tokio::join!(
        client.connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let sent = Arc::new(AtomicU64::new(0));
    let conn = Conn::new(accepted.unwrap().0, Arc::clone(&sent));
    (conn, client.unwrap(), sent)
}

/// What writing through [`write_all`] took.
#[derive(Default)]
struct Writes {
    /// Calls of `poll_write_vectored`.
    polls: AtomicUsize,
    /// Calls that took less than all they were offered.
    partial: AtomicUsize,
    /// Calls that returned `Pending`.
    pending: AtomicUsize,
}

/// Writes all of `parts` through `poll_write_vectored` as hyper does: what a
/// call took is dropped from the front, the rest offered again; then
/// flushes. `on_pending` runs each time the socket is full.
async fn write_all(
    conn: &mut Conn,
    parts: &[&[u8]],
    w: &Writes,
    mut on_pending: impl FnMut(),
) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let offered: usize = parts.iter().map(|p| p.len()).sum();
        let n = poll_fn(|cx| {
            w.polls.fetch_add(1, Ordering::Relaxed);
            let bufs: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            let r = Pin::new(&mut *conn).poll_write_vectored(cx, &bufs);
            if r.is_pending() {
                w.pending.fetch_add(1, Ordering::Relaxed);
                on_pending();
            }
            r
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < offered {
            w.partial.fetch_add(1, Ordering::Relaxed);
        }
        let mut left = n;
        while left > 0 {
            let take = left.min(parts[0].len());
            parts[0] = &parts[0][take..];
            left -= take;
            if parts[0].is_empty() {
                parts.remove(0);
            }
        }
    }
    poll_fn(|cx| Pin::new(&mut *conn).poll_flush(cx)).await
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[tokio::test]
async fn mixed_buffers_arrive_exactly_and_only_mapped_bytes_count() {
    let content = pattern(300_000, 4);
    let m = mapped(&content);
    let (h1, h2, h3) = (pattern(100, 5), pattern(7_000, 6), pattern(3, 7));
    let parts: [&[u8]; 9] = [
        &h1,
        &m[0..1_000],
        b"\r\n",
        &m[5_000..180_000],
        &h2,
        &h3,
        &m[299_000..300_000],
        &m[10..11],
        &h1[..0],
    ];
    let mapped_len = 1_000 + 175_000 + 1_000 + 1;
    let (mut conn, mut client, sent) = pair(None, None).await;
    let w = Writes::default();
    let write = async {
        write_all(&mut conn, &parts, &w, || {}).await.unwrap();
        // Heap buffers alone are written from memory.
        write_all(&mut conn, &[&h2, &h1], &w, || {}).await.unwrap();
        poll_fn(|cx| Pin::new(&mut conn).poll_shutdown(cx))
            .await
            .unwrap();
    };
    let mut got = Vec::new();
    let read = client.read_to_end(&mut got);
    let ((), n) = tokio::join!(write, read);
    n.unwrap();
    let mut want = concat(&parts);
    want.extend_from_slice(&h2);
    want.extend_from_slice(&h1);
    assert!(
        got == want,
        "{} bytes arrived, {} were written",
        got.len(),
        want.len()
    );
    assert_eq!(sent.load(Ordering::Relaxed), mapped_len);
}

#[tokio::test]
async fn a_registered_buffer_leaves_from_its_file_not_its_memory() {
    // The memory says 'm', the file 'f': what arrives says which was sent.
    let fake = Fake::new(vec![b'm'; 50_000], 0..50_000, temp_file(&[b'f'; 50_000]));
    let (mut conn, mut client, sent) = pair(None, None).await;
    let w = Writes::default();
    let parts: [&[u8]; 3] = [b"head:", &fake.mem[1_000..41_000], b":tail"];
    let write = async {
        write_all(&mut conn, &parts, &w, || {}).await.unwrap();
        drop(conn);
    };
    let mut got = Vec::new();
    let ((), n) = tokio::join!(write, client.read_to_end(&mut got));
    n.unwrap();
    let mut want = b"head:".to_vec();
    want.extend_from_slice(&[b'f'; 40_000]);
    want.extend_from_slice(b":tail");
    assert!(got == want, "the file's bytes, not the memory's");
    assert_eq!(sent.load(Ordering::Relaxed), 40_000);
}

#[tokio::test]
async fn large_file_writes_are_corked_until_the_flush() {
    let m = mapped(&pattern(2 * CORK_FROM, 8));
    let (mut conn, _client, _sent) = pair(None, None).await;
    let cork = |c: &Conn| rustix::net::sockopt::tcp_cork(&c.stream).unwrap();
    let n = poll_fn(|cx| Pin::new(&mut conn).poll_write(cx, b"plain"))
        .await
        .unwrap();
    assert_eq!(n, 5);
    assert!(!cork(&conn), "plain writes are not corked");
    let bufs = [IoSlice::new(b"head"), IoSlice::new(&m[..100])];
    let n = poll_fn(|cx| Pin::new(&mut conn).poll_write_vectored(cx, &bufs))
        .await
        .unwrap();
    assert_eq!(n, 104);
    assert!(!cork(&conn), "a small file slice goes out behind its head");
    let bufs = [IoSlice::new(b"head"), IoSlice::new(&m[..CORK_FROM])];
    let n = poll_fn(|cx| Pin::new(&mut conn).poll_write_vectored(cx, &bufs))
        .await
        .unwrap();
    assert!(n >= 4, "{n}");
    assert!(cork(&conn), "large file slices wait for whole segments");
    poll_fn(|cx| Pin::new(&mut conn).poll_flush(cx))
        .await
        .unwrap();
    assert!(!cork(&conn), "the flush lets the tail go");
}

/// Eight responses, each a head and a slice of `m`, then all of `m`.
fn responses<'a>(m: &'a [u8], heads: &'a [Vec<u8>]) -> Vec<&'a [u8]> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for (i, h) in heads.iter().enumerate() {
        parts.push(h);
        parts.push(&m[i * 100_000..i * 100_000 + 90_001]);
    }
    parts.push(m);
    parts
}

#[tokio::test]
async fn small_buffers_and_a_reader_that_pauses_still_get_exact_bytes() {
    let m = mapped(&pattern(1 << 20, 9));
    let heads: Vec<Vec<u8>> = (0..8).map(|i| pattern(10 + 999 * i, i as u8)).collect();
    let want = concat(&responses(&m, &heads));
    let mapped_len = 8 * 90_001 + (1 << 20);

    let (mut conn, mut client, sent) = pair(Some(4_096), Some(4_096)).await;
    let w = Arc::new(Writes::default());
    // Counts the writer's `Pending`s (the reader pauses until the next
    // one), or `DONE`.
    const DONE: usize = usize::MAX;
    let (blocked_tx, mut blocked) = tokio::sync::watch::channel(0usize);
    let writer = {
        let w = Arc::clone(&w);
        tokio::spawn(async move {
            let parts = responses(&m, &heads);
            let r = write_all(&mut conn, &parts, &w, || {
                blocked_tx.send_modify(|n| *n += 1);
            })
            .await;
            drop(conn);
            blocked_tx.send_replace(DONE);
            r
        })
    };
    let mut got = Vec::new();
    let mut buf = vec![0; 64 << 10];
    let mut pauses = 0;
    loop {
        // Read at most ~128 KiB, then stop reading until the writer finds
        // the socket full (or is done).
        let mut since = 0;
        while since < 128 << 10 {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            since += n;
        }
        if since < 128 << 10 {
            break;
        }
        let seen = *blocked.borrow_and_update();
        if seen == DONE {
            continue;
        }
        let now = *tokio::time::timeout(Duration::from_secs(60), blocked.wait_for(|n| *n > seen))
            .await
            .expect("the writer blocks or ends")
            .unwrap();
        if now != DONE {
            pauses += 1;
            // Blocked on a reader that does not read: the writer waits for
            // the socket rather than polling again and again.
            let polls = w.polls.load(Ordering::Relaxed);
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            let again = w.polls.load(Ordering::Relaxed) - polls;
            assert!(again < 20, "{again} polls while the reader paused");
        }
    }
    writer.await.unwrap().unwrap();
    assert!(
        got == want,
        "{} bytes arrived, {} were written",
        got.len(),
        want.len()
    );
    assert_eq!(sent.load(Ordering::Relaxed), mapped_len as u64);
    assert!(
        pauses >= 2,
        "the reader paused on a full socket {pauses} times"
    );
    assert!(
        w.partial.load(Ordering::Relaxed) > 0,
        "some writes were partial"
    );
    assert!(w.pending.load(Ordering::Relaxed) > 0);
}

/// Writes `head` and then a large mapping to a client that reads a little
/// and hangs up: the write ends in an error.
async fn reader_hangs_up(head: &'static [u8]) {
    let m = mapped(&pattern(8 << 20, 10));
    let (mut conn, mut client, sent) = pair(Some(4_096), Some(4_096)).await;
    let writer = tokio::spawn(async move {
        let w = Writes::default();
        write_all(&mut conn, &[head, &m[..]], &w, || {}).await
    });
    let mut first = vec![0; 1_000];
    client.read_exact(&mut first).await.unwrap();
    drop(client);
    let r = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the write ends");
    let e = r
        .unwrap()
        .expect_err("a write to a closed connection fails");
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "{e}"
    );
    assert!(sent.load(Ordering::Relaxed) < 8 << 20);
}

#[tokio::test]
async fn a_reader_that_hangs_up_ends_a_file_write_in_an_error() {
    reader_hangs_up(b"").await;
}

#[tokio::test]
async fn a_reader_that_hangs_up_ends_a_head_and_file_write_in_an_error() {
    reader_hangs_up(b"HTTP/1.1 200 OK\r\ncontent-length: 8388608\r\n\r\n").await;
}
