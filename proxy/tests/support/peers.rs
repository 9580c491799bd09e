//! What the peers tests (issue 11) need beyond the rest of the folder: a
//! cluster of `regproxy serve` nodes, each on a loopback address of its own
//! with a peer listener and the same `--peers` list; the owner of a digest by
//! the rendezvous rule, computed as the nodes compute it; many clients at
//! once, each body hashed as it streams; a fake peer that serves flipped
//! bytes; and a DNS server the test controls, with a mount namespace whose
//! `/etc/resolv.conf` names it, for `--peers dns:NAME:PORT`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::handover::get_counting;
use super::stub::{answer, Stub};
use super::{request, succeeded, temp_dir, wait_for, Proxy, Registry, TempDir, PATIENCE};

/// The secret every node of a test cluster reads from its
/// `--peer-secret-file` (printable, no spaces, over 16 bytes).
pub const SECRET: &str = "regproxy-test-peer-secret-0123456789";

/// A secret of the right form that is not [`SECRET`].
pub const WRONG_SECRET: &str = "regproxy-test-peer-secret-wrong-0000";

/// A `regproxy serve` with peers on: the proxy, the address of its peer
/// listener, and its cache dir.
pub struct Node {
    pub proxy: Proxy,
    pub peer: SocketAddr,
    _cache: TempDir,
}

impl Node {
    /// `http://IP:PORT` of its API listener.
    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// `http://IP:PORT` of its peer listener.
    pub fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    /// The API URL of blob `digest` of `repo`.
    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.url())
    }

    /// Metric `name` (with its labels), 0 while it is not rendered: a counter
    /// with labels may show only once it counted.
    pub async fn metric0(&self, name: &str) -> u64 {
        self.proxy.metrics().await.get(name).copied().unwrap_or(0)
    }

    /// `kill -9` of its process; returns once it is gone.
    pub fn kill(&mut self) {
        self.proxy.signal("-KILL");
        self.proxy.wait_exit(PATIENCE);
    }
}

/// A secret file (in a temp dir that lives as long as the returned handle).
pub fn secret_file() -> (TempDir, PathBuf) {
    let dir = temp_dir("peer-secret");
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    (dir, path)
}

/// A port that was free a moment ago on every one of `ips` (peer listeners
/// named by DNS share one port, and tests may run side by side).
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port was free on all of {ips:?} in 100 tries")
}

/// `127.0.<block>.<i>` for i in 1..=n: a test's own loopback addresses.
pub fn loopback_ips(block: u8, n: u8) -> Vec<IpAddr> {
    (1..=n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, block, i)))
        .collect()
}

/// Peer listener addresses for `ips`, each on a port free on it.
pub fn peer_addrs(ips: &[IpAddr]) -> Vec<SocketAddr> {
    ips.iter()
        .map(|ip| SocketAddr::new(*ip, free_port_on(&[*ip])))
        .collect()
}

/// `a,b,c` for `--peers`.
pub fn peer_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One real node on block `127.0.<block>.1`, whose `--peers` list also
/// names `127.0.<block>.2`, where a test's fake peer listens: the node,
/// the two peer addresses (the node's, the fake's) and the secret (keep
/// its dir alive).
pub fn node_beside_a_fake(
    reg: &Registry,
    block: u8,
    extra: &[&str],
) -> (Node, [SocketAddr; 2], (TempDir, PathBuf)) {
    let ips = loopback_ips(block, 2);
    let addrs = peer_addrs(&ips);
    let secret = secret_file();
    let node = start_node(
        ips[0],
        addrs[0],
        &peer_list(&addrs),
        &secret.1,
        &reg.url(),
        extra,
    );
    (node, [addrs[0], addrs[1]], secret)
}

/// A blob of `len` bytes (seeds from `seed` on) that `owner_addr` owns
/// among `addrs` by the rendezvous rule, pushed to `reg`: its digest and
/// bytes.
pub fn blob_owned_by(
    reg: &Registry,
    repo: &str,
    owner_addr: SocketAddr,
    addrs: &[SocketAddr],
    (len, seed): (usize, u64),
) -> (String, Vec<u8>) {
    let (d, data) = (seed..)
        .map(|seed| super::blob(len, seed))
        .map(|data| (super::sha256_digest(&data), data))
        .find(|(d, _)| owner(d, addrs) == owner_addr)
        .expect("some blob is owned by each address");
    reg.put_blob_files(repo, &data);
    (d, data)
}

