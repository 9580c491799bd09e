//! Tags: remembered for `--tag-ttl`, revalidated once per tag after it,
//! served from the node while the upstream is down (across restarts too).

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Upstream requests for the tag `team/app:v1` (GET or HEAD) in its access
/// log, once it shows at least `expected` (see [`Registry::logged`]).
async fn tag_requests(reg: &Registry, expected: usize) -> usize {
    reg.logged(expected, "requests for team/app:v1", |l| {
        l.contains("\"GET /v2/team/app/manifests/v1 ")
            || l.contains("\"HEAD /v2/team/app/manifests/v1 ")
    })
    .await
}

async fn tag_digest(proxy: &Proxy) -> (StatusCode, Option<String>) {
    let (st, h, body) = get(
        &format!("{}/v2/team/app/manifests/v1", proxy.url()),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    let d = h
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_owned());
    if st == StatusCode::OK {
        assert_eq!(
            sha256_digest(&body.unwrap()),
            *d.as_ref().unwrap(),
            "the body is the manifest the digest names"
        );
    }
    (st, d)
}

/// Makes every tag in the state file of a stopped proxy as old as can be
/// (checked at the epoch), so that it is past any TTL when the proxy starts
/// again: time passes for the tag map without the test waiting for it.
fn age_tags(cache_dir: &std::path::Path) {
    fn age(v: &mut serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(m) => m
                .iter_mut()
                .map(|(k, v)| match k.as_str() {
                    "checked_ms" => {
                        *v = 0.into();
                        1
                    }
                    _ => age(v),
                })
                .sum(),
            serde_json::Value::Array(a) => a.iter_mut().map(age).sum(),
            _ => 0,
        }
    }
    let path = cache_dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        age(&mut state),
        1,
        "the state file holds the one tag resolved"
    );
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_tag_is_seen_after_the_ttl_and_not_before() {
    // A TTL of an hour, which no test outlasts: "before" is the whole test,
    // and "after" comes by ageing the tag map while the proxy is stopped.
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let mut proxy = Proxy::start(&reg.url(), cache.path(), &["--tag-ttl", "1h"]);
    let (_, m1) = push_manifest(
        &reg.url(),
        "team/app",
        "v1",
        b"{\"n\":1}",
        &[&blob(1000, 1)],
    )
    .await;
    let (st, _, _) = get(&format!("{}/v2/", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);

    assert_eq!(tag_digest(&proxy).await, (StatusCode::OK, Some(m1.clone())));
    let asked = tag_requests(&reg, 1).await;
    assert_eq!(asked, 1, "the first resolution is one HEAD");

    let (_, m2) = push_manifest(
        &reg.url(),
        "team/app",
        "v1",
        b"{\"n\":2}",
        &[&blob(1000, 2)],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            tag_digest(&proxy).await.1,
            Some(m1.clone()),
            "within the TTL the tag keeps its digest"
        );
    }
    assert_eq!(
        tag_requests(&reg, asked).await,
        asked,
        "within the TTL no tag request reaches the upstream"
    );

    // Past the TTL: the same tag map, resolved longer ago than the TTL.
    proxy.signal("-TERM");
    assert!(proxy.wait_exit(PATIENCE), "SIGTERM is a clean exit");
    age_tags(cache.path());
    let proxy = Proxy::start(&reg.url(), cache.path(), &["--tag-ttl", "1h"]);
    let url = format!("{}/v2/team/app/manifests/v1", proxy.url());
    let gets = (0..10).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { get(&url, &[("accept", OCI_MANIFEST)]).await })
    });
    for g in futures_util::future::join_all(gets).await {
        let (st, h, _) = g.unwrap();
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            h["docker-content-digest"],
            m2.as_str(),
            "after the TTL the moved tag is seen"
        );
    }
    assert_eq!(
        tag_requests(&reg, asked + 1).await,
        asked + 1,
        "ten concurrent requests after the TTL make one revalidation"
    );
    assert_eq!(proxy.metric("regproxy_tag_revalidations_total").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_is_served_from_the_node_while_the_upstream_is_down_even_after_a_restart() {
    let mut reg = Registry::start();
    let cache = temp_dir("cache");
    let mut proxy = Proxy::start(
        &reg.url(),
        cache.path(),
        &["--tag-ttl", "0s", "--upstream-timeout", "2s"],
    );
    let layer = blob(300_000, 3);
    let (manifest, m1) = push_manifest(&reg.url(), "team/app", "v1", b"{\"n\":1}", &[&layer]).await;
    let (st, _, _) = get(&format!("{}/v2/", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(tag_digest(&proxy).await, (StatusCode::OK, Some(m1.clone())));
    let layer_url = format!(
        "{}/v2/team/app/blobs/{}",
        proxy.url(),
        sha256_digest(&layer)
    );
    assert_eq!(get(&layer_url, &[]).await.0, StatusCode::OK);

    reg.stop();
    let (st, h, body) = get(
        &format!("{}/v2/team/app/manifests/v1", proxy.url()),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(
        st,
        StatusCode::OK,
        "a tag resolved before is served while the upstream is down"
    );
    assert_eq!(h["docker-content-digest"], m1.as_str());
    assert_eq!(h["content-type"], OCI_MANIFEST);
    assert_eq!(&body.unwrap()[..], &manifest[..]);
    let (st, _, _) = request(
        Method::HEAD,
        &format!("{}/v2/team/app/manifests/v1", proxy.url()),
        &[("accept", OCI_MANIFEST)],
        Default::default(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(proxy.metric("regproxy_tags_stale_served_total").await >= 2);
    // Logged before the answer, but read from the proxy's stderr by a
    // thread of the test: wait for it to arrive.
    wait_until(
        || proxy.logs().contains("serving the tag from the node"),
        "a log line says the tag is served from the node",
    )
    .await;

    let started = std::time::Instant::now();
    let (st, _, body) = get(
        &format!("{}/v2/team/app/manifests/never-seen", proxy.url()),
        &[],
    )
    .await;
    assert_eq!(
        st,
        StatusCode::BAD_GATEWAY,
        "a tag never seen is a clear error"
    );
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "and not a hang"
    );

    proxy.signal("-TERM");
    assert!(proxy.wait_exit(PATIENCE), "SIGTERM is a clean exit");
    let proxy = Proxy::start(&reg.url(), cache.path(), &["--tag-ttl", "0s"]);
    let (st, _, _) = get(&format!("{}/v2/", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK, "the ping is answered by the node");
    assert_eq!(
        tag_digest(&proxy).await,
        (StatusCode::OK, Some(m1)),
        "the tag map survived the restart"
    );
    let layer_url = format!(
        "{}/v2/team/app/blobs/{}",
        proxy.url(),
        sha256_digest(&layer)
    );
    assert_eq!(
        get(&layer_url, &[]).await.0,
        StatusCode::OK,
        "and so did its layer"
    );
    assert!(
        cache.path().join("state.json").exists(),
        "the tag map is kept in the cache dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_kind_keeps_its_bytes_type_and_digest() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let (_, amd64) = push_manifest(
        &reg.url(),
        "team/multi",
        "amd64",
        b"{\"a\":1}",
        &[&blob(500, 4)],
    )
    .await;
    let (_, arm64) = push_manifest(
        &reg.url(),
        "team/multi",
        "arm64",
        b"{\"a\":2}",
        &[&blob(500, 5)],
    )
    .await;
    let kinds = [
        (
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        ),
        (
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
    ];
    for (i, (index_type, child_type)) in kinds.iter().enumerate() {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {"mediaType": child_type, "digest": amd64, "size": 1, "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": child_type, "digest": arm64, "size": 1, "platform": {"architecture": "arm64", "os": "linux"}},
            ]
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        let tag = format!("multi{i}");
        let (st, _, body) = request(
            Method::PUT,
            &format!("{}/v2/team/multi/manifests/{tag}", reg.url()),
            &[("content-type", index_type)],
            bytes.clone().into(),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{body:?}");
        let d = sha256_digest(&bytes);
        for method in [Method::GET, Method::HEAD] {
            let (st, h, body) = request(
                method.clone(),
                &format!("{}/v2/team/multi/manifests/{tag}", proxy.url()),
                &[("accept", index_type)],
                Default::default(),
            )
            .await;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(h["content-type"], *index_type);
            assert_eq!(h["docker-content-digest"], d.as_str());
            assert_eq!(h["content-length"], bytes.len().to_string().as_str());
            if method == Method::GET {
                assert_eq!(&body.unwrap()[..], &bytes[..], "exact bytes of the index");
            }
        }
        // A client that does not take indexes gets what the upstream gives it.
        let (st, _, _) = get(
            &format!("{}/v2/team/multi/manifests/{tag}", proxy.url()),
            &[(
                "accept",
                "application/vnd.docker.distribution.manifest.v1+json",
            )],
        )
        .await;
        assert!(
            st == StatusCode::NOT_FOUND || st == StatusCode::OK,
            "the upstream's answer is relayed, not the cached index: {st}"
        );
    }
    // The per-platform manifests behind the index, by digest, are cached too.
    let url = format!("{}/v2/team/multi/manifests/{amd64}", proxy.url());
    for _ in 0..2 {
        let (st, h, _) = get(
            &url,
            &[("accept", "application/vnd.oci.image.manifest.v1+json")],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h["docker-content-digest"], amd64.as_str());
    }
    let needle = format!("\"GET /v2/team/multi/manifests/{amd64}");
    let n = reg
        .logged(1, "GETs of the amd64 manifest", |l| l.contains(&needle))
        .await;
    assert_eq!(n, 1, "the platform manifest is fetched once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_pass_through_with_links_pointing_at_the_proxy() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    for t in ["a", "b", "c"] {
        push_manifest(&reg.url(), "team/list", t, b"{}", &[]).await;
    }
    for r in ["team/x", "team/y"] {
        push_manifest(&reg.url(), r, "v1", b"{}", &[]).await;
    }
    let (st, _, body) = get(&format!("{}/v2/team/list/tags/list", proxy.url()), &[]).await;
    assert_eq!(st, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    let mut tags: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
    tags.sort();
    assert_eq!(tags, ["a", "b", "c"]);

    // Distribution 2.8 paginates the catalog; follow its Link through the proxy.
    let mut url = format!("{}/v2/_catalog?n=2", proxy.url());
    let mut repos = Vec::new();
    for _ in 0..5 {
        let (st, h, body) = get(&url, &[]).await;
        assert_eq!(st, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        repos.extend(
            v["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_owned()),
        );
        let Some(link) = h.get("link") else { break };
        let link = link.to_str().unwrap();
        assert!(
            !link.contains(&reg.addr.to_string()),
            "the Link header does not point at the upstream: {link}"
        );
        let next = link.split(['<', '>']).nth(1).unwrap();
        url = if next.starts_with("http") {
            next.to_owned()
        } else {
            format!("{}{next}", proxy.url())
        };
        assert!(
            url.starts_with(&proxy.url()),
            "the next page is asked of the proxy: {url}"
        );
    }
    assert_eq!(
        repos,
        ["team/list", "team/x", "team/y"],
        "every page came through the proxy"
    );
}
