//! What the proxy makes of upstream answers a real registry does not give: a
//! 401 without a challenge, and redirects to places the proxy must not go or
//! whose signatures must not reach its log. The upstream is a scripted stub
//! (nginx in a network namespace of the test's own where it must be off
//! loopback); the proxy is the real binary.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::netns::Netns;
use support::stub::{answer, Stub};
use support::*;

/// Waits until the proxy's log holds `needle`: what it logged before that
/// line has been read too.
fn wait_for_log(proxy: &Proxy, needle: &str) {
    wait_blocking(
        || proxy.logs().contains(needle),
        &format!("the proxy logged {needle:?}"),
    );
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
    let cache = temp_dir("cache");
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
    let cache = temp_dir("cache");
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
    let cache = temp_dir("cache");
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

/// nginx inside `ns`, listening on the namespace's end of its link: a peer
/// off loopback whose redirects are `locations` (nginx `location` blocks).
/// One process (`master_process off`), so killing it on drop stops it; its
/// pid file, logs and temp paths are in a temp dir.
struct NginxInNs {
    addr: SocketAddr,
    dir: TempDir,
    child: Child,
}

impl NginxInNs {
    fn start(ns: &Netns, locations: &str) -> NginxInNs {
        let dir = temp_dir("nginx");
        // The namespace is new, so every port in it is free.
        let addr = SocketAddr::from((ns.ns_ip, 5000));
        let conf = dir.path().join("nginx.conf");
        let conf_text = format!(
            r#"daemon off;
master_process off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {p}/access.log;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  server {{
    listen {addr};
{locations}
    location / {{ return 404; }}
  }}
}}
"#,
            p = dir.path().display(),
        );
        std::fs::write(&conf, conf_text).unwrap();
        let out = std::fs::File::create(dir.path().join("nginx.out")).unwrap();
        let mut child = ns
            .command("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("nginx is installed (scripts/deps.sh)");
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "nginx in {} exited with {st}:\n{}{}",
                    ns.name,
                    std::fs::read_to_string(dir.path().join("nginx.out")).unwrap_or_default(),
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx in {} did not listen on {addr} within {PATIENCE:?}",
                ns.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        NginxInNs { addr, dir, child }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The access log's lines so far.
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for NginxInNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    // The upstream is off loopback: in a namespace of the test's own, at the
    // far end of a veth pair.
    let ns = Netns::create();
    let blobs = "/v2/team/app/blobs";
    let up = NginxInNs::start(
        &ns,
        &format!(
            "location = {blobs}/{d} {{ return 307 http://127.0.0.1:{port}/{d}; }}\n\
             location = {blobs}/{by_name} {{ return 307 http://localhost:{port}/{by_name}; }}"
        ),
    );
    let upstream = up.url();
    let cache = temp_dir("cache");
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
    // nginx logs a request once it has answered it.
    for digest in [&d, &by_name] {
        let asked = format!("\"GET /v2/team/app/blobs/{digest} HTTP/1.1\" 307 ");
        wait_blocking(
            || up.access_log().contains(&asked),
            &format!("the upstream was asked for {digest}, and answered with its redirect"),
        );
    }
    assert!(
        inside.requests().is_empty(),
        "nothing on loopback should have been asked: {:?}",
        inside.requests()
    );
}

/// An upstream that answers 5xx (Distribution does, mid-restart or with its
/// storage in trouble) is the upstream's failure: the client gets a 502, on
/// every path that would otherwise relay the answer, never the upstream's
/// `500` passed on as if this node had a bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_5xx_reaches_the_client_as_a_502() {
    let up = Stub::start("127.0.0.1:0", |req| {
        if req.uri().path() == "/v2/" {
            answer(200, &[], b"{}")
        } else {
            answer(500, &[], b"{\"errors\":[{\"code\":\"UNKNOWN\"}]}")
        }
    })
    .await;
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&up.url(), cache.path(), &[]);
    let d = sha256_digest(b"not there");
    for (method, path) in [
        (Method::GET, "/v2/team/app/manifests/v1".to_string()),
        (Method::HEAD, "/v2/team/app/manifests/v1".to_string()),
        (Method::GET, format!("/v2/team/app/manifests/{d}")),
        (Method::GET, "/v2/team/app/tags/list".to_string()),
        (Method::POST, "/v2/team/app/blobs/uploads/".to_string()),
    ] {
        let url = format!("{}{path}", proxy.url());
        let (st, _, _) = request(method.clone(), &url, &[], Bytes::new()).await;
        assert_eq!(
            st,
            StatusCode::BAD_GATEWAY,
            "{method} {path}: an upstream 500 is a 502"
        );
    }
}