/// Starts a node: API on `api_ip` (port 0), peer listener on `peer`,
/// `--peers peers` (a list or `dns:NAME:PORT`), the secret in `secret`,
/// `extra` flags added.
pub fn start_node(
    api_ip: IpAddr,
    peer: SocketAddr,
    peers: &str,
    secret: &Path,
    upstream: &str,
    extra: &[&str],
) -> Node {
    let cache = temp_dir("peer-cache");
    let peer_listen = peer.to_string();
    let mut args = vec![
        "--peers",
        peers,
        "--peer-listen",
        &peer_listen,
        "--peer-secret-file",
        secret.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let proxy = Proxy::start_on(
        &SocketAddr::new(api_ip, 0).to_string(),
        upstream,
        cache.path(),
        &args,
    );
    Node {
        proxy,
        peer,
        _cache: cache,
    }
}

/// Nodes on `127.0.<block>.1..=n`, each with the same static `--peers` list
/// of all of them (itself included), before `upstream`.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The `--peers` list every node got.
    pub list: String,
    pub secret: PathBuf,
    upstream: String,
    extra: Vec<String>,
    _secret: TempDir,
}

impl Cluster {
    pub fn start(block: u8, n: u8, upstream: &str, extra: &[&str]) -> Cluster {
        let ips = loopback_ips(block, n);
        let addrs = peer_addrs(&ips);
        let list = peer_list(&addrs);
        let (secret_dir, secret) = secret_file();
        let nodes = ips
            .iter()
            .zip(&addrs)
            .map(|(ip, peer)| start_node(*ip, *peer, &list, &secret, upstream, extra))
            .collect();
        Cluster {
            nodes,
            list,
            secret,
            upstream: upstream.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _secret: secret_dir,
        }
    }

    /// Starts node `i` again (after it was killed): the same addresses and
    /// flags, a new, empty cache, as a node that joins.
    pub fn restart(&mut self, i: usize) {
        let old = &self.nodes[i];
        let (ip, peer) = (old.proxy.addr.ip(), old.peer);
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.nodes[i] = start_node(ip, peer, &self.list, &self.secret, &self.upstream, &extra);
    }

    /// Every node, for the helpers that take a few.
    pub fn all(&self) -> Vec<&Node> {
        self.nodes.iter().collect()
    }

    /// The peer listener addresses of every node.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.peer).collect()
    }

    /// The index of the node that owns `digest` among all of them.
    pub fn owner_of(&self, digest: &str) -> usize {
        let o = owner(digest, &self.peers());
        self.nodes.iter().position(|n| n.peer == o).unwrap()
    }
}

/// Waits until every node of `nodes` sees `live` live peers.
pub async fn wait_live(nodes: &[&Node], live: u64) {
    for n in nodes {
        wait_for(
            || async { n.metric0("regproxy_peers_live").await == live },
            &format!("node {} sees {live} live peers", n.peer),
        )
        .await;
    }
}

/// Waits until node `n`'s metric `name` is at least `at_least`.
pub async fn wait_metric(n: &Node, name: &str, at_least: u64) {
    wait_for(
        || async { n.metric0(name).await >= at_least },
        &format!("node {}'s {name} reaches {at_least}", n.peer),
    )
    .await;
}

/// The rendezvous weight of `peer` for `digest`, as the design defines it:
/// the first 8 bytes, big-endian, of sha256("<digest>\n<IP:PORT>").
pub fn weight(digest: &str, peer: &SocketAddr) -> u64 {
    let h = Sha256::digest(format!("{digest}\n{peer}").as_bytes());
    u64::from_be_bytes(h[..8].try_into().unwrap())
}

/// The owner of `digest` among `candidates` (live peers plus the asker).
pub fn owner(digest: &str, candidates: &[SocketAddr]) -> SocketAddr {
    *candidates
        .iter()
        .max_by_key(|p| weight(digest, p))
        .expect("at least one candidate")
}

