//! Cache hits leave by `sendfile(2)` (issue 15), and hyper still handles
//! everything around them: black-box tests against the real binary in front
//! of a real upstream (Debian's docker-registry), both on loopback.
//!
//! `regproxy_sendfile_bytes_total` says which body bytes left by `sendfile`
//! (hits) and which were written from memory (fills, followers, relays).
//! Clients of raw TCP write exact bytes and parse the answers themselves, so
//! that what the listener does with pipelining, `Expect: 100-continue`,
//! chunked bodies, HTTP/1.0, absolute-form targets, bad heads and keep-alive
//! is checked on the wire. `/proc` says what a client that stops reading in
//! the middle of a hit costs the process.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::peers::{basic, private_registry, ALICE};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: usize = 1 << 20;
const REPO: &str = "team/app";
const SENT: &str = "regproxy_sendfile_bytes_total";

fn blob_path(d: &str) -> String {
    format!("/v2/{REPO}/blobs/{d}")
}

/// A `GET` of `path` on `addr`, as one kept-alive request.
fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n")
}

/// Waits until `regproxy_sendfile_bytes_total` has reached `expected`, then
/// checks that it is exactly that. The count is added when `sendfile`
/// returns, which may be a moment after the client has the bytes.
async fn sent_is(proxy: &Proxy, expected: u64, what: &str) {
    wait_for(
        || async { proxy.metric(SENT).await >= expected },
        &format!("{SENT} reaches {expected}: {what}"),
    )
    .await;
    assert_eq!(proxy.metric(SENT).await, expected, "{what}");
}

/// An upstream holding blobs in [`REPO`], and a proxy in front of it that
/// has each of them cached (pulled once, and committed).
struct Warm {
    reg: Registry,
    _cache: TempDir,
    proxy: Proxy,
    /// The blobs' bytes and digests.
    blobs: Vec<(Vec<u8>, String)>,
}

impl Warm {
    async fn start(sizes: &[usize], seed: u64, args: &[&str]) -> Warm {
        let reg = Registry::start();
        let cache = temp_dir("cache");
        let proxy = Proxy::start(&reg.url(), cache.path(), args);
        let mut blobs = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let data = blob(len, seed + i as u64);
            let d = reg.put_blob_files(REPO, &data);
            let (st, _, body) = get(&format!("{}{}", proxy.url(), blob_path(&d)), &[]).await;
            assert_eq!(st, StatusCode::OK, "the cold GET that warms the cache");
            assert_eq!(sha256_digest(&body.unwrap()), d);
            blobs.push((data, d));
        }
        proxy.fills_done().await;
        for (_, d) in &blobs {
            assert!(proxy.cache_path(d).exists(), "{d} is committed");
        }
        Warm {
            reg,
            _cache: cache,
            proxy,
            blobs,
        }
    }

    fn size(&self, i: usize) -> u64 {
        self.blobs[i].0.len() as u64
    }
}

/// A response as read off the wire.
#[derive(Debug)]
struct Wire {
    /// The status line's version: `HTTP/1.1` or `HTTP/1.0`.
    version: String,
    status: u16,
    /// Names lowercased, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    /// The only value of header `name`; fails if it is there twice.
    fn header(&self, name: &str) -> Option<&str> {
        let mut vs = self.headers.iter().filter(|(k, _)| k == name);
        let v = vs.next().map(|(_, v)| v.as_str());
        assert!(vs.next().is_none(), "one {name} header: {:?}", self.headers);
        v
    }
}

