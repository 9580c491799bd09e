//! What the proxy makes of upstream answers a real registry does not give: a
//! 401 without a challenge, and redirects to places the proxy must not go or
//! whose signatures must not reach its log. The upstream is a scripted stub;
//! the proxy is the real binary.

mod support;

use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::stub::{answer, Stub};
use support::*;

/// Waits until the proxy's log holds `needle`: what it logged before that
/// line has been read too.
fn wait_for_log(proxy: &Proxy, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxy.logs().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the proxy should have logged {needle:?}; it logged:\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_carries_a_challenge() {
    // An upstream that refuses everything and never says how to log in.
    let up = Stub::start("127.0.0.1:0", |_| {
        answer(
            401,
            &[("content-type", "application/json")],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"no","detail":null}]}"#,
        )
    })
    .await;
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&up.url(), cache.path(), &[]);
    let d = sha256_digest(b"a layer");
    for (method, path) in [
        (Method::GET, "/v2/".to_owned()),
        (Method::GET, "/v2/team/app/tags/list".to_owned()),
        (Method::GET, "/v2/team/app/manifests/latest".to_owned()),
        (Method::HEAD, "/v2/team/app/manifests/latest".to_owned()),
        (Method::GET, format!("/v2/team/app/manifests/{d}")),
        (Method::GET, format!("/v2/team/app/blobs/{d}")),
        (Method::HEAD, format!("/v2/team/app/blobs/{d}")),
    ] {
        let url = format!("{}{path}", proxy.url());
        let (st, h, _) = request(method.clone(), &url, &[], Bytes::new()).await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: the upstream's refusal is the answer"
        );
        assert!(
            h.get("www-authenticate").is_some_and(|v| !v.is_empty()),
            "{method} {path}: a 401 should say how to authenticate; it came with {h:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_redirect_urls_never_reach_the_log() {
    let data = blob(100_000, 11);
    let d = sha256_digest(&data);
    let lost = sha256_digest(b"a blob whose storage is down");
    let closed = free_port();
    let (d2, lost2) = (d.clone(), lost.clone());
    let up = Stub::start("127.0.0.1:0", move |req| {
        let p = req.uri().path();
        if p == format!("/v2/team/app/blobs/{d2}") {
            let to = format!("/storage/{d2}?X-Amz-Credential=KEY-ONE&X-Amz-Signature=SIG-ONE");
            answer(307, &[("location", &to)], b"")
        } else if p == format!("/storage/{d2}") {
            answer(200, &[], &data)
        } else if p == format!("/v2/team/app/blobs/{lost2}") {
            let to = format!("http://127.0.0.1:{closed}/storage?X-Amz-Signature=SIG-TWO");
            answer(307, &[("location", &to)], b"")
        } else {
            answer(404, &[], b"")
        }
    })
    .await;
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&up.url(), cache.path(), &[]);

    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "a redirect on the upstream's own host is followed"
    );
    assert_eq!(sha256_digest(&body.unwrap()), d);
    wait_for_log(&proxy, "following upstream redirect");

    let (st, _, body) = get(&format!("{}/v2/team/app/blobs/{lost}", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY, "storage that is down is a 502");
    let body = String::from_utf8(body.unwrap().to_vec()).unwrap();
    assert!(
        !body.contains("SIG-TWO"),
        "the error body should not carry the signature: {body}"
    );
    wait_for_log(&proxy, "upstream failure");

    let logs = proxy.logs();
    for secret in ["SIG-ONE", "KEY-ONE", "SIG-TWO"] {
        assert!(
            !logs.contains(secret),
            "the log should never hold a signed URL's query ({secret}):\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_the_proxy_itself_is_refused() {
    // The proxy's API and admin URLs, known once it has started.
    let own: Arc<OnceLock<(String, String)>> = Arc::default();
    let o2 = Arc::clone(&own);
    let up = Stub::start("127.0.0.1:0", move |req| {
        let (api, admin) = o2.get().expect("the proxy started before it asked");
        let p = req.uri().path();
        if p == "/v2/team/app/tags/list" {
            answer(302, &[("location", &format!("{admin}/metrics"))], b"")
        } else if p.contains("/blobs/") {
            answer(307, &[("location", &format!("{api}{p}"))], b"")
        } else {
            answer(404, &[], b"")
        }
    })
    .await;
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&up.url(), cache.path(), &[]);
    own.set((proxy.url(), format!("http://{}", proxy.admin)))
        .unwrap();

    let d = sha256_digest(b"anything");
    let (st, _, _) = get(&format!("{}/v2/team/app/blobs/{d}", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::BAD_GATEWAY,
        "a redirect to the proxy's own listen address should be refused as an upstream error"
    );
    wait_for_log(&proxy, "upstream failure");
    assert!(
        !proxy.logs().contains("request loop"),
        "the redirect should be refused before the proxy sends itself a request:\n{}",
        proxy.logs()
    );
    let (st, _, body) = get(&format!("{}/v2/team/app/tags/list", proxy.url()), &[]).await;
    assert_eq!(
        st,
        StatusCode::BAD_GATEWAY,
        "a redirect to the proxy's admin listener should be refused"
    );
    assert!(
        !String::from_utf8_lossy(&body.unwrap()).contains("regproxy_"),
        "the proxy's metrics should not be relayed as the upstream's answer"
    );
}

/// An IPv4 address of this machine that is not loopback.
fn non_loopback_ipv4() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("iproute2 is installed");
    let out = String::from_utf8_lossy(&out.stdout);
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .expect("this test needs an IPv4 address other than loopback on this machine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_off_loopback_cannot_redirect_onto_it() {
    let data = blob(10_000, 12);
    let d = sha256_digest(&data);
    // What this node serves on loopback only; the upstream must not reach it
    // through the proxy.
    let inside = Stub::start("127.0.0.1:0", move |_| answer(200, &[], &data)).await;
    let port = inside.addr.port();
    let by_name = sha256_digest(b"redirected to a name for loopback");
    let (d2, n2) = (d.clone(), by_name.clone());
    let up = Stub::start("0.0.0.0:0", move |req| {
        let p = req.uri().path();
        if p == format!("/v2/team/app/blobs/{d2}") {
            let to = format!("http://127.0.0.1:{port}/{d2}");
            answer(307, &[("location", &to)], b"")
        } else if p == format!("/v2/team/app/blobs/{n2}") {
            let to = format!("http://localhost:{port}/{n2}");
            answer(307, &[("location", &to)], b"")
        } else {
            answer(404, &[], b"")
        }
    })
    .await;
    let upstream = format!("http://{}:{}", non_loopback_ipv4(), up.addr.port());
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&upstream, cache.path(), &[]);

    for (what, digest) in [
        ("a loopback address", &d),
        ("a name for loopback", &by_name),
    ] {
        let (st, _, _) = get(&format!("{}/v2/team/app/blobs/{digest}", proxy.url()), &[]).await;
        assert_eq!(
            st,
            StatusCode::BAD_GATEWAY,
            "a redirect from {upstream} to {what} should be refused"
        );
    }
    assert!(
        up.requests().iter().any(|r| r.contains(&by_name)),
        "the upstream was asked, and answered with its redirect"
    );
    assert!(
        inside.requests().is_empty(),
        "nothing on loopback should have been asked: {:?}",
        inside.requests()
    );
}
