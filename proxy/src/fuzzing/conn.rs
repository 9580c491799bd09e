//! The `conn` target: a client's raw bytes to a hyper HTTP/1 server
//! connection set up as the listeners set theirs up, over a
//! [`crate::sendfile::Conn`] on the server's end of a loopback TCP pair.
//! The service answers from a cache file mapped as hits are (through
//! [`crate::cache::Cache::get`]), so that the bytes of its slices leave by
//! `sendfile`, and mixes them with heap bytes:
//!
//! - `/file` (any method; `HEAD` has no body): the file, or the part a
//!   `Range` header asks for ([`crate::api::ranged`], as blob hits do);
//! - `/parts/<spec>[?chunked]`: a body of frames, `<a>-<b>` a slice of the
//!   file and `h<n>` `n` heap bytes, separated by `,`; with `?chunked` of
//!   unknown length, so hyper frames it in chunks (heap bytes between the
//!   file's in every write);
//! - anything else with a body (`Content-Length` or chunked): its length;
//! - anything else: a small 404.
//!
//! Every request's body is read (up to 64 KiB) before it is answered; one
//! that fails is answered 400.
//!
//! The socket buffers are small (the server's send, the client's receive),
//! so that writes are partial and wait for the socket. The client writes the
//! input, shuts down its write half and reads to the end.
//!
//! Invariants: nothing panics; the server's connection ends; what the client
//! reads parses as responses, the service's in the order it made them, each
//! with the status and exactly the body it was given (a response cut short
//! only by a reset connection, and then a prefix of its body); after them at
//! most one more, hyper's own error answer; and on a cleanly ended
//! connection every response arrived, and the bytes counted as sent by
//! `sendfile` are exactly the file bytes of the bodies.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use crate::body::Body;
use crate::digest::Digest;

/// The cache file's length: a few socket buffers, so that one body takes
/// several writes.
const FILE_LEN: usize = 20_000;
/// The listeners' read buffer (`server/listener.rs`).
const MAX_BUF: usize = 16 << 10;
/// Socket buffer sizes asked for (the kernel doubles them).
const SOCKET_BUF: u32 = 4_096;
/// Longest input used: twice the read buffer, enough for a head too large
/// for it (the fuzzer's inputs are shorter, the corpus's may not be).
const MAX_INPUT: usize = 2 * MAX_BUF;
/// Longest a body read by the service may be.
const MAX_BODY: usize = 64 << 10;
/// Frames of a `/parts` body, at most.
const MAX_PARTS: usize = 32;
/// Longest one exchange may take: every request is answered at once, and
/// the client's EOF ends the rest; past this something hangs.
const DEADLINE: Duration = Duration::from_secs(10);

/// The file's bytes: different at every offset.
fn file_bytes() -> Vec<u8> {
    (0..FILE_LEN)
        .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
        .collect()
}

struct Harness {
    rt: tokio::runtime::Runtime,
    listener: TcpListener,
    addr: SocketAddr,
    /// The whole file, mapped and registered by the cache as a hit's is.
    file: Bytes,
    _cache: Arc<crate::cache::Cache>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (listener, addr, file, cache) = rt.block_on(async {
            // libFuzzer's `main` does not ignore SIGPIPE as Rust's does: a
            // write to a reset connection would end the process rather
            // than fail. Handling the signal (for good) ignores it.
            let pipe = tokio::signal::unix::SignalKind::pipe();
            let _ = tokio::signal::unix::signal(pipe).expect("a SIGPIPE handler");
            let socket = TcpSocket::new_v4().expect("a socket");
            // Accepted connections inherit it.
            socket.set_send_buffer_size(SOCKET_BUF).expect("SO_SNDBUF");
            socket
                .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .expect("bind");
            let listener = socket.listen(64).expect("listen");
            let addr = listener.local_addr().expect("an address");
            let (file, cache) = mapped_file().await;
            (listener, addr, file, cache)
        });
        Harness {
            rt,
            listener,
            addr,
            file,
            _cache: cache,
        }
    })
}

