//! Listeners that cannot be starved: a header timeout that also closes idle
//! kept-alive connections, a connection cap that holds what is past it
//! without touching transfers in flight, places on the admin port that a
//! flood from elsewhere cannot take; and one process per cache dir.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `s` until the peer closes (EOF or reset) or `deadline`;
/// returns when it closed, or `None` if it was still open.
async fn closed_by(s: &mut TcpStream, deadline: tokio::time::Instant) -> Option<Instant> {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_unfinished_headers_on_the_admin_port_are_closed_and_metrics_still_answer() {
    raise_fd_limit();
    let cache = temp_dir("cache");
    // No upstream is needed: nothing here reaches it.
    // A cap above the flood, so that every slow connection is held (and
    // must be closed by the timeout) and one more still fits.
    let proxy = Proxy::start(
        "http://127.0.0.1:9",
        cache.path(),
        &["--header-read-timeout", "2s", "--max-connections", "1024"],
    );
    let timeout = Duration::from_secs(2);
    let before = rss_anon(proxy.pid()).unwrap();

    let opened = Instant::now();
    let mut conns = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut s = TcpStream::connect(proxy.admin).await.unwrap();
        // A request head that never ends.
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        conns.push(s);
    }
    let all_open = Instant::now();

    let during = std::time::Instant::now();
    let (st, _, body) = get(&format!("http://{}/metrics", proxy.admin), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "/metrics should answer while a thousand slow connections are open"
    );
    assert!(body.unwrap().starts_with(b"# HELP"));
    assert!(
        during.elapsed() < Duration::from_secs(1),
        "/metrics should answer at once, not after the slow connections"
    );
    let rss_flood = rss_anon(proxy.pid()).unwrap();

    // Every connection is closed by the proxy within the timeout (counted
    // from when the last was opened) plus a margin for a loaded machine.
    let deadline = tokio::time::Instant::from_std(all_open + timeout + Duration::from_secs(3));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| tokio::spawn(async move { closed_by(&mut s, deadline).await }))
        .collect();
    let mut earliest = None::<Instant>;
    for t in tasks {
        let at = t
            .await
            .unwrap()
            .expect("every unfinished request head should be closed within the header timeout");
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    assert!(
        earliest.unwrap() >= opened + timeout - Duration::from_millis(200),
        "the connections should be closed by the header timeout, not refused at once"
    );
    eprintln!(
        "RssAnon: {} KiB before, {} KiB with 1000 slow admin connections",
        before >> 10,
        rss_flood >> 10
    );

    assert_eq!(
        proxy.metric("regproxy_connections_refused_total").await,
        0,
        "a thousand connections are under the cap"
    );
    let (st, _, _) = get(&format!("http://{}/healthz", proxy.admin), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the admin port still answers afterwards"
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let cache = temp_dir("cache");
    let proxy = Proxy::start(
        "http://127.0.0.1:9",
        cache.path(),
        &["--header-read-timeout", "1s"],
    );
    for addr in [proxy.addr, proxy.admin] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let path = if addr == proxy.admin { "/healthz" } else { "/" };
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Read the whole answer: a head and a short body.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "{addr} should answer before closing");
            got.extend_from_slice(&buf[..n]);
        }
        let answered = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        let closed = closed_by(&mut s, deadline)
            .await
            .expect("an idle kept-alive connection should be closed within the header timeout");
        assert!(
            closed >= answered + Duration::from_millis(800),
            "{addr}: the connection should be kept alive for the timeout, not closed at once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_connections_wait_and_a_transfer_in_flight_is_untouched() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let data = blob(4 << 20, 81);
    let digest = reg.put_blob_files("team/cap", &data);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(
        &gate.url(),
        cache.path(),
        &["--max-connections", "4", "--header-read-timeout", "3s"],
    );
    proxy.wait_learned_open();

    // A download that is in flight, stalled half-way by the gate.
    gate.hold_after(2 << 20);
    let url = format!("{}/v2/team/cap/blobs/{digest}", proxy.url());
    let transfer = tokio::spawn(async move { get(&url, &[]).await });
    wait_until(|| gate.passed() >= 2 << 20, "the transfer started").await;

    // Three idle connections fill the cap of four.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // A fifth waits in the backlog, unanswered, until a place frees:
    // clients do not retry a refusal, so none is made.
    let mut fifth = TcpStream::connect(proxy.addr).await.unwrap();
    fifth
        .write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), fifth.read_to_end(&mut answer))
            .await
            .is_err(),
        "a connection past the cap waits, neither answered nor closed: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // Once the idle connections are gone, it is served.
    drop(idle);
    tokio::time::timeout(Duration::from_secs(10), fifth.read_to_end(&mut answer))
        .await
        .expect("the waiting connection is served once a place frees")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "the waiting connection gets its answer, got {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        proxy.metric("regproxy_connections_refused_total").await,
        0,
        "the API refuses no connection"
    );

    // The transfer in flight goes on to the end, every byte right.
    gate.open();
    let (st, _, body) = tokio::time::timeout(Duration::from_secs(30), transfer)
        .await
        .expect("the transfer in flight should finish")
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let body = body.expect("the transfer in flight should not be cut");
    assert_eq!(
        sha256_digest(&body),
        digest,
        "the transfer in flight should deliver its blob whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_admin_port_from_elsewhere_leaves_the_nodes_own_probes_a_place() {
    raise_fd_limit();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(
        "http://127.0.0.1:9",
        cache.path(),
        &["--header-read-timeout", "30s", "--max-connections", "16"],
    );
    // The flood comes from another address (on a node: other pods); the
    // admin listener is on 127.0.0.1, the node's own address here.
    let mut flood = Vec::new();
    for _ in 0..200 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(proxy.admin).await.unwrap();
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await;
        flood.push(s);
    }
    wait_for(
        || async { proxy.metric("regproxy_connections_refused_total").await >= 184 },
        "the flood past the admin cap of 16 is refused",
    )
    .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (st, _, _) = tokio::time::timeout(
            Duration::from_secs(5),
            get(&format!("http://{}{path}", proxy.admin), &[]),
        )
        .await
        .expect("the node's own request is answered at once");
        assert_eq!(
            st,
            StatusCode::OK,
            "{path} answers the node itself while its admin port is flooded from elsewhere"
        );
    }
    drop(flood);
}

