//! Pull-through behaviour against a real upstream (Debian's docker-registry)
//! and the real regproxy binary, both on loopback.

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const MIB: usize = 1 << 20;

async fn setup(args: &[&str]) -> (Registry, TempDir, Proxy) {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), args);
    (reg, cache, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_cold_gets_make_one_upstream_fetch() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    let data = blob(48 * MIB, 1);
    let d = push_blob(&reg.url(), "team/app", &data).await;
    let url = format!("{}/v2/team/app/blobs/{d}", proxy.url());
    // The uplink stalls early in the blob until all ten requests have joined
    // its fill: on a slow machine one that came only after the commit would
    // be a hit, and the test would not be about concurrent cold GETs.
    gate.hold_after(MIB as u64);
    let gets: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    let started = |m: HashMap<String, u64>| {
        m["regproxy_requests_total{kind=\"blob\",result=\"miss\"}"]
            + m["regproxy_requests_total{kind=\"blob\",result=\"coalesced\"}"]
    };
    wait_for(
        || async { started(proxy.metrics().await) == 10 },
        "all ten requests are answered from the one fill",
    )
    .await;
    gate.open();
    for g in futures_util::future::join_all(gets).await {
        let (st, h, body) = g.unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h["docker-content-digest"], d.as_str());
        assert_eq!(
            sha256_digest(&body.expect("every client gets the whole body")),
            d,
            "every body hashes to the digest"
        );
    }
    assert_eq!(
        reg.blob_gets_logged(&d, 1).await,
        1,
        "ten concurrent cold GETs make exactly one upstream GET"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        m["regproxy_requests_total{kind=\"blob\",result=\"miss\"}"],
        1
    );
    assert_eq!(
        m["regproxy_requests_total{kind=\"blob\",result=\"coalesced\"}"], 9,
        "the other nine follow the fill"
    );
    assert_eq!(
        m["regproxy_upstream_bytes_total"],
        data.len() as u64,
        "the blob crossed the uplink once"
    );
    assert_eq!(
        m["regproxy_served_cache_bytes_total"],
        10 * data.len() as u64
    );

    proxy.fills_done().await;
    assert!(proxy.cache_path(&d).exists(), "the blob is committed");
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d);
    assert_eq!(reg.blob_gets(&d), 1, "a later GET is served from the node");

    assert_eq!(
        proxy
            .metric("regproxy_requests_total{kind=\"blob\",result=\"hit\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_bytes_reach_the_client_before_the_upstream_finishes() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let data = blob(16 * MIB, 2);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.hold_after(4 * MIB as u64); // the uplink stalls a quarter of the way in
    let resp = hyper_get_streaming(&format!("{}/v2/team/app/blobs/{d}", proxy.url())).await;
    let (parts, mut body) = resp.into_parts();
    assert_eq!(parts.status, StatusCode::OK);
    use http_body_util::BodyExt;
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("bytes arrive while the upstream is still stalled")
        .unwrap()
        .unwrap();
    assert!(!first.data_ref().unwrap().is_empty());
    assert!(
        gate.passed() < data.len() as u64,
        "the upstream has not sent the whole blob yet"
    );
    gate.open();
    let rest = body
        .collect()
        .await
        .expect("the body completes once the uplink flows")
        .to_bytes();
    let mut all = first.into_data().unwrap().to_vec();
    all.extend_from_slice(&rest);
    assert_eq!(sha256_digest(&all), d);
}

async fn hyper_get_streaming(url: &str) -> http::Response<hyper::body::Incoming> {
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    c.get(url.parse().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_hanging_up_does_not_abort_the_fill() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let data = blob(8 * MIB, 3);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.hold_after(MIB as u64);
    let resp = hyper_get_streaming(&format!("{}/v2/team/app/blobs/{d}", proxy.url())).await;
    drop(resp); // the only client hangs up mid-transfer
                // The fill must outlive the client's connection: the gate opens only
                // once the proxy has seen that connection end.
    wait_until(
        || proxy.logs().contains("connection ended with an error"),
        "the proxy saw its only client hang up",
    )
    .await;
    gate.open();
    wait_until(
        || proxy.cache_path(&d).exists(),
        "the fill completes and commits without any client",
    )
    .await;
    let (_, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(sha256_digest(&body.unwrap()), d);
    assert_eq!(
        reg.blob_gets_logged(&d, 1).await,
        1,
        "the blob was fetched once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_uplink_is_resumed_with_a_range_request() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let data = blob(12 * MIB, 4);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.cut_after(5 * MIB as u64); // the connection drops once, mid-blob
    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        sha256_digest(&body.expect("the client never notices the broken uplink")),
        d
    );
    let m = proxy.metrics().await;
    assert_eq!(m["regproxy_upstream_resumes_total"], 1, "one resume");
    assert!(
        m["regproxy_upstream_bytes_total"] < data.len() as u64 + MIB as u64,
        "the resume fetched only the missing part, not the whole blob again ({} bytes)",
        m["regproxy_upstream_bytes_total"]
    );
    // The client's body ends at verification; the commit follows.
    proxy.fills_done().await;
    assert!(
        proxy.cache_path(&d).exists(),
        "the resumed blob is verified and cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_the_cache_even_with_upstream_gone() {
    let (mut reg, cache, mut proxy) = setup(&[]).await;
    let data = blob(3 * MIB, 5);
    let d = push_blob(&reg.url(), "team/app", &data).await;
    // A client pings first, as every real one does: the anonymous 200 tells
    // the proxy (and its state file) that the upstream has no auth.
    let (st, _, _) = get(&format!("{}/v2/", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);

    proxy.signal("-TERM");
    assert!(proxy.wait_exit(PATIENCE), "SIGTERM is a clean exit");
    reg.stop();
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let (st, h, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the blob is served from the node after a restart"
    );
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert_eq!(sha256_digest(&body.unwrap()), d);
    let (st, _, _) = get(&format!("{}/v2/", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "/v2/ answers from the node while the upstream is down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_corrupted_upstream_is_never_served_whole_nor_cached() {
    let (reg, _c, proxy) = setup(&[]).await;
    let data = blob(6 * MIB, 6);
    let d = push_blob(&reg.url(), "team/app", &data).await;
    // Same length, one byte different, in the upstream's own storage.
    let path = reg.blob_data_path(&d);
    let mut bad = std::fs::read(&path).unwrap();
    bad[3 * MIB] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();

    let url = format!("{}/v2/team/app/blobs/{d}", proxy.url());
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the head went out before the bytes were known to be bad"
    );
    assert!(
        body.is_err(),
        "the connection is cut short instead of ending cleanly"
    );
    // The client is cut off as soon as the digest fails; the fill is thrown
    // away (single-flight entry, temp file) right after.
    proxy.fills_done().await;
    assert!(
        !proxy.cache_path(&d).exists(),
        "the corrupt blob is not cached"
    );
    assert_eq!(proxy.metric("regproxy_digest_mismatches_total").await, 1);

    let (_, _, body) = get(&url, &[]).await;
    assert!(
        body.is_err(),
        "the next request fetches again and is cut again"
    );
    proxy.fills_done().await;
    assert_eq!(
        reg.blob_gets_logged(&d, 2).await,
        2,
        "nothing of the corrupt blob was kept"
    );

    // Ten at once: none of them gets a clean end. Each is cut short, or, if
    // it came just as the fill it joined failed, told so with an error.
    let gets = (0..10).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { get(&url, &[]).await })
    });
    for g in futures_util::future::join_all(gets).await {
        let (st, _, body) = g.unwrap();
        assert!(
            body.is_err() || st == StatusCode::BAD_GATEWAY,
            "no follower sees a complete body ({st}, {body:?})"
        );
    }
    proxy.fills_done().await;
    let tmp = temp_files(&proxy.cache_dir);
    assert!(tmp.is_empty(), "failed fills leave no temp files: {tmp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_size_cap_holds_and_evicts_least_recently_used() {
    let (reg, _c, proxy) = setup(&["--cache-size", "3MiB"]).await;
    let mut ds = Vec::new();
    for i in 0..5 {
        ds.push(push_blob(&reg.url(), "team/app", &blob(MIB, 10 + i)).await);
    }
    let big = push_blob(&reg.url(), "team/app", &blob(4 * MIB, 20)).await;
    // Clients finish as soon as the bytes are verified; the commit (fsync,
    // rename) follows. Recency counts from the commit, so wait for it.
    let fetch = |d: String| {
        let url = format!("{}/v2/team/app/blobs/{d}", proxy.url());
        let path = proxy.cache_path(&d);
        let keep = d != big;
        async move {
            let (st, _, body) = get(&url, &[]).await;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(sha256_digest(&body.unwrap()), d);
            if keep {
                wait_until(|| path.exists(), "the blob is committed").await;
            }
        }
    };

    fetch(ds[0].clone()).await;
    fetch(ds[1].clone()).await;
    fetch(ds[2].clone()).await;
    fetch(ds[0].clone()).await; // ds[0] is now the most recently used
    fetch(ds[3].clone()).await; // evicts ds[1]
    assert!(
        proxy.cached_bytes() <= 3 * MIB as u64,
        "the cap holds: {} bytes on disk",
        proxy.cached_bytes()
    );
    assert!(
        proxy.cache_path(&ds[0]).exists(),
        "the recently used blob stays"
    );
    assert!(
        !proxy.cache_path(&ds[1]).exists(),
        "the least recently used blob is evicted"
    );
    fetch(ds[4].clone()).await;
    fetch(big.clone()).await;
    assert!(
        !proxy.cache_path(&big).exists(),
        "a blob larger than the cap is streamed, not kept"
    );
    assert!(proxy.cached_bytes() <= 3 * MIB as u64);
    let m = proxy.metrics().await;
    assert!(m["regproxy_cache_evictions_total"] >= 2);
    assert!(m["regproxy_cache_bytes"] <= 3 * MIB as u64);
    assert_eq!(m["regproxy_uncached_fills_total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_fill_leaves_no_partial_blob() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let mut proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let data = blob(8 * MIB, 7);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.hold_after(3 * MIB as u64);
    // The response head is the client's sign that the fill is streaming;
    // a kill before it would cut the request, not the body.
    let resp = hyper_get_streaming(&format!("{}/v2/team/app/blobs/{d}", proxy.url())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    wait_until(|| gate.passed() >= 3 * MIB as u64, "the fill is under way").await;
    proxy.signal("-KILL");
    proxy.wait_exit(PATIENCE);
    use http_body_util::BodyExt;
    assert!(
        resp.into_body().collect().await.is_err(),
        "the client of the killed proxy saw a cut body"
    );
    assert!(
        !proxy.cache_path(&d).exists(),
        "no partial blob is under its digest"
    );

    gate.open();
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    let tmp = temp_files(cache.path());
    assert!(tmp.is_empty(), "leftovers are swept at start: {tmp:?}");
    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_transfers_in_flight_finish() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    // A grace period far longer than the held transfer takes, however slow
    // the machine: the test is about finishing, not about the deadline.
    let mut proxy = Proxy::start(&gate.url(), cache.path(), &["--shutdown-grace", "5m"]);
    proxy.wait_learned_open();
    let data = blob(8 * MIB, 8);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.hold_after(2 * MIB as u64);
    let url = format!("{}/v2/team/app/blobs/{d}", proxy.url());
    let pending = tokio::spawn(async move { get(&url, &[]).await });
    wait_until(
        || gate.passed() >= 2 * MIB as u64,
        "the transfer is under way",
    )
    .await;
    proxy.signal("-TERM");
    // Both listeners close at once (a successor sharing them takes every
    // new connection, probes included), while the held transfer keeps the
    // proxy in its grace period.
    let (addr, admin) = (proxy.addr, proxy.admin);
    wait_listeners_closed(addr, admin).await;
    gate.open();

    let (st, _, body) = pending.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        sha256_digest(&body.expect("the transfer in flight completes")),
        d
    );
    assert!(proxy.wait_exit(PATIENCE), "then the proxy exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_waits_for_a_fill_whose_client_hung_up() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let mut proxy = Proxy::start(&gate.url(), cache.path(), &["--shutdown-grace", "5m"]);
    proxy.wait_learned_open();
    let data = blob(8 * MIB, 10);
    let d = push_blob(&reg.url(), "team/app", &data).await;

    gate.hold_after(2 * MIB as u64);
    let resp = hyper_get_streaming(&format!("{}/v2/team/app/blobs/{d}", proxy.url())).await;
    drop(resp); // no connection waits for this fill any more
    wait_until(|| gate.passed() >= 2 * MIB as u64, "the fill is under way").await;
    proxy.signal("-TERM");
    let addr = proxy.addr;
    wait_until(
        || std::net::TcpStream::connect(addr).is_err(),
        "new connections are refused",
    )
    .await;
    // The fill cannot have finished: the rest of the blob is held back.
    gate.open();
    assert!(proxy.wait_exit(PATIENCE), "the proxy exits 0");
    assert!(
        proxy.cache_path(&d).exists(),
        "the fill in flight at SIGTERM is committed before the proxy exits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_and_heads() {
    let (reg, _c, proxy) = setup(&[]).await;
    let data = blob(2 * MIB, 9);
    let d = push_blob(&reg.url(), "team/app", &data).await;
    let url = format!("{}/v2/team/app/blobs/{d}", proxy.url());

    // A range on a cold blob starts the fill and is served from it.
    let (st, h, body) = get(&url, &[("range", "bytes=100-199")]).await;
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        h["content-range"],
        format!("bytes 100-199/{}", data.len()).as_str()
    );
    assert_eq!(&body.unwrap()[..], &data[100..200]);

    let (st, h, body) = request(Method::HEAD, &url, &[], Bytes::new()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert_eq!(h["docker-content-digest"], d.as_str());
    assert!(body.unwrap().is_empty());

    let (st, _, body) = get(&url, &[("range", "bytes=1-18446744073709551615")]).await;
    assert_eq!(
        st,
        StatusCode::PARTIAL_CONTENT,
        "a huge last byte is clamped, not a crash"
    );
    assert_eq!(&body.unwrap()[..], &data[1..]);
    let (st, _, body) = get(&url, &[("range", "bytes=-10")]).await;

    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&body.unwrap()[..], &data[data.len() - 10..]);
    let (st, h, _) = get(&url, &[("range", &format!("bytes={}-", data.len()))]).await;
    assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        h["content-range"],
        format!("bytes */{}", data.len()).as_str()
    );
    assert_eq!(
        reg.blob_gets_logged(&d, 1).await,
        1,
        "the fill that served every range was the only upstream GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_by_digest_are_cached_with_their_exact_bytes_and_type() {
    let (reg, _c, proxy) = setup(&[]).await;
    let (bytes, d) = push_manifest(
        &reg.url(),
        "team/app",
        "v1",
        b"{\"config\":1}",
        &[&blob(1000, 30)],
    )
    .await;
    let url = format!("{}/v2/team/app/manifests/{d}", proxy.url());
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    for _ in 0..2 {
        let (st, h, body) = get(&url, &accept).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            h["content-type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(h["docker-content-digest"], d.as_str());
        assert_eq!(&body.unwrap()[..], &bytes[..], "the exact manifest bytes");
    }
    let needle = format!("\"GET /v2/team/app/manifests/{d}");
    let manifest_gets = reg
        .logged(1, "GETs of the manifest", |l| l.contains(&needle))
        .await;
    assert_eq!(
        manifest_gets, 1,
        "the second GET by digest is served from the node"
    );
    let (st, h, _) = request(Method::HEAD, &url, &accept, Bytes::new()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], bytes.len().to_string().as_str());

    // By tag: relayed to upstream for now, same bytes.
    let (st, h, body) = get(
        &format!("{}/v2/team/app/manifests/v1", proxy.url()),
        &accept,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["docker-content-digest"], d.as_str());
    assert_eq!(&body.unwrap()[..], &bytes[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_oci_errors_never_a_500() {
    let (reg, cache, proxy) = setup(&[]).await;
    std::fs::write(cache.path().join("secret"), b"outside the content tree").unwrap();
    let zero = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let cases: &[(&str, StatusCode, &str)] = &[
        (
            "/v2/../../etc/passwd/blobs/sha256:abc",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/team/..%2f..%2fsecret/blobs/sha256:00",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/team/app/blobs/sha256:../../secret",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/team/app/blobs/sha256:..%2f..%2fsecret",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/team/app/blobs/sha256:XYZ",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
        ),
        (
            "/v2/Team/app/manifests/v1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/team/app/manifests/-bad-tag",
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
        ),
        (
            "/v2/team/app/nonsense/x",
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        ("/v1/_ping", StatusCode::NOT_FOUND, "NOT_FOUND"),
    ];
    for (path, status, code) in cases {
        let (st, h, body) = get(&format!("{}{path}", proxy.url()), &[]).await;
        assert_eq!(st, *status, "{path}");
        assert_eq!(h["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(v["errors"][0]["code"], *code, "{path}");
    }
    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{zero}", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "an unknown blob is upstream's 404"
    );
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
    let (st, _, _) = request(
        Method::POST,
        &format!("{}/v2/team/app/manifests/v1", proxy.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);

    drop(reg); // the upstream goes away
    for path in [
        format!("/v2/team/app/blobs/{zero}"),
        "/v2/team/app/manifests/v1".to_owned(),
    ] {
        let (st, _, body) = get(&format!("{}{path}", proxy.url()), &[]).await;
        assert_eq!(
            st,
            StatusCode::BAD_GATEWAY,
            "an unreachable upstream is a 502"
        );
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    }
    let m = proxy.metrics().await;
    assert!(m["regproxy_upstream_errors_total"] >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_is_a_504() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(
        &gate.url(),
        cache.path(),
        &["--upstream-timeout", "1s", "--upstream-retries", "0"],
    );
    proxy.wait_learned_open();
    gate.hold_after(0);
    let (st, _, body) = get(&format!("{}/v2/team/app/manifests/v1", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
}

#[test]
fn an_upstream_that_is_the_proxy_itself_is_refused_at_start() {
    let port = free_port();
    let cache = temp_dir("cache");
    let out = std::process::Command::new(regproxy_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("http://127.0.0.1:{port}"),
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "regproxy refuses to proxy to itself");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loop"), "the message names the loop: {err}");
}

#[test]
fn bad_flags_exit_non_zero_with_one_clear_line() {
    let out = std::process::Command::new(regproxy_bin())
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--cache-size",
            "lots",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache-size"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_loops_back_is_stopped() {
    // A proxy whose upstream is a second proxy whose upstream is the first.
    let cache = temp_dir("cache");
    let cache2 = temp_dir("cache2");
    // The first one's port is picked free before the second starts, and
    // another process may take it meanwhile: then both start again.
    let (_second, first) = (1..=5)
        .find_map(|attempt| {
            let port = free_port();
            let second = Proxy::start(&format!("http://127.0.0.1:{port}"), cache2.path(), &[]);
            match Proxy::try_start_on(
                &format!("127.0.0.1:{port}"),
                &second.url(),
                cache.path(),
                &[],
            ) {
                Ok(first) => Some((second, first)),
                Err(logs) if attempt < 5 && logs.contains("cannot listen") => None,
                Err(logs) => panic!("regproxy did not start; it logged:\n{logs}"),
            }
        })
        .expect("the first proxy started");
    let (st, _, body) = get(&format!("{}/v2/team/app/manifests/v1", first.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::LOOP_DETECTED,
        "the Via header stops the loop: {body:?}"
    );
}

/// A CA and a server certificate for 127.0.0.1, made with openssl.
fn make_certs(dir: &std::path::Path) {
    let sh = format!(
        "set -e; cd {d}
         openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\n' > ext
         openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext 2>/dev/null",
        d = dir.display()
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &sh])
        .status()
        .unwrap();
    assert!(st.success(), "openssl makes the test certificates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_trusted_through_upstream_ca() {
    let certs = temp_dir("certs");
    make_certs(certs.path());
    let reg = Registry::start_tls(
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
    );
    let cache = temp_dir("cache");
    let ca = certs.path().join("ca.pem");
    let proxy = Proxy::start(
        &reg.url(),
        cache.path(),
        &["--upstream-ca", ca.to_str().unwrap()],
    );
    // Pushed through the proxy's own client path would need push support;
    // push straight to the upstream over TLS with curl instead.
    let data = blob(256 << 10, 77);
    let d = sha256_digest(&data);
    std::fs::write(certs.path().join("blob"), &data).unwrap();
    let sh = format!(
        "set -e; loc=$(curl -sf --cacert {ca} -X POST -D - -o /dev/null {u}/v2/team/app/blobs/uploads/ | tr -d '\\r' | awk 'tolower($1)==\"location:\" {{print $2}}'); \
         curl -sf --cacert {ca} -X PUT -H 'content-type: application/octet-stream' --data-binary @{b} \"$loc&digest={d}\"",
        ca = ca.display(),
        u = reg.url(),
        b = certs.path().join("blob").display(),
    );
    let st = std::process::Command::new("sh")
        .args(["-c", &sh])
        .status()
        .unwrap();
    assert!(st.success(), "the blob is pushed to the https upstream");

    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "the upstream's private CA is trusted through --upstream-ca"
    );
    assert_eq!(sha256_digest(&body.unwrap()), d);

    let cache2 = temp_dir("cache2");
    let untrusting = Proxy::start(&reg.url(), cache2.path(), &[]);
    let (st, _, _) = get(&format!("{}/v2/team/app/blobs/{d}", untrusting.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::BAD_GATEWAY,
        "without the CA the upstream's certificate is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_that_cannot_fit_beside_fills_in_flight_evicts_nothing() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &["--cache-size", "4MiB"]);
    proxy.wait_learned_open();
    let a = push_blob(&reg.url(), "team/app", &blob(MIB, 40)).await;
    let b = push_blob(&reg.url(), "team/app", &blob(MIB, 41)).await;
    let c = push_blob(&reg.url(), "team/app", &blob(3 * MIB, 42)).await;
    let d = push_blob(&reg.url(), "team/app", &blob(2 * MIB, 43)).await;
    for x in [&a, &b] {
        let (st, _, _) = get(&format!("{}/v2/team/app/blobs/{x}", proxy.url()), &[]).await;
        assert_eq!(st, StatusCode::OK);
        let p = proxy.cache_path(x);
        wait_until(|| p.exists(), "committed").await;
    }
    // C's fill holds 3 MiB of the 4 MiB cap while its connection stalls (A
    // goes to make room); other upstream connections flow.
    gate.hold_after(100_000);
    let url_c = format!("{}/v2/team/app/blobs/{c}", proxy.url());
    let pending = tokio::spawn(async move { get(&url_c, &[]).await });
    wait_until(|| gate.passed() >= 100_000, "C's fill is under way").await;
    // C's reservation is in place (B and C: 4 MiB) before D is asked for.
    wait_for(
        || async { proxy.metric("regproxy_cache_bytes").await == 4 * MIB as u64 },
        "C reserved its room (B and C hold the 4 MiB cap)",
    )
    .await;

    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), d, "D is streamed uncached");
    assert!(
        proxy.cache_path(&b).exists(),
        "D could not fit beside C's fill, so B was not evicted for nothing"
    );
    gate.open();
    let (st, _, body) = pending.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256_digest(&body.unwrap()), c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_body_that_stalls_is_cut_not_held_forever() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &["--upstream-timeout", "1s"]);
    proxy.wait_learned_open();
    for i in 0..40 {
        push_manifest(
            &reg.url(),
            "team/many",
            &format!("tag-number-{i}"),
            b"{}",
            &[],
        )
        .await;
    }
    let (_, h, body) = get(&format!("{}/v2/team/many/tags/list", reg.url()), &[]).await;
    let head_len: usize = h
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + 20;
    assert!(
        body.unwrap().len() > 400,
        "the listing is long enough to stall in its middle"
    );
    gate.hold_after(head_len as u64 + 200); // the head and part of the body, then silence
    let url = format!("{}/v2/team/many/tags/list", proxy.url());
    let (st, _, body) = tokio::time::timeout(PATIENCE, get(&url, &[]))
        .await
        .expect("the client is answered or cut within the timeout, not held");
    assert!(
        st != StatusCode::OK || body.is_err(),
        "a stalled listing never ends as a clean 200 ({st})"
    );
}