/// What one client's GET got: status, digest of the body, its length; or
/// what cut it.
pub type Got = Result<(StatusCode, String, u64), String>;

/// Clients started at once: each a GET of its URL on a connection of its
/// own, its bytes so far in `progress`.
pub struct Clients {
    pub progress: Vec<Arc<AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<Got>>,
}

impl Clients {
    /// `per` GETs of each of `urls`, all at once; client `i` of URL `u` is
    /// number `u * per + i`.
    pub fn start(urls: &[String], per: usize) -> Clients {
        let mut progress = Vec::new();
        let mut tasks = Vec::new();
        for u in urls {
            for _ in 0..per {
                let p = Arc::new(AtomicU64::new(0));
                progress.push(Arc::clone(&p));
                tasks.push(tokio::spawn(get_counting(u.clone(), p)));
            }
        }
        Clients { progress, tasks }
    }

    /// What every client got, in start order.
    pub async fn results(self) -> Vec<Got> {
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("a client task does not panic"));
        }
        out
    }
}

/// Whether a client got `digest` whole with a 200.
pub fn verified(got: &Got, digest: &str) -> bool {
    matches!(got, Ok((StatusCode::OK, d, _)) if d == digest)
}

/// A peer that lies: it answers its liveness probe, and blob GETs of the
/// digests it was given with the right length but every byte flipped.
pub struct FakePeer {
    pub stub: Stub,
}

impl FakePeer {
    /// Serves on `addr`; `blobs` maps a digest to its true bytes.
    pub async fn start(addr: SocketAddr, blobs: HashMap<String, Vec<u8>>) -> FakePeer {
        let flipped: HashMap<String, Vec<u8>> = blobs
            .into_iter()
            .map(|(d, b)| (d, b.iter().map(|x| !x).collect()))
            .collect();
        let stub = Stub::start(&addr.to_string(), move |req| {
            let path = req.uri().path();
            if path == "/v2/" {
                return answer(200, &[("content-type", "application/json")], b"{}");
            }
            let digest = path.rsplit('/').next().unwrap_or_default();
            match flipped.get(digest) {
                Some(bytes) if path.contains("/blobs/") => answer(
                    200,
                    &[
                        ("content-type", "application/octet-stream"),
                        ("docker-content-digest", digest),
                    ],
                    bytes,
                ),
                _ => answer(
                    404,
                    &[("content-type", "application/json")],
                    br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
                ),
            }
        })
        .await;
        FakePeer { stub }
    }

    /// The blob requests it got so far (its probes aside).
    pub fn blob_requests(&self) -> Vec<String> {
        self.stub
            .requests()
            .into_iter()
            .filter(|r| r.contains("/blobs/"))
            .collect()
    }
}

