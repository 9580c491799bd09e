//! A successor `regproxy serve` beside the one it replaces, on one address
//! and one cache dir: what each sees of the other's work. (The whole
//! handover under client load is in `handover.rs`.)

mod support;

use http::StatusCode;
use support::*;

const MIB: usize = 1 << 20;

/// `regproxy probe ENDPOINT --socket SOCK`: its exit code, and what it said.
fn probe(sock: &std::path::Path, endpoint: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(regproxy_bin())
        .args(["probe", endpoint, "--socket"])
        .arg(sock)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), said)
}

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The body of `GET path` on a probe socket.
fn ask_socket(sock: &std::path::Path, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// A loopback address and port for a proxy and its successors.
fn shared_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

type Answer = tokio::task::JoinHandle<(StatusCode, http::HeaderMap, Result<bytes::Bytes, String>)>;

/// A 16 MiB blob being filled by an old process, held at the uplink a
/// quarter in, and its successor started beside it on the same address
/// and cache dir; each with a probe socket of its own.
struct Spanning {
    _reg: Registry,
    gate: Gate,
    cache: TempDir,
    _socks: TempDir,
    old: Proxy,
    new: Proxy,
    old_sock: std::path::PathBuf,
    new_sock: std::path::PathBuf,
    url: String,
    d: String,
    size: usize,
    /// The old process's client, until a test takes it.
    first: Option<Answer>,
}

impl Spanning {
    async fn start(seed: u64) -> Spanning {
        let reg = Registry::start();
        let gate = Gate::start(reg.addr).await;
        let cache = temp_dir("cache");
        let listen = shared_listen();
        let socks = temp_dir("probe");
        let (old_sock, new_sock) = (socks.path().join("old.sock"), socks.path().join("new.sock"));
        let args = |sock: &std::path::Path| -> Vec<String> {
            let sock = sock.to_str().unwrap();
            ["--shutdown-grace", "5m", "--probe-socket", sock]
                .map(String::from)
                .to_vec()
        };
        let (old_args, new_args) = (args(&old_sock), args(&new_sock));
        let old = Proxy::start_on(&listen, &gate.url(), cache.path(), &args_of(&old_args));
        old.wait_learned_open();
        let size = 16 * MIB;
        let d = push_blob(&reg.url(), "team/app", &blob(size, seed)).await;
        let url = format!("http://{listen}/v2/team/app/blobs/{d}");
        // The old process fills the blob; the uplink stalls a quarter in.
        gate.hold_after(4 * MIB as u64);
        let first = spawn_get(&url);
        wait_until(
            || gate.passed() >= 4 * MIB as u64,
            "the old process's fill is under way",
        )
        .await;
        let new = Proxy::start_on(&listen, &gate.url(), cache.path(), &args_of(&new_args));
        Spanning {
            _reg: reg,
            gate,
            cache,
            _socks: socks,
            old,
            new,
            old_sock,
            new_sock,
            url,
            d,
            size,
            first: Some(first),
        }
    }

    /// SIGTERM to the old process; once it stopped listening, a client of
    /// the successor asks for the blob and the successor follows the fill.
    async fn hand_over(&self) -> Answer {
        self.old.signal("-TERM");
        let admin = self.old.admin;
        wait_until(
            || std::net::TcpStream::connect(admin).is_err(),
            "the old process stopped listening",
        )
        .await;
        let second = spawn_get(&self.url);
        wait_for(
            || async { self.new.metric("regproxy_fills_inflight").await == 1 },
            "the successor follows the fill in flight",
        )
        .await;
        second
    }
}

fn spawn_get(url: &str) -> Answer {
    let url = url.to_owned();
    tokio::spawn(async move { get(&url, &[]).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_follows_the_old_ones_fill_and_fetches_nothing_itself() {
    let mut s = Spanning::start(31).await;
    assert!(
        s.old.cache_path(&s.d).exists() || !temp_files(s.cache.path()).is_empty(),
        "the successor's start swept nothing of the live fill"
    );
    // Each pod's probes reach its own process through its probe socket,
    // while the TCP addresses are shared.
    for (who, p, sock) in [
        ("old", &s.old, &s.old_sock),
        ("successor", &s.new, &s.new_sock),
    ] {
        assert_eq!(probe(sock, "readyz").0, Some(0), "{who} is ready");
        let id = ask_socket(sock, regproxy::instance::PATH);
        let (_, _, by_tcp) = get(
            &format!("http://{}{}", p.admin, regproxy::instance::PATH),
            &[],
        )
        .await;
        assert_eq!(
            id.as_bytes(),
            &by_tcp.unwrap()[..],
            "{who}'s socket is its own"
        );
    }
    assert_ne!(
        ask_socket(&s.old_sock, regproxy::instance::PATH),
        ask_socket(&s.new_sock, regproxy::instance::PATH)
    );
    // Every new connection reaches the successor from here on.
    let second = s.hand_over().await;
    // Draining, the old pod is alive and not ready, by its own socket.
    assert_eq!(probe(&s.old_sock, "healthz").0, Some(0));
    let (code, out) = probe(&s.old_sock, "readyz");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("shutting down"), "{out}");
    s.gate.open();

    let first = s.first.take().unwrap();
    for (who, r) in [("old", first), ("successor", second)] {
        let (st, _, body) = r.await.unwrap();
        assert_eq!(st, StatusCode::OK, "{who}'s client");
        assert_eq!(sha256_digest(&body.unwrap()), s.d, "{who}'s client");
    }
    assert!(
        s.old.wait_exit(PATIENCE),
        "the old process drains and exits 0"
    );
    s.new.fills_done().await;
    assert_eq!(
        s.new.metric("regproxy_upstream_bytes_total").await,
        0,
        "the successor took the blob from the old process's fill"
    );
    assert!(
        s.gate.passed() < (s.size + MIB) as u64,
        "the blob crossed the uplink once: {} bytes for {}",
        s.gate.passed(),
        s.size
    );
    assert!(s.new.cache_path(&s.d).exists());
    let left = temp_files(s.cache.path());
    assert!(left.is_empty(), "nothing is left in tmp/: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_the_old_one_commits_is_seen_and_the_cap_holds_once_it_exits() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let listen = shared_listen();
    let cap = 3 * MIB as u64;
    let args = ["--cache-size", "3MiB"];
    let mut old = Proxy::start_on(&listen, &gate.url(), cache.path(), &args);
    old.wait_learned_open();
    let url = |d: &str| format!("http://{listen}/v2/team/app/blobs/{d}");
    let size = MIB;
    let reg_url = reg.url();
    let mut seed = 40;
    let mut next_blob = || {
        seed += 1;
        let (u, data) = (reg_url.clone(), blob(size, seed));
        async move { push_blob(&u, "team/app", &data).await }
    };
    // Two committed before the successor builds its index.
    for _ in 0..2 {
        let d = next_blob().await;
        assert_eq!(get(&url(&d), &[]).await.0, StatusCode::OK);
    }
    old.fills_done().await;
    let new = Proxy::start_on(&listen, &gate.url(), cache.path(), &args);

    // New connections go to either process: pull fresh blobs until each has
    // committed some that the other never indexed.
    let commits = "regproxy_cache_commits_total";
    let (old0, new0) = (old.metric(commits).await, new.metric(commits).await);
    let mut by_old = None;
    for _ in 0..60 {
        let d = next_blob().await;
        let before = old.metric(commits).await;
        let (st, _, body) = get(&url(&d), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body.unwrap()), d);
        old.fills_done().await;
        new.fills_done().await;
        if old.metric(commits).await > before {
            // The old process's newest: neither process evicts it meanwhile.
            by_old = Some(d);
        }
        if by_old.is_some() && new.metric(commits).await >= new0 + 2 {
            break;
        }
    }
    let by_old = by_old.expect("the kernel spread the connections over both");
    assert!(new.metric(commits).await >= new0 + 2 && old.metric(commits).await > old0);

    // What the old process committed after the successor built its index,
    // the successor serves from disk: a miss looks there before it fetches.
    let hit = "regproxy_requests_total{kind=\"blob\",result=\"hit\"}";
    let passed = gate.passed();
    let mut served_by_new = false;
    for _ in 0..40 {
        let before = new.metric(hit).await;
        let (st, _, body) = get(&url(&by_old), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body.unwrap()), by_old);
        if new.metric(hit).await > before {
            served_by_new = true;
            break;
        }
    }
    assert!(
        served_by_new,
        "the kernel sent one of 40 connections to the successor"
    );
    assert_eq!(gate.passed(), passed, "from the disk, not the uplink");

    old.signal("-TERM");
    assert!(old.wait_exit(PATIENCE), "the old process exits 0");
    // The successor, alone with the dir, counts what the old one committed
    // and evicts down to the cap.
    wait_until(
        || new.logs().contains("the cache dir is ours alone now"),
        "the successor takes the cache dir over",
    )
    .await;
    // Each process kept its own view of the dir under the cap while both
    // ran; now the successor's index is the disk, and the cap holds on it.
    assert_eq!(
        new.metric("regproxy_cache_bytes").await,
        new.cached_bytes(),
        "the index counts what is on disk"
    );
    assert!(
        new.cached_bytes() <= cap,
        "the cap holds on disk: {} bytes",
        new.cached_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_resumes_from_the_upstream_when_the_old_one_dies_mid_fill() {
    let mut s = Spanning::start(32).await;
    let second = s.hand_over().await;
    // The old process dies with its fill; its held connection stays held.
    s.old.signal("-KILL");
    s.old.wait_exit(PATIENCE);

    let (st, _, body) = second.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        sha256_digest(&body.expect("the successor's client gets the whole blob")),
        s.d
    );
    let first = s.first.take().unwrap();
    let (_, _, body) = first.await.unwrap();
    assert!(body.is_err(), "the killed process's client saw a cut body");
    let new = &s.new;
    let d = &s.d;
    let cache = &s.cache;
    new.fills_done().await;
    let fetched = new.metric("regproxy_upstream_bytes_total").await;
    assert!(
        fetched <= (12 * MIB + MIB) as u64,
        "the successor fetched only what the old fill lacked: {fetched} bytes"
    );
    assert_eq!(new.metric("regproxy_upstream_errors_total").await, 0);
    assert!(new.cache_path(d).exists());
    wait_until(
        || temp_files(cache.path()).is_empty(),
        "the dead process's temp files are swept once the successor holds the dir",
    )
    .await;
}
