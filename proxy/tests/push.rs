//! The push protocol through the proxy: streamed both ways, `Location`
//! pointing back at the proxy, memory bounded for a 1 GiB layer.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

const MIB: usize = 1 << 20;

/// Opens an upload session of `repo` through the proxy; its `Location`.
async fn start_upload(proxy: &Proxy, repo: &str) -> String {
    let url = format!("{}/v2/{repo}/blobs/uploads/", proxy.url());
    let (st, h, _) = request(Method::POST, &url, &[], Bytes::new()).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    h["location"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1gib_layer_push_streams_through_with_bounded_memory() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);

    let location = start_upload(&proxy, "team/big").await;
    assert!(
        location.starts_with(&proxy.url()),
        "Location points back at the proxy, not the upstream: {location}"
    );

    // 1 GiB made on the fly, hashed on the way out: nothing holds it whole.
    const TOTAL: usize = 1024 * MIB;
    let chunk = Bytes::from(blob(MIB, 1));
    let mut hasher = Sha256Digester::default();
    for _ in 0..TOTAL / MIB {
        hasher.update(&chunk);
    }
    let digest = hasher.finish();
    let frames = futures_util::stream::iter(
        (0..TOTAL / MIB)
            .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let req = Request::patch(&location)
        .header("content-type", "application/octet-stream")
        .body(StreamBody::new(frames))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let sampler = RssSampler::start(proxy.pid());
    let resp = client.request(req).await.unwrap();
    let peak_kib = sampler.finish() >> 10;
    assert_eq!(
        resp.status(),
        StatusCode::ACCEPTED,
        "the upstream took the 1 GiB PATCH"
    );
    assert_eq!(resp.headers()["range"], format!("0-{}", TOTAL - 1).as_str());
    let next = resp.headers()["location"].to_str().unwrap().to_owned();
    assert!(next.starts_with(&proxy.url()));
    let _ = resp.into_body().collect().await;
    assert!(
        peak_kib < 64 * 1024,
        "regproxy's anonymous memory stayed under 64 MiB during the push ({peak_kib} KiB)"
    );

    let sep = if next.contains('?') { '&' } else { '?' };
    let (st, h, _) = request(
        Method::PUT,
        &format!("{next}{sep}digest={digest}"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::CREATED,
        "the upload completes through the proxy"
    );
    assert_eq!(h["docker-content-digest"], digest.as_str());
    let (st, h, _) = request(
        Method::HEAD,
        &format!("{}/v2/team/big/blobs/{digest}", reg.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h["content-length"],
        TOTAL.to_string().as_str(),
        "the upstream holds the whole layer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_uploads_and_cross_repo_mounts_pass_through() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let data = blob(100_000, 2);
    let d = sha256_digest(&data);
    let d = d.as_str();
    // Distribution 2.8 answers a POST with ?digest= by opening a session
    // (202), and the proxy relays just that; then a monolithic PUT ends it.
    let body = Bytes::from(data);
    let post = |base: String| {
        let body = body.clone();
        async move {
            let url = format!("{base}/v2/team/a/blobs/uploads/?digest={d}");
            request(
                Method::POST,
                &url,
                &[("content-type", "application/octet-stream")],
                body,
            )
            .await
        }
    };
    let (direct, _, _) = post(reg.url()).await;
    let (st, h, _) = post(proxy.url()).await;
    assert_eq!(st, direct, "the proxy answers what the upstream answers");
    let location = h["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&proxy.url()));
    if st == StatusCode::ACCEPTED {
        let (st, _, _) = request(
            Method::PUT,
            &format!("{location}&digest={d}"),
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "a monolithic PUT completes the upload"
        );
    }

    let (st, _, _) = request(
        Method::POST,
        &format!(
            "{}/v2/team/b/blobs/uploads/?mount={d}&from=team/a",
            proxy.url()
        ),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::CREATED,
        "a cross-repository mount passes through"
    );
    let (st, _, body) = get(&format!("{}/v2/team/b/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d);

    let (st, _, _) = request(
        Method::DELETE,
        &format!("{}/v2/team/b/blobs/{d}", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "a DELETE is relayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_body_that_stalls_is_ended_and_its_upstream_request_aborted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that takes the request and never answers: it only notes
    // when the proxy's connection to it closes.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = up.accept().await else {
                return;
            };
            let tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0usize;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let _ = tx.send((std::time::Instant::now(), got));
            });
        }
    });

    let cache = temp_dir("cache");
    let proxy = Proxy::start(
        &format!("http://{up_addr}"),
        cache.path(),
        &["--upstream-timeout", "2s"],
    );
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            b"PATCH /v2/team/stall/blobs/uploads/0f1e2d HTTP/1.1\r\nhost: x\r\n\
              content-type: application/octet-stream\r\ncontent-length: 1048576\r\n\r\n",
        )
        .await
        .unwrap();
    client.write_all(&[7u8; 4096]).await.unwrap();
    let stalled = std::time::Instant::now();

    // The proxy gives up on the silent client within the timeout and a margin.
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(8),
        client.read_to_end(&mut answer),
    )
    .await;
    assert!(
        ended.is_ok(),
        "a push body silent for --upstream-timeout should end the request"
    );
    let waited = stalled.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1800),
        "the client should be given the whole timeout, it was cut after {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "the stalled push is the client's failure, answered 408, not blamed on the upstream: {answer}"
    );

    // And the upstream request was aborted, not left open.
    let (closed, got) = tokio::time::timeout(std::time::Duration::from_secs(5), closed_rx.recv())
        .await
        .expect("the upstream connection of a stalled push should be closed")
        .unwrap();
    assert!(
        got > 0,
        "the upstream should have seen the request before it was aborted"
    );
    assert!(
        closed.duration_since(stalled) < std::time::Duration::from_secs(8),
        "the upstream request should be aborted within the timeout and a margin"
    );
}