/// A DNS server on `IP:53` that answers A queries for one name with the
/// addresses the test sets (TTL 1 s), and everything else with no records.
pub struct DnsServer {
    pub addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Serves on port 53 (a resolv.conf names no port) of the first of
    /// `127.0.<block>.53..` that is free: another run of the same test may
    /// hold one. `name` is fully qualified (`regproxy-peers.test.`).
    pub async fn start(block: u8, name: &str, answers: Vec<Ipv4Addr>) -> DnsServer {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::{rdata::A, Name, RData, Record, RecordType};
        use std::str::FromStr;

        let mut socket = None;
        for last in 53..100 {
            let ip = Ipv4Addr::new(127, 0, block, last);
            if let Ok(s) = tokio::net::UdpSocket::bind((ip, 53)).await {
                socket = Some(s);
                break;
            }
        }
        let socket = socket.expect("a free port 53 on one of 127.0.<block>.53..99");
        let addr = socket.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(answers));
        let queries = Arc::new(AtomicU64::new(0));
        let (a2, q2) = (Arc::clone(&answers), Arc::clone(&queries));
        let name = Name::from_str(name).unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.response_code = ResponseCode::NoError;
                reply.metadata.recursion_available = true;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                for q in query.queries.iter() {
                    reply.queries.push(q.clone());
                    let ours = q.name().to_lowercase() == name.to_lowercase();
                    if ours && q.query_type() == RecordType::A {
                        for ip in a2.lock().unwrap().iter() {
                            reply.answers.push(Record::from_rdata(
                                q.name().clone(),
                                1,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
            }
        });
        DnsServer {
            addr,
            answers,
            queries,
            task,
        }
    }

    /// What A queries get from now on.
    pub fn set(&self, answers: Vec<Ipv4Addr>) {
        *self.answers.lock().unwrap() = answers;
    }

    /// Queries answered so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `f` on a thread of its own in a new, private mount namespace whose
/// `/etc/resolv.conf` is a file saying `nameserver <nameserver>`, and
/// returns what it returns. Processes started from that thread (`regproxy`
/// through [`Proxy::start_on`]) live in that namespace: they read the test's
/// resolv.conf through the real path, while the rest of the machine, and
/// the test's other threads, keep theirs. The namespace goes away with the
/// last process in it.
pub fn with_resolv_conf<T: Send>(nameserver: IpAddr, f: impl FnOnce() -> T + Send) -> T {
    let dir = temp_dir("resolv");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n"),
    )
    .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare_mounts();
            let run = |args: &[&str]| {
                succeeded(
                    Command::new("mount").args(args).output().unwrap(),
                    &format!("mount {args:?} in the test's mount namespace"),
                )
            };
            // Nothing mounted here may show outside.
            run(&["--make-rprivate", "/"]);
            run(&["--bind", resolv.to_str().unwrap(), "/etc/resolv.conf"]);
            f()
        })
        .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Moves the calling thread (only it: it stops sharing its filesystem
/// attributes with the other threads) into a new mount namespace.
#[allow(unsafe_code)]
fn unshare_mounts() {
    extern "C" {
        fn unshare(flags: c_int) -> c_int;
    }
    const CLONE_NEWNS: c_int = 0x0002_0000;
    // SAFETY: unshare(2) reads only its integer argument; it changes nothing
    // but this thread's mount namespace (and its own copy of the fs struct).
    let r = unsafe { unshare(CLONE_NEWNS) };
    assert_eq!(
        r,
        0,
        "this thread should get a mount namespace of its own: {}",
        std::io::Error::last_os_error()
    );
}

/// How a [`StallingPeer`] fails a blob GET.
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// Reads the request and never answers.
    BeforeHead,
    /// Answers 200 with the right length and the first `n` right bytes,
    /// then sends nothing more (and keeps the connection open).
    After(usize),
    /// Answers 200 with the right length and sends the blob one byte every
    /// 100 ms: live, never silent, never done.
    Trickle,
    /// Answers 200 announcing `extra` bytes more than the blob has, sends
    /// the first `n` right bytes, and closes the connection.
    Oversized { extra: usize, n: usize },
}

