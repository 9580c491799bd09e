//! What the proxy makes of upstream answers a real registry does not give: a
//! 401 without a challenge. The upstream is a scripted stub; the proxy is the
//! real binary.

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::stub::{answer, Stub};
use support::*;

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