/// A client connection that writes exact bytes and frames the answers
/// itself (status line, headers, then `Content-Length`, chunked, or until
/// the close).
struct Raw {
    s: TcpStream,
    /// Read and not yet taken.
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// A connection whose receive buffer is small and fixed (no autotuning):
    /// a client that stops reading holds the sender after a known amount.
    async fn connect_small(addr: SocketAddr) -> Raw {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(128 << 10).unwrap();
        Raw {
            s: sock.connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads what has arrived into the buffer; false once the peer has
    /// closed (end of stream, or a reset).
    async fn more(&mut self) -> bool {
        self.buf.reserve(256 << 10);
        let read = tokio::time::timeout(PATIENCE, self.s.read_buf(&mut self.buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the proxy sent nothing for {PATIENCE:?}; unparsed: {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                )
            });
        matches!(read, Ok(n) if n > 0)
    }

    /// Exactly `n` bytes.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let had = self.buf.len();
            assert!(
                self.more().await,
                "the connection closed after {had} of {n} expected bytes"
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Up to the next CRLF, without it.
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).take(i).collect();
                return String::from_utf8(line).expect("a line of text");
            }
            assert!(self.more().await, "the connection closed mid-line");
        }
    }

    /// The next response's status line and headers.
    async fn head(&mut self) -> Wire {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            assert!(
                self.more().await,
                "the connection closed before a whole response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let head = String::from_utf8(head).expect("a response head is text");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap().to_owned();
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("a header line: {l:?}"));
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Wire {
            version,
            status,
            headers,
            body: Vec::new(),
        }
    }

    /// The next whole response; `to_head`: it answers a `HEAD`, so has no
    /// body whatever its headers say.
    async fn response(&mut self, to_head: bool) -> Wire {
        let mut w = self.head().await;
        if to_head || (100..200).contains(&w.status) || w.status == 204 || w.status == 304 {
            return w;
        }
        let chunked = w
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let size = self.line().await;
                let size = size.split(';').next().unwrap().trim();
                let n = usize::from_str_radix(size, 16).expect("a chunk size");
                if n == 0 {
                    // Trailers, up to the empty line.
                    while !self.line().await.is_empty() {}
                    break;
                }
                let chunk = self.take(n).await;
                w.body.extend_from_slice(&chunk);
                assert_eq!(self.take(2).await, b"\r\n", "a chunk ends in CRLF");
            }
        } else if let Some(len) = w.header("content-length") {
            let len = len.parse().expect("a Content-Length is a number");
            w.body = self.take(len).await;
        } else {
            w.body = self.rest().await;
        }
        w
    }

    /// Everything until the peer closes.
    async fn rest(&mut self) -> Vec<u8> {
        while self.more().await {}
        std::mem::take(&mut self.buf)
    }

    /// Checks that the peer closes the connection with nothing more sent.
    async fn closes(&mut self, what: &str) {
        let rest = self.rest().await;
        assert!(
            rest.is_empty(),
            "{what}: nothing more is sent before the close, got {:?}",
            String::from_utf8_lossy(&rest[..rest.len().min(200)])
        );
    }
}

