//! Pulls of cached tags while the upstream is down, after regproxy itself
//! restarted, in the order each client really uses. containerd never asks
//! `GET /v2/` first, so the proxy must have learned by itself whether the
//! upstream lets anyone in, and kept it in `open.json`.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

fn stop(mut proxy: Proxy) {
    proxy.signal("-TERM");
    assert!(
        proxy.wait_exit(Duration::from_secs(30)),
        "regproxy exits 0 on SIGTERM"
    );
}

#[test]
fn containerd_order_pulls_a_cached_tag_after_a_restart_with_the_upstream_down() {
    let mut reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = blob(300 << 10, 41);
    rt.block_on(push_manifest(
        &reg.url(),
        "team/app",
        "v1",
        br#"{"architecture":"amd64","os":"linux"}"#,
        &[&layer],
    ));
    let cache = temp_dir("offline-cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let steps = rt.block_on(containerd_order_pull(&proxy.url(), "team/app", "v1", None));
    assert!(all_ok(&steps), "the first pull goes through: {steps:?}");
    stop(proxy);

    reg.stop();
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let steps = rt.block_on(containerd_order_pull(&proxy.url(), "team/app", "v1", None));
    assert!(
        all_ok(&steps),
        "with the upstream down, after a restart, containerd's order (HEAD by tag, GET by \
         digest, GET blobs, never /v2/ first) is served from the node: {steps:?}"
    );
    assert_eq!(steps.len(), 4, "manifest, manifest, config, layer");
    let (st, h, _) = rt.block_on(request(
        Method::HEAD,
        &format!(
            "{}/v2/team/app/blobs/{}",
            proxy.url(),
            sha256_digest(&layer)
        ),
        &[],
        Default::default(),
    ));
    assert_eq!(
        st,
        StatusCode::OK,
        "a HEAD of a cached blob is answered too"
    );
    assert_eq!(h["content-length"], layer.len().to_string().as_str());
}

#[test]
fn a_deleted_manifest_is_not_served_stale_by_its_tags() {
    let mut reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, digest) = rt.block_on(push_manifest(
        &reg.url(),
        "team/del",
        "v1",
        br#"{"architecture":"amd64","os":"linux"}"#,
        &[&blob(1000, 5)],
    ));
    let cache = temp_dir("delete-cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &["--tag-ttl", "0s"]);
    proxy.wait_learned_open();
    let steps = rt.block_on(containerd_order_pull(&proxy.url(), "team/del", "v1", None));
    assert!(all_ok(&steps), "{steps:?}");

    let (st, _, body) = rt.block_on(request(
        Method::DELETE,
        &format!("{}/v2/team/del/manifests/{digest}", proxy.url()),
        &[],
        Default::default(),
    ));
    assert_eq!(
        st,
        StatusCode::ACCEPTED,
        "the upstream deletes the manifest: {body:?}"
    );
    reg.stop();
    let (st, _, _) = rt.block_on(request(
        Method::HEAD,
        &format!("{}/v2/team/del/manifests/v1", proxy.url()),
        &[("accept", ACCEPT_MANIFESTS)],
        Default::default(),
    ));
    assert_ne!(
        st,
        StatusCode::OK,
        "a tag whose manifest was deleted through the node is not served stale"
    );
    assert!(
        !std::fs::read_to_string(cache.path().join("state.json"))
            .unwrap()
            .contains(&digest),
        "state.json no longer points any tag at the deleted manifest"
    );
}

/// A real image: one uncompressed tar layer with a file in it, and a config
/// whose `diff_ids` name it, so that containerd can unpack it.
fn tar_image() -> (Vec<u8>, Vec<u8>) {
    let dir = temp_dir("layer");
    std::fs::write(dir.path().join("hello.txt"), b"hello from the node cache\n").unwrap();
    let out = std::process::Command::new("tar")
        .args(["-c", "-f", "-", "--owner=0", "--group=0", "-C"])
        .arg(dir.path())
        .arg("hello.txt")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar makes a layer");
    let layer = out.stdout;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha256_digest(&layer)
    );
    (layer, config.into_bytes())
}

#[test]
fn ctr_pulls_a_cached_tag_after_a_restart_with_the_upstream_down() {
    let mut reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (layer, config) = tar_image();
    rt.block_on(push_manifest(
        &reg.url(),
        "team/ctr",
        "v1",
        &config,
        &[&layer],
    ));
    let cache = temp_dir("ctr-offline-cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    let containerd = Containerd::start();
    let image = format!("{REGISTRY_NAME}:{}/team/ctr:v1", proxy.addr.port());
    let pull = |what: &str| {
        let out = containerd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--http-dump",
            "--snapshotter",
            "native",
            &image,
        ]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{what}: ctr images pull should succeed; it said:\n{said}"
        );
        said
    };
    let said = pull("online");
    // `--http-dump` logs each request line as `msg="METHOD PATH HTTP/1.1"`.
    let requests: Vec<&str> = said
        .lines()
        .filter_map(|l| l.split_once("msg=\"").map(|(_, m)| m))
        .filter(|m| m.starts_with("HEAD ") || m.starts_with("GET "))
        .collect();
    assert!(
        requests
            .first()
            .is_some_and(|r| r.starts_with("HEAD /v2/team/ctr/manifests/v1 ")),
        "containerd's first request is HEAD of the manifest by tag: {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.starts_with("GET /v2/ ")),
        "containerd never pings /v2/ (it only would after a 401): {requests:?}"
    );

    // Forget the image and its content, so that the next pull needs the node.
    for args in [
        &["images", "rm", image.as_str()][..],
        &["content", "prune", "references"][..],
    ] {
        let out = containerd.ctr(args);
        assert!(out.status.success(), "ctr {args:?} should succeed");
    }
    let left = containerd.ctr(&["content", "ls", "-q"]);
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&sha256_digest(&layer)),
        "containerd no longer holds the layer"
    );
    stop(proxy);
    reg.stop();
    let proxy = Proxy::start_on(
        &format!("127.0.0.1:{}", image_port(&image)),
        &reg.url(),
        cache.path(),
        &[],
    );
    pull("after a restart of regproxy with the upstream down");
    assert_eq!(
        rt.block_on(proxy.metric("regproxy_requests_total{kind=\"blob\",result=\"hit\"}")),
        2,
        "the config and the layer came from the node"
    );
}

fn image_port(image: &str) -> u16 {
    image
        .split('/')
        .next()
        .and_then(|h| h.rsplit_once(':'))
        .map(|(_, p)| p.parse().unwrap())
        .unwrap()
}