/// [`file_bytes`] committed in a scratch cache dir and opened as a hit.
async fn mapped_file() -> (Bytes, Arc<crate::cache::Cache>) {
    let dir = super::workdir().join("conn");
    let _ = std::fs::remove_dir_all(&dir);
    let content = file_bytes();
    let d = Digest::of(&content);
    let p = crate::cache::content_path(&dir, &d);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
    std::fs::write(&p, &content).expect("the cache file");
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let cache = crate::cache::Cache::open(&dir, 1 << 20, metrics, true).expect("the cache opens");
    let cache = Arc::new(cache);
    let hit = cache.get(&d, false).await.expect("the file is a hit");
    assert_eq!(hit.data, content);
    (hit.data, cache)
}

/// What the service answered to one request.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    /// The body hyper was given; none goes out for a HEAD.
    body: Vec<u8>,
    head: bool,
    /// Of `body`, the bytes from the file.
    mapped: u64,
}

/// Sends `data` on one connection, reads until the server closes it, and
/// checks what arrived against what the service answered.
pub fn conn(data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    let h = harness();
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let (out, clean) = h.rt.block_on(exchange(h, data, &answers, &sent));
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|e| e.into_inner()));
    check(&out, clean, &answers, sent.load(Ordering::Relaxed));
}

/// The client's side of one connection: what it read, and whether the
/// stream ended cleanly (not reset).
async fn exchange(
    h: &'static Harness,
    data: &[u8],
    answers: &Arc<Mutex<Vec<Answer>>>,
    sent: &Arc<AtomicU64>,
) -> (Vec<u8>, bool) {
    let client = TcpSocket::new_v4().expect("a socket");
    client.set_recv_buffer_size(SOCKET_BUF).expect("SO_RCVBUF");
    let (client, accepted) = tokio::join!(client.connect(h.addr), h.listener.accept());
    let mut client = client.expect("connect");
    let (stream, _) = accepted.expect("accept");
    let io = TokioIo::new(crate::sendfile::Conn::new(stream, Arc::clone(sent)));
    let (file, answers) = (h.file.clone(), Arc::clone(answers));
    let svc = service_fn(move |req| {
        let (file, answers) = (file.clone(), Arc::clone(&answers));
        async move { Ok::<_, Infallible>(serve(req, file, &answers).await) }
    });
    // As `server/listener.rs` sets up a connection, and the client's EOF
    // ends its input, not the exchange: what it sent is answered.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(2))
        .max_buf_size(MAX_BUF)
        .half_close(true);
    let server = tokio::spawn(http1.serve_connection(io, svc));
    let talk = async {
        let (mut rd, mut wr) = client.split();
        let write = async {
            // The server may answer and close before reading it all.
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let mut out = Vec::new();
        let ((), read) = tokio::join!(write, rd.read_to_end(&mut out));
        let served = server.await;
        (out, read, served)
    };
    let (out, read, served) = tokio::time::timeout(DEADLINE, talk)
        .await
        .expect("the connection ends within the deadline");
    if let Err(e) = served {
        // A panic in the service or in hyper: the fuzzer's finding.
        std::panic::resume_unwind(e.into_panic());
    }
    (out, read.is_ok())
}

/// The service: see the module doc.
async fn serve(
    req: Request<Incoming>,
    file: Bytes,
    answers: &Mutex<Vec<Answer>>,
) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let has_body = req.headers().contains_key(header::CONTENT_LENGTH)
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let (req, body) = req.into_parts();
    // Read first, whatever the route: hyper leaves a connection hung when
    // the answer to an `Expect: 100-continue` request whose body is not
    // read goes out in several writes and another request follows
    // (`fuzz/regressions/conn/expect-100-unread-body`), with or without
    // this socket. That is hyper's, not what this target is for.
    let read = http_body_util::Limited::new(body, MAX_BODY).collect().await;
    let path = req.uri.path();
    let mut mapped = 0;
    let (mut resp, body) = if read.is_err() {
        plain(StatusCode::BAD_REQUEST, &b"bad body\n"[..])
    } else if path == "/file" {
        match crate::api::ranged(&req.headers, file.len() as u64) {
            Ok((status, start, end)) => {
                let slice = file.slice(start as usize..end as usize);
                let mut r = Response::new(if head {
                    Body::empty()
                } else {
                    mapped = slice.len() as u64;
                    Body::mapped(slice.clone(), Arc::default())
                });
                *r.status_mut() = status;
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, slice.len().into());
                (r, slice.to_vec())
            }
            Err(_) => plain(StatusCode::RANGE_NOT_SATISFIABLE, &b"unsatisfiable\n"[..]),
        }
    } else if let Some(spec) = path.strip_prefix("/parts/") {
        let frames = parts(spec, &file);
        let body: Vec<u8> = frames.iter().flat_map(|(b, _)| b.iter().copied()).collect();
        mapped = frames
            .iter()
            .filter(|f| f.1)
            .map(|f| f.0.len() as u64)
            .sum();
        let len = (req.uri.query() != Some("chunked")).then_some(body.len() as u64);
        let stream = futures_util::stream::iter(frames.into_iter().map(|(b, _)| Ok(b)));
        (Response::new(Body::stream(stream, len)), body)
    } else if let (true, Ok(b)) = (has_body, read) {
        plain(StatusCode::OK, format!("{}\n", b.to_bytes().len()))
    } else {
        plain(StatusCode::NOT_FOUND, &b"not here\n"[..])
    };
    if head {
        // What hyper sends of it: the head only.
        *resp.body_mut() = Body::empty();
        mapped = 0;
    }
    let answer = Answer {
        status: resp.status(),
        body: if head { Vec::new() } else { body },
        head,
        mapped,
    };
    answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(answer);
    resp
}