// ---- Which bytes leave by sendfile ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_and_its_follower_are_written_from_memory_and_a_warm_hit_by_sendfile() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let data = blob(6 * MIB + 11, 1501);
    let d = reg.put_blob_files(REPO, &data);
    let url = format!("{}{}", proxy.url(), blob_path(&d));

    // The uplink stalls until a second request has joined the fill: both
    // are served while the blob is still a temp file.
    gate.hold_after(MIB as u64);
    let gets: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    wait_for(
        || async {
            let m = proxy.metrics().await;
            m["regproxy_requests_total{kind=\"blob\",result=\"miss\"}"] == 1
                && m["regproxy_requests_total{kind=\"blob\",result=\"coalesced\"}"] == 1
        },
        "one request leads the fill and one follows it",
    )
    .await;
    gate.open();
    for g in futures_util::future::join_all(gets).await {
        let (st, _, body) = g.unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body.unwrap()), d, "the cold body is exact");
    }
    proxy.fills_done().await;
    assert!(proxy.cache_path(&d).exists(), "the blob is committed");
    assert_eq!(
        proxy.metric(SENT).await,
        0,
        "a fill's leader and follower read the fill's temp file, which is not \
         registered: none of their bytes leaves by sendfile"
    );
    assert_eq!(
        proxy.metric("regproxy_served_cache_bytes_total").await,
        2 * data.len() as u64,
        "both cold bodies were counted as served"
    );

    let (st, h, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert_eq!(h["docker-content-digest"], d.as_str());
    assert_eq!(sha256_digest(&body.unwrap()), d, "the warm body is exact");
    sent_is(
        &proxy,
        data.len() as u64,
        "a warm GET sends exactly the blob's bytes by sendfile",
    )
    .await;
    assert_eq!(
        proxy
            .metric("regproxy_requests_total{kind=\"blob\",result=\"hit\"}")
            .await,
        1
    );
    assert_eq!(reg.blob_gets_logged(&d, 1).await, 1, "one upstream GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_a_warm_blob_sends_exactly_its_bytes_by_sendfile_and_a_head_none() {
    let w = Warm::start(&[3 * MIB + 5], 1510, &[]).await;
    let (data, d) = &w.blobs[0];
    let len = data.len();
    let url = format!("{}{}", w.proxy.url(), blob_path(d));
    let before = w.proxy.metric(SENT).await;

    let (a, b) = (1_000_003, 2_345_678);
    let (st, h, body) = get(&url, &[("range", &format!("bytes={a}-{b}"))]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h["content-range"], format!("bytes {a}-{b}/{len}").as_str());
    assert_eq!(h["content-length"], (b - a + 1).to_string().as_str());
    assert!(
        body.unwrap()[..] == data[a..=b],
        "the range's body is exactly bytes {a} to {b}"
    );
    let after_range = before + (b - a + 1) as u64;
    sent_is(
        &w.proxy,
        after_range,
        "a range sends exactly its bytes by sendfile",
    )
    .await;

    let (st, h, body) = request(Method::HEAD, &url, &[], Bytes::new()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], len.to_string().as_str());
    assert_eq!(h["docker-content-digest"], d.as_str());
    assert!(body.unwrap().is_empty());
    assert_eq!(
        w.proxy.metric(SENT).await,
        after_range,
        "a HEAD sends no body"
    );

    // The last bytes, up to the end of the file: the edge of the mapping.
    let (st, h, body) = get(&url, &[("range", "bytes=-4097")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        h["content-range"],
        format!("bytes {}-{}/{len}", len - 4097, len - 1).as_str()
    );
    assert!(body.unwrap()[..] == data[len - 4097..]);
    // Exactly: this also shows the HEAD added nothing later.
    sent_is(
        &w.proxy,
        after_range + 4097,
        "a suffix range sends exactly its bytes by sendfile",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_on_the_node_leaves_by_sendfile_with_its_exact_bytes_and_type() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let (bytes, d) = push_manifest(
        &reg.url(),
        REPO,
        "v1",
        b"{\"config\":1520}",
        &[&blob(1000, 1520)],
    )
    .await;
    let len = bytes.len() as u64;
    let url = format!("{}/v2/{REPO}/manifests/{d}", proxy.url());
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let check = |(st, h, body): (StatusCode, http::HeaderMap, Result<Bytes, String>)| {
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            h["content-type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(h["docker-content-digest"], d.as_str());
        assert_eq!(h["content-length"], bytes.len().to_string().as_str());
        assert!(body.unwrap()[..] == bytes[..], "the exact manifest bytes");
    };

    check(get(&url, &accept).await);
    assert_eq!(
        proxy.metric(SENT).await,
        0,
        "a manifest fetched from the upstream is written from memory"
    );
    check(get(&url, &accept).await);
    sent_is(
        &proxy,
        len,
        "a manifest by digest from the node leaves by sendfile",
    )
    .await;

    let (st, h, body) = request(Method::HEAD, &url, &accept, Bytes::new()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], bytes.len().to_string().as_str());
    assert!(body.unwrap().is_empty());

    // A tag is resolved upstream (a HEAD), and the manifest it names is on
    // the node: it is served from there, by sendfile too.
    check(get(&format!("{}/v2/{REPO}/manifests/v1", proxy.url()), &accept).await);
    sent_is(
        &proxy,
        2 * len,
        "a tag whose manifest is on the node sends it by sendfile (and the HEAD sent nothing)",
    )
    .await;
    let needle = format!("\"GET /v2/{REPO}/manifests/");
    assert_eq!(
        reg.logged(1, "manifest GETs", |l| l.contains(&needle))
            .await,
        1,
        "the manifest was fetched from the upstream once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_blob_is_refused_without_credentials_and_sent_by_sendfile_with_them() {
    let (reg, _htpasswd) = private_registry();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let alice = basic(ALICE);
    let data = blob(2 * MIB + 3, 1530);
    let d = reg.put_blob_files(REPO, &data);
    let url = format!("{}{}", proxy.url(), blob_path(&d));
    let (st, _, body) = get(&url, &[("authorization", &alice)]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d);
    proxy.fills_done().await;
    assert!(proxy.cache_path(&d).exists(), "the blob is on the node");
    assert_eq!(
        proxy.metric(SENT).await,
        0,
        "the fill was written from memory"
    );

    for (who, headers) in [
        ("a client without credentials", vec![]),
        (
            "a wrong password",
            vec![("authorization", basic((ALICE.0, "wrong")))],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for method in [Method::GET, Method::HEAD] {
            let (st, h, _) = request(method.clone(), &url, &headers, Bytes::new()).await;
            assert_eq!(
                st,
                StatusCode::UNAUTHORIZED,
                "{who} gets 401 for a {method} of a cached blob"
            );
            assert!(h["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("test-realm"));
        }
    }
    assert_eq!(
        proxy.metric(SENT).await,
        0,
        "no byte of the cached blob left for a refused client"
    );

    let (st, _, body) = get(&url, &[("authorization", &alice)]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d);
    sent_is(
        &proxy,
        data.len() as u64,
        "an authorized client gets the cached blob by sendfile",
    )
    .await;
}

// ---- hyper still does the HTTP around the hits ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_hits_and_a_relayed_request_in_one_write_are_answered_in_order() {
    let w = Warm::start(&[2 * MIB + 1, MIB + 7], 1540, &[]).await;
    let before = w.proxy.metric(SENT).await;
    let addr = w.proxy.addr;
    let mut c = Raw::connect(addr).await;
    let mut all = get_request(addr, &blob_path(&w.blobs[0].1));
    all += &get_request(addr, &blob_path(&w.blobs[1].1));
    all += &get_request(addr, "/v2/");
    c.send(all.as_bytes()).await;

    for (i, (data, d)) in w.blobs.iter().enumerate() {
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "pipelined request {i}");
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
        assert!(r.body == *data, "pipelined blob {i} has its exact bytes");
    }
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "the pipelined /v2/ is answered third");
    assert_eq!(r.body, b"{}", "with the upstream's body");
    sent_is(
        &w.proxy,
        before + w.size(0) + w.size(1),
        "the two pipelined hits left by sendfile, the relayed /v2/ did not",
    )
    .await;
}

/// Starts an upload of a blob to [`REPO`] through the proxy on `c`; returns
/// the path (and query) to continue it at.
async fn start_upload(c: &mut Raw, addr: SocketAddr) -> String {
    c.send(
        format!(
            "POST /v2/{REPO}/blobs/uploads/ HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 202, "the upload starts: {r:?}");
    let loc = r.header("location").expect("a Location").to_owned();
    let prefix = format!("http://{addr}");
    loc.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("the Location {loc} points at the proxy"))
        .to_owned()
}

/// `path` with `digest=d` added to its query.
fn with_digest(path: &str, d: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}digest={d}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_with_expect_100_continue_gets_100_then_201_and_is_pullable() {
    let w = Warm::start(&[], 1550, &[]).await;
    let addr = w.proxy.addr;
    let data = blob(300 << 10, 1551);
    let d = sha256_digest(&data);
    let mut c = Raw::connect(addr).await;
    let at = start_upload(&mut c, addr).await;
    c.send(
        format!(
            "PUT {} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/octet-stream\r\n\
             content-length: {}\r\nexpect: 100-continue\r\n\r\n",
            with_digest(&at, &d),
            data.len()
        )
        .as_bytes(),
    )
    .await;
    // The body is sent only once the proxy says to.
    let r = c.response(false).await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.1", 100),
        "the proxy asks for the body with 100 Continue: {r:?}"
    );
    c.send(&data).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 201, "the upload is stored: {r:?}");
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    c.send(get_request(addr, &blob_path(&d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == data, "the pushed blob is pulled back exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_with_a_chunked_body_is_stored_and_pullable() {
    let w = Warm::start(&[], 1560, &[]).await;
    let addr = w.proxy.addr;
    let data = blob(200_003, 1561);
    let d = sha256_digest(&data);
    let mut c = Raw::connect(addr).await;
    let at = start_upload(&mut c, addr).await;
    // As docker pushes a layer: PATCH with a chunked body, then PUT.
    let mut req = format!(
        "PATCH {at} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/octet-stream\r\n\
         transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let (one, rest) = data.split_at(65_536);
    let (two, three) = rest.split_at(1);
    for (i, piece) in [one, two, three].into_iter().enumerate() {
        // A chunk extension on one of them, which a server must ignore.
        let ext = if i == 1 { ";name=value" } else { "" };
        req.extend_from_slice(format!("{:x}{ext}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send(&req).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 202, "the chunked body is taken: {r:?}");
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", data.len() - 1).as_str()),
        "the upstream got every byte of it"
    );
    let at = r.header("location").unwrap();
    let at = at.strip_prefix(&format!("http://{addr}")).unwrap();
    c.send(
        format!(
            "PUT {} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\n\r\n",
            with_digest(at, &d)
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 201, "the upload is stored: {r:?}");

    c.send(get_request(addr, &blob_path(&d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == data, "the pushed blob is pulled back exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_get_of_a_warm_blob_gets_an_http_1_0_answer_and_a_close() {
    let w = Warm::start(&[MIB + 13], 1570, &[]).await;
    let (data, d) = &w.blobs[0];
    let before = w.proxy.metric(SENT).await;
    let mut c = Raw::connect(w.proxy.addr).await;
    c.send(format!("GET {} HTTP/1.0\r\n\r\n", blob_path(d)).as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(
        (r.version.as_str(), r.status),
        ("HTTP/1.0", 200),
        "an HTTP/1.0 client gets an HTTP/1.0 answer: {r:?}"
    );
    assert_eq!(
        r.header("transfer-encoding"),
        None,
        "no chunked encoding for HTTP/1.0"
    );
    assert_eq!(
        r.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert!(r.body == *data, "the body is exact");
    c.closes("an HTTP/1.0 connection without keep-alive ends after the answer")
        .await;
    sent_is(
        &w.proxy,
        before + w.size(0),
        "the HTTP/1.0 hit left by sendfile",
    )
    .await;

    // An HTTP/1.0 client that asks to keep the connection gets two hits on it.
    let mut c = Raw::connect(w.proxy.addr).await;
    for i in 0..2 {
        c.send(
            format!(
                "GET {} HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
                blob_path(d)
            )
            .as_bytes(),
        )
        .await;
        let r = c.response(false).await;
        assert_eq!((r.version.as_str(), r.status), ("HTTP/1.0", 200));
        assert_eq!(
            r.header("connection"),
            Some("keep-alive"),
            "the answer says the connection stays"
        );
        assert!(r.body == *data, "kept-alive HTTP/1.0 hit {i} is exact");
    }
    sent_is(
        &w.proxy,
        before + 3 * w.size(0),
        "the kept-alive HTTP/1.0 hits left by sendfile",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_get_of_a_warm_blob_is_served_exact() {
    let w = Warm::start(&[MIB + 17], 1580, &[]).await;
    let (data, d) = &w.blobs[0];
    let before = w.proxy.metric(SENT).await;
    let addr = w.proxy.addr;
    let mut c = Raw::connect(addr).await;
    c.send(
        format!(
            "GET http://{addr}{} HTTP/1.1\r\nhost: {addr}\r\n\r\n",
            blob_path(d)
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(
        r.status, 200,
        "hyper routes an absolute-form target by its path"
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert!(r.body == *data, "the body is exact");
    sent_is(
        &w.proxy,
        before + w.size(0),
        "the absolute-form hit left by sendfile",
    )
    .await;
    // And the connection is still good for the next (origin-form) request.
    c.send(get_request(addr, &blob_path(d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == *data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_431_and_a_malformed_one_400_and_the_listener_serves_on() {
    let w = Warm::start(&[MIB + 19], 1590, &[]).await;
    let (data, d) = &w.blobs[0];
    let addr = w.proxy.addr;

    let mut c = Raw::connect(addr).await;
    let big = "a".repeat(20 << 10);
    c.send(format!("GET /v2/ HTTP/1.1\r\nhost: {addr}\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431, "a head past 16 KiB gets 431: {r:?}");
    // The rest of the head is left unread: the close may come as a reset.
    c.closes("the connection of an oversized head is closed")
        .await;

    let mut c = Raw::connect(addr).await;
    c.send(format!("GET /v2/ HTTP/1.1\r\nhost {addr}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(
        r.status, 400,
        "a header line without a colon gets 400: {r:?}"
    );
    c.closes("the connection of a bad head is closed").await;

    let mut c = Raw::connect(addr).await;
    c.send(b"\x01\x02 nonsense\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 400, "a request line that is no request gets 400");
    c.closes("the connection of a bad head is closed").await;

    let before = w.proxy.metric(SENT).await;
    let mut c = Raw::connect(addr).await;
    c.send(get_request(addr, &blob_path(d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "the listener serves on");
    assert!(r.body == *data);
    sent_is(&w.proxy, before + w.size(0), "by sendfile").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kept_alive_connection_carries_hits_between_answers_written_from_memory() {
    let w = Warm::start(&[2 * MIB + 23], 1600, &[]).await;
    let (data, d) = &w.blobs[0];
    let addr = w.proxy.addr;
    let (manifest, md) = push_manifest(
        &w.reg.url(),
        REPO,
        "v1",
        b"{\"config\":1600}",
        &[&blob(1000, 1601)],
    )
    .await;
    let mut sent = w.proxy.metric(SENT).await;
    let mut c = Raw::connect(addr).await;

    c.send(get_request(addr, &blob_path(d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == *data, "the first hit is exact");
    sent += w.size(0);
    sent_is(&w.proxy, sent, "the first hit left by sendfile").await;

    // A manifest the node does not hold yet: fetched, and written from
    // memory.
    c.send(
        format!(
            "GET /v2/{REPO}/manifests/{md} HTTP/1.1\r\nhost: {addr}\r\n\
             accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == manifest, "the manifest is exact");
    assert_eq!(
        w.proxy.metric(SENT).await,
        sent,
        "a fetched manifest is written from memory"
    );

    // A listing, relayed from the upstream.
    c.send(get_request(addr, &format!("/v2/{REPO}/tags/list")).as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        list["tags"],
        serde_json::json!(["v1"]),
        "the relayed listing"
    );

    // The tag: its manifest is on the node now, so it is a hit.
    c.send(
        format!(
            "GET /v2/{REPO}/manifests/v1 HTTP/1.1\r\nhost: {addr}\r\n\
             accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-content-digest"), Some(md.as_str()));
    assert!(r.body == manifest, "the tag's manifest is exact");
    sent += manifest.len() as u64;
    sent_is(
        &w.proxy,
        sent,
        "the tag's manifest on the node left by sendfile (and the listing did not)",
    )
    .await;

    c.send(get_request(addr, &blob_path(d)).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert!(r.body == *data, "the last hit is exact");
    sent += w.size(0);
    sent_is(&w.proxy, sent, "the last hit left by sendfile").await;
}

// ---- Clients that stop reading, hang up, or outlast the process ----

/// Sends a GET of warm blob `d` on `c` and reads its head and the first
/// `first` body bytes; returns the body's length and a hasher fed so far.
async fn start_reading(
    c: &mut Raw,
    addr: SocketAddr,
    d: &str,
    first: usize,
) -> (usize, Sha256Digester) {
    c.send(get_request(addr, &blob_path(d)).as_bytes()).await;
    let r = c.head().await;
    assert_eq!(r.status, 200);
    let len: usize = r.header("content-length").unwrap().parse().unwrap();
    let mut h = Sha256Digester::default();
    h.update(&c.take(first).await);
    (len, h)
}

/// Reads the rest of a body of which `read` bytes were read, into `h`.
async fn finish_reading(c: &mut Raw, mut read: usize, len: usize, mut h: Sha256Digester) -> String {
    while read < len {
        let n = (len - read).min(MIB);
        h.update(&c.take(n).await);
        read += n;
    }
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_warm_blob_costs_no_cpu_nor_memory_and_then_gets_it_whole() {
    let w = Warm::start(&[64 * MIB], 1610, &[]).await;
    let d = &w.blobs[0].1;
    let size = w.size(0);
    let pid = w.proxy.pid();
    let rss_before = rss_anon(pid).unwrap();
    let rss = RssSampler::start(pid);

    let cpu_start = cpu_time(pid).unwrap();
    let mut c = Raw::connect_small(w.proxy.addr).await;
    let (len, h) = start_reading(&mut c, w.proxy.addr, d, MIB).await;
    assert_eq!(len as u64, size);
    // The client stops reading for a while: the pause is what is measured.
    let pause = Duration::from_secs(2);
    let (cpu0, t0) = (cpu_time(pid).unwrap(), Instant::now());
    tokio::time::sleep(pause).await;
    let (cpu, paused) = (cpu_time(pid).unwrap() - cpu0, t0.elapsed());
    let sent_paused = w.proxy.metric(SENT).await;
    let rss_paused = rss.peak();
    assert!(
        sent_paused < size,
        "the proxy is held by the reader, not done ({sent_paused} of {size} bytes sent)"
    );
    assert!(
        cpu < Duration::from_millis(200),
        "a client that stops reading costs no busy loop: {cpu:?} of CPU over {paused:?}"
    );

    let digest = finish_reading(&mut c, MIB, len, h).await;
    assert_eq!(&digest, d, "the body is exact after the pause");
    sent_is(&w.proxy, size, "the whole body left by sendfile").await;
    let cpu_all = cpu_time(pid).unwrap() - cpu_start;
    let rss_peak = rss.finish();
    let grew = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "slow reader: {cpu:?} CPU over a {paused:?} pause, {sent_paused} bytes sent by then; \
         {cpu_all:?} CPU for the whole 64 MiB answer; \
         RssAnon {} KiB before, peak {} KiB in the pause, {} KiB overall",
        rss_before >> 10,
        rss_paused >> 10,
        rss_peak >> 10
    );
    assert!(
        grew < 16 * MIB as u64,
        "serving a 64 MiB hit to a slow reader grows no memory: RssAnon grew by {} KiB",
        grew >> 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_reader_midway_through_a_warm_blob_finish_it() {
    // A grace period far longer than the rest of the body takes, however
    // slow the machine: the test is about finishing, not the deadline.
    let mut w = Warm::start(&[32 * MIB], 1620, &["--shutdown-grace", "5m"]).await;
    let d = w.blobs[0].1.clone();
    let size = w.size(0);
    let addr = w.proxy.addr;
    let mut c = Raw::connect_small(addr).await;
    let (len, h) = start_reading(&mut c, addr, &d, MIB).await;
    wait_for(
        || async { w.proxy.metric(SENT).await >= MIB as u64 },
        "the bytes read so far are counted as sent by sendfile",
    )
    .await;
    let sent = w.proxy.metric(SENT).await;
    assert!(
        sent < size,
        "the body is leaving by sendfile, and is held mid-way ({sent} of {size} bytes)"
    );

    w.proxy.signal("-TERM");
    let termed = Instant::now();
    let admin = w.proxy.admin;
    wait_listeners_closed(addr, admin).await;
    let digest = finish_reading(&mut c, MIB, len, h).await;
    assert_eq!(digest, d, "the body in flight completes, exact");
    c.closes("the connection is closed after the drained answer")
        .await;
    assert!(w.proxy.wait_exit(PATIENCE), "then the proxy exits 0");
    eprintln!(
        "drain: the body in flight finished and the proxy exited {:?} after SIGTERM",
        termed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_body_leaves_the_proxy_serving_others() {
    let w = Warm::start(&[32 * MIB], 1630, &[]).await;
    let (data, d) = &w.blobs[0];
    let size = w.size(0);
    let addr = w.proxy.addr;
    let mut c = Raw::connect_small(addr).await;
    start_reading(&mut c, addr, d, MIB).await;
    let cut_off = || {
        w.proxy
            .logs()
            .matches("connection ended with an error")
            .count()
    };
    let before = cut_off();
    drop(c);
    wait_until(|| cut_off() > before, "the proxy saw the client hang up").await;
    let cut = w.proxy.metric(SENT).await;
    assert!(
        cut >= MIB as u64 && cut < size,
        "the cut body sent what was read and less than the blob by sendfile ({cut} of {size})"
    );

    let (st, _, body) = get(&format!("{}{}", w.proxy.url(), blob_path(d)), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        body.unwrap()[..] == data[..],
        "the next client gets it exact"
    );
    sent_is(
        &w.proxy,
        cut + size,
        "the next client's body left whole by sendfile",
    )
    .await;
}