fn serve_again(cache_dir: &std::path::Path) -> std::process::Output {
    let child = Command::new(regproxy_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .arg("--cache-dir")
        .arg(cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // It must exit at once; if it does not, stop it so the test can fail.
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    out
}

#[test]
fn a_second_serve_on_the_same_cache_dir_exits_at_once_and_touches_nothing() {
    let cache = temp_dir("cache");
    let first = Proxy::start("http://127.0.0.1:9", cache.path(), &[]);
    let part = cache.path().join("tmp/0-0.part");
    std::fs::write(&part, b"a fill in flight").unwrap();

    let started = Instant::now();
    let out = serve_again(cache.path());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a second serve on a held cache dir should exit at once"
    );
    assert!(
        !out.status.success(),
        "a second serve on a held cache dir should fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "the refusal should be one line: {err}"
    );
    assert!(
        err.contains(&cache.path().display().to_string())
            && err.contains(&format!("pid {}", first.pid())),
        "the refusal should name the dir and the holder's pid: {err}"
    );
    assert_eq!(
        std::fs::read(&part).unwrap(),
        b"a fill in flight",
        "the second process must not sweep the first one's temp files"
    );

    // The lock goes with the process: a successor starts once it is gone.
    drop(first);
    let second = Proxy::start("http://127.0.0.1:9", cache.path(), &[]);
    assert!(
        !part.exists(),
        "the new holder sweeps what the old one left"
    );
    drop(second);
}