fn plain(status: StatusCode, b: impl Into<Bytes>) -> (Response<Body>, Vec<u8>) {
    let b: Bytes = b.into();
    let mut r = Response::new(Body::full(b.clone()));
    *r.status_mut() = status;
    (r, b.to_vec())
}

/// The frames `spec` names (see the module doc), and whether each is a
/// slice of the file. Empty and malformed items are left out.
fn parts(spec: &str, file: &Bytes) -> Vec<(Bytes, bool)> {
    let mut frames = Vec::new();
    for item in spec.split(',').take(MAX_PARTS) {
        if let Some(n) = item.strip_prefix('h') {
            let n: usize = n.parse().unwrap_or(0).min(FILE_LEN);
            if n > 0 {
                let heap: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                frames.push((Bytes::from(heap), false));
            }
        } else if let Some((a, b)) = item.split_once('-') {
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                let b = b.min(FILE_LEN);
                if a < b {
                    frames.push((file.slice(a..b), true));
                }
            }
        }
    }
    frames
}

// ---- reading the responses back ----

/// One response as it arrived.
#[derive(Debug)]
struct Arrived {
    status: u16,
    body: Vec<u8>,
    /// Cut short: the stream ended inside its body.
    cut: bool,
}

/// The responses in `out`, for requests answered as `answers` (which says
/// which were HEADs). A head cut short ends the list; garbage panics.
fn parse(out: &[u8], answers: &[Answer]) -> (Vec<Arrived>, bool) {
    let mut all = Vec::new();
    let mut at = 0;
    while at < out.len() {
        let Some(end) = find(&out[at..], b"\r\n\r\n") else {
            return (all, true);
        };
        let head = std::str::from_utf8(&out[at..at + end]).expect("a response head is text");
        at += end + 4;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
        let (mut length, mut chunked) = (None, false);
        for line in lines {
            let (name, value) = line.split_once(':').expect("a header line");
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().expect("a length"));
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        if (100..200).contains(&status) {
            continue;
        }
        let was_head = answers.get(all.len()).is_some_and(|a| a.head);
        let rest = &out[at..];
        let (body, used, cut) = if was_head || status == 204 || status == 304 {
            (Vec::new(), 0, false)
        } else if chunked {
            dechunk(rest)
        } else if let Some(n) = length {
            let n_got = n.min(rest.len());
            (rest[..n_got].to_vec(), n_got, n_got < n)
        } else {
            // Until the end of the stream (HTTP/1.0).
            (rest.to_vec(), rest.len(), false)
        };
        at += used;
        all.push(Arrived { status, body, cut });
        if cut {
            break;
        }
    }
    (all, false)
}