/// Opens a connection that sends a `PUT` of a manifest with `Content-Length:
/// len` and all of its body but the last 16 bytes, then waits; returns the
/// proxy's answer once it ends the request.
async fn trickled_manifest_push(proxy: std::net::SocketAddr, len: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "PUT /v2/team/flood/manifests/t HTTP/1.1\r\nhost: x\r\n\
         content-type: application/vnd.oci.image.manifest.v1+json\r\n\
         content-length: {len}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    // The proxy may not read it all before it answers: a write it refuses is fine.
    let _ = c.write_all(&vec![b' '; len - 16]).await;
    let mut answer = Vec::new();
    // The proxy may also just close the connection after its answer.
    let _ = tokio::time::timeout(PATIENCE, c.read_to_end(&mut answer))
        .await
        .expect("the proxy should end a push whose body never completes");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_trickled_manifest_pushes_waits_for_room_instead_of_growing_memory() {
    const PUSHES: usize = 64;
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &["--upstream-timeout", "1s"]);
    let rss = RssSampler::start(proxy.pid());

    // Each would hold 1 MiB in memory if its body were read at once.
    let answers = futures_util::future::join_all(
        (0..PUSHES).map(|_| trickled_manifest_push(proxy.addr, MIB)),
    )
    .await;
    let peak = rss.finish();
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.1 408"),
            "a push that never finishes its body is the client's timeout: {a}"
        );
    }
    assert!(
        peak < 40 * MIB as u64,
        "{PUSHES} pushes of 1 MiB that never finish should share the push budget, \
         not take {} MiB",
        peak >> 20
    );

    // One larger than any manifest is refused before its body is read: its
    // head alone gets the answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /v2/team/flood/manifests/t HTTP/1.1\r\nhost: x\r\n\
         content-type: application/vnd.oci.image.manifest.v1+json\r\n\
         content-length: {}\r\n\r\n",
        4 * MIB + 1
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(PATIENCE, c.read(&mut answer))
        .await
        .expect("an oversized manifest push is answered at once")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_push_is_not_an_upstream_error() {
    use tokio::io::AsyncWriteExt;
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let location = start_upload(&proxy, "team/gone").await;
    let path = location.strip_prefix(&proxy.url()).unwrap().to_owned();
    let before = proxy.metric("regproxy_upstream_errors_total").await;

    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
         content-length: {MIB}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&[7u8; 4096]).await.unwrap();
    drop(c);

    let logs = || proxy.logs();
    wait_until(
        || logs().contains("request body broke off"),
        "the proxy to see the client's body break off",
    )
    .await;
    assert_eq!(
        proxy.metric("regproxy_upstream_errors_total").await,
        before,
        "a client that hangs up is not the upstream's failure: {}",
        proxy.logs()
    );
}