/// A peer that answers its liveness probes at once but stalls on blobs, on
/// raw TCP so that it can stop in the middle of a body.
pub struct StallingPeer {
    blob_gets: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingPeer {
    /// Serves on `addr`; `blobs` maps a digest to its true bytes and how
    /// to stall on it.
    pub async fn start(addr: SocketAddr, blobs: HashMap<String, (Vec<u8>, Stall)>) -> StallingPeer {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let blobs = Arc::new(blobs);
        let blob_gets = Arc::new(AtomicU64::new(0));
        let gets = Arc::clone(&blob_gets);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (blobs, gets) = (Arc::clone(&blobs), Arc::clone(&gets));
                tokio::spawn(async move {
                    let mut s = BufReader::new(stream);
                    loop {
                        // The request line, then headers up to the blank line.
                        let mut first = String::new();
                        if s.read_line(&mut first).await.unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if s.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                        }
                        let path = first.split_whitespace().nth(1).unwrap_or_default();
                        if path == "/v2/" {
                            let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                            if s.get_mut().write_all(ok.as_bytes()).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let digest = path.rsplit('/').next().unwrap_or_default();
                        let Some((bytes, stall)) = blobs.get(digest) else {
                            let nf = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                            let _ = s.get_mut().write_all(nf.as_bytes()).await;
                            continue;
                        };
                        gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Stall::Oversized { extra, n } = stall {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                                 content-length: {}\r\n\r\n",
                                bytes.len() + extra
                            );
                            let w = s.get_mut();
                            let _ = w.write_all(head.as_bytes()).await;
                            let _ = w.write_all(&bytes[..*n]).await;
                            let _ = w.flush().await;
                            return;
                        }
                        if let Stall::Trickle = stall {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                                 content-length: {}\r\n\r\n",
                                bytes.len()
                            );
                            let w = s.get_mut();
                            let _ = w.write_all(head.as_bytes()).await;
                            let mut pace =
                                tokio::time::interval(std::time::Duration::from_millis(100));
                            for b in bytes.iter() {
                                pace.tick().await;
                                if w.write_all(&[*b]).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        if let Stall::After(n) = stall {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                                 docker-content-digest: {digest}\r\ncontent-length: {}\r\n\r\n",
                                bytes.len()
                            );
                            let w = s.get_mut();
                            let _ = w.write_all(head.as_bytes()).await;
                            let _ = w.write_all(&bytes[..*n]).await;
                            let _ = w.flush().await;
                        }
                        // Held open, silent, until the asker gives up.
                        let mut rest = Vec::new();
                        let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest).await;
                        return;
                    }
                });
            }
        });
        StallingPeer { blob_gets, task }
    }

    /// Blob GETs it got so far.
    pub fn blob_gets(&self) -> u64 {
        self.blob_gets.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for StallingPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// What the tests count and ask, by name.

/// Waits until no node has a fill in flight.
pub async fn fills_done(nodes: &[&Node]) {
    for n in nodes {
        n.proxy.fills_done().await;
    }
}

pub const OWNER_SELF: &str = "regproxy_peer_owner_total{owner=\"self\"}";
pub const OWNER_PEER: &str = "regproxy_peer_owner_total{owner=\"peer\"}";
pub const RECEIVED: &str = "regproxy_peer_bytes_received_total";
pub const SERVED: &str = "regproxy_peer_bytes_served_total";
pub const UPSTREAM_BYTES: &str = "regproxy_upstream_bytes_total";
/// Slack for the liveness probes' bodies in a byte counter.
pub const PROBES: u64 = 64 << 10;

pub fn peer_requests(outcome: &str) -> String {
    format!("regproxy_peer_requests_total{{outcome=\"{outcome}\"}}")
}

pub fn fallbacks(reason: &str) -> String {
    format!("regproxy_peer_fallbacks_total{{reason=\"{reason}\"}}")
}

/// A request to `url`, returning status, headers and the body (empty when
/// it was cut).
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let (st, h, body) = request(method, url, headers, Bytes::new()).await;
    (st, h, body.unwrap_or_default())
}

/// Users of [`private_registry`].
pub const ALICE: (&str, &str) = ("alice", "alices-pw");
pub const BOB: (&str, &str) = ("bob", "bobs-pw");

/// GETs of blob `d` that the upstream answered 200, once there are at
/// least `expected` (a refused one is logged too, with its 401).
pub async fn ok_gets(reg: &Registry, d: &str, expected: usize) -> usize {
    let needle = format!("/blobs/{d} HTTP/1.1\" 200 ");
    reg.logged(expected, &format!("200 GETs of {d}"), |l| {
        l.contains("\"GET /v2/") && l.contains(&needle)
    })
    .await
}

/// A registry whose every request needs alice's or bob's password.
pub fn private_registry() -> (Registry, TempDir) {
    Registry::start_private(&[ALICE, BOB])
}

/// GETs of blob `d` that the upstream answered 206 (a resume), once
/// there is one.
pub async fn ranged_gets(reg: &Registry, d: &str) -> usize {
    let needle = format!("/blobs/{d} HTTP/1.1\" 206 ");
    reg.logged(1, &format!("206 GETs of {d}"), |l| {
        l.contains("\"GET /v2/") && l.contains(&needle)
    })
    .await
}

/// An `Authorization: Basic` value.
pub fn basic((user, pw): (&str, &str)) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("printf '%s' '{user}:{pw}' | base64 -w0")])
        .output()
        .unwrap();
    format!("Basic {}", succeeded(out, "base64"))
}