/// A chunked body at the start of `b`: its bytes, how much of `b` it took,
/// whether it was cut short.
fn dechunk(b: &[u8]) -> (Vec<u8>, usize, bool) {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find(&b[at..], b"\r\n") else {
            return (body, b.len(), true);
        };
        let line = std::str::from_utf8(&b[at..at + eol]).expect("a chunk size line");
        let size = line.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).expect("a chunk size");
        at += eol + 2;
        if n == 0 {
            // Trailers, then the empty line.
            loop {
                let Some(eol) = find(&b[at..], b"\r\n") else {
                    return (body, b.len(), true);
                };
                at += eol + 2;
                if eol == 0 {
                    return (body, at, false);
                }
            }
        }
        let got = n.min(b.len() - at);
        body.extend_from_slice(&b[at..at + got]);
        at += got;
        if got < n || b.len() < at + 2 {
            return (body, b.len(), true);
        }
        assert_eq!(&b[at..at + 2], b"\r\n", "a chunk ends in CRLF");
        at += 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn check(out: &[u8], clean: bool, answers: &[Answer], sent: u64) {
    let (arrived, head_cut) = parse(out, answers);
    for (i, (got, want)) in arrived.iter().zip(answers).enumerate() {
        assert_eq!(got.status, want.status.as_u16(), "response {i}'s status");
        if got.cut {
            assert!(
                want.body.starts_with(&got.body),
                "response {i}, cut short, is not a prefix of its body"
            );
        } else {
            assert!(
                got.body == want.body,
                "response {i}: {} bytes arrived for a body of {}",
                got.body.len(),
                want.body.len()
            );
        }
    }
    let extra = &arrived[arrived.len().min(answers.len())..];
    assert!(extra.len() <= 1, "{} responses nobody made", extra.len());
    if let Some(e) = extra.first() {
        assert!(
            e.status >= 400,
            "hyper's own answer is an error, not {}",
            e.status
        );
    }
    if clean {
        assert!(!head_cut, "a cleanly ended stream ends inside a head");
        assert!(
            arrived.iter().all(|a| !a.cut),
            "a cleanly ended stream cuts a body short"
        );
        assert!(
            arrived.len() >= answers.len(),
            "{} responses arrived of {}",
            arrived.len(),
            answers.len()
        );
        let mapped: u64 = answers.iter().map(|a| a.mapped).sum();
        assert_eq!(sent, mapped, "bytes sent by sendfile, file bytes in bodies");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input` and returns what the client read, whether cleanly, the
    /// service's answers and the bytes sent by `sendfile`.
    fn run(input: &str) -> (Vec<u8>, bool, Vec<Answer>, u64) {
        let h = harness();
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let (out, clean) =
            h.rt.block_on(exchange(h, input.as_bytes(), &answers, &sent));
        let answers = std::mem::take(&mut *answers.lock().unwrap());
        (out, clean, answers, sent.load(Ordering::Relaxed))
    }

    const PIPELINED: &str = "GET /file HTTP/1.1\r\n\r\n\
        GET /file HTTP/1.1\r\nRange: bytes=100-5099\r\n\r\n\
        HEAD /file HTTP/1.1\r\n\r\n\
        GET /parts/0-100,h5,300-400?chunked HTTP/1.1\r\n\r\n\
        GET /nothing HTTP/1.1\r\n\r\n";

    #[test]
    fn pipelined_hits_arrive_whole_and_leave_by_sendfile() {
        let (out, clean, answers, sent) = run(PIPELINED);
        assert!(clean);
        let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
        assert_eq!(statuses, [200, 206, 200, 200, 404]);
        assert_eq!(sent, FILE_LEN as u64 + 5_000 + 200);
        let (arrived, _) = parse(&out, &answers);
        assert_eq!(arrived.len(), 5);
        assert!(arrived[1].body == file_bytes()[100..5_100]);
        check(&out, clean, &answers, sent);
    }

    #[test]
    #[should_panic = "response 1"]
    fn a_wrong_byte_in_a_body_is_caught() {
        let (mut out, clean, answers, sent) = run(PIPELINED);
        // Ten bytes into the second response's body.
        let at = find(&out, b"\r\n\r\n").unwrap() + 4 + FILE_LEN;
        let at = at + find(&out[at..], b"\r\n\r\n").unwrap() + 4 + 10;
        out[at] ^= 1;
        check(&out, clean, &answers, sent);
    }

    #[test]
    #[should_panic = "bytes sent by sendfile"]
    fn file_bytes_written_from_memory_are_caught() {
        let (out, clean, answers, sent) = run(PIPELINED);
        check(&out, clean, &answers, sent - 1);
    }
}
