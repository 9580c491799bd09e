//! Pinned images (issue 12): resolved by a prefetch to their digests, never
//! evicted, pulled by a real client with the upstream down after a restart;
//! a pinned tag that moves keeps its old image pinned until the new one is
//! complete; the prefetch file re-read when a ConfigMap-style symlink swap
//! changes it; pins over the cap said once and kept.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::*;

/// A config the node's platform runs.
fn config(seed: u64) -> Vec<u8> {
    json!({"architecture": "amd64", "os": "linux", "seed": seed,
           "rootfs": {"type": "layers", "diff_ids": []}})
    .to_string()
    .into_bytes()
}

/// An image pushed to `reg` as `repo:tag`: its manifest digest and layers.
struct Image {
    digest: String,
    layers: Vec<String>,
}

async fn push_image(reg: &Registry, repo: &str, tag: &str, seed: u64, sizes: &[usize]) -> Image {
    let layers: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| blob(*n, seed * 100 + i as u64))
        .collect();
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    let (_, digest) = push_manifest(&reg.url(), repo, tag, &config(seed), &refs).await;
    Image {
        digest,
        layers: layers.iter().map(|l| sha256_digest(l)).collect(),
    }
}

fn start(upstream: &str, cache: &Path, token: &Path, args: &[&str]) -> Proxy {
    let mut all = vec!["--admin-token-file", token.to_str().unwrap()];
    all.extend_from_slice(args);
    Proxy::start(upstream, cache, &all)
}

/// An admin request with the token; the status and the body.
async fn admin(
    proxy: &Proxy,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, String) {
    let auth = format!("Bearer {TOKEN}");
    let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
    let (st, _, b) = request(
        method,
        &format!("http://{}{path}", proxy.admin),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    (
        st,
        String::from_utf8_lossy(&b.unwrap_or_default()).into_owned(),
    )
}

/// Prefetches and pins `refs` through the admin API; returns its NDJSON
/// events.
async fn pin(proxy: &Proxy, refs: &[&str]) -> Vec<Value> {
    let (st, body) = admin(
        proxy,
        Method::POST,
        "/admin/prefetch",
        Some(json!({"refs": refs, "pin": true})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "the prefetch runs: {body}");
    body.lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON"))
        .collect()
}

/// `GET /admin/pins`' list.
async fn pins(proxy: &Proxy) -> Vec<Value> {
    let (st, body) = admin(proxy, Method::GET, "/admin/pins", None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["pins"].as_array().unwrap().clone()
}

/// The pin of `reference` from `source`, if there is one.
async fn pin_of(proxy: &Proxy, reference: &str, source: &str) -> Option<Value> {
    pins(proxy)
        .await
        .into_iter()
        .find(|p| p["ref"] == reference && p["source"] == source)
}

fn platform() -> &'static str {
    "linux/amd64"
}

/// `regproxy_offline_ready` of `reference`, if the metric has it.
async fn offline_ready(proxy: &Proxy, reference: &str) -> Option<u64> {
    let key = format!(
        "regproxy_offline_ready{{ref=\"{reference}\",platform=\"{}\"}}",
        platform()
    );
    proxy.metrics().await.get(&key).copied()
}

async fn wait_ready(proxy: &Proxy, reference: &str) {
    wait_for(
        || async { offline_ready(proxy, reference).await == Some(1) },
        &format!("{reference} is offline-ready"),
    )
    .await;
}

/// `skopeo copy` of `repo:tag` through the proxy into a dir; its output.
async fn skopeo_copy(proxy: &Proxy, image: &str, into: &Path) -> std::process::Output {
    let src = format!("docker://{REGISTRY_NAME}:{}/{image}", proxy.addr.port());
    let dest = format!("dir:{}", into.display());
    tokio::task::spawn_blocking(move || {
        on_node(
            "skopeo",
            &[
                "copy",
                "--src-tls-verify=false",
                "--insecure-policy",
                &src,
                &dest,
            ],
        )
    })
    .await
    .unwrap()
}

async fn pull(proxy: &Proxy, repo: &str, tag: &str) {
    let steps = containerd_order_pull(&proxy.url(), repo, tag, None).await;
    assert!(
        all_ok(&steps),
        "{repo}:{tag} pulls through the proxy: {steps:?}"
    );
}

fn stop(mut proxy: Proxy) {
    proxy.signal("-TERM");
    assert!(
        proxy.wait_exit(Duration::from_secs(30)),
        "regproxy exits 0 on SIGTERM"
    );
}

fn count(proxy: &Proxy, needle: &str) -> usize {
    proxy.logs().lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_image_pulls_with_the_upstream_down_after_a_restart_under_pressure() {
    let mut reg = Registry::start();
    let pinned = push_image(&reg, "team/pinned", "v1", 1, &[300 << 10, 300 << 10]).await;
    let mut others = Vec::new();
    for i in 0..4 {
        others.push(push_image(&reg, &format!("team/other{i}"), "v1", 10 + i, &[600 << 10]).await);
    }
    let cache = temp_dir("pins-cache");
    let (_t, token) = token_file();
    let args = ["--cache-size", "1536KiB"];
    let proxy = start(&reg.url(), cache.path(), &token, &args);
    proxy.wait_learned_open();

    let events = pin(&proxy, &["registry.example:5000/team/pinned:v1"]).await;
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "done" && e["pinned"] == true),
        "the prefetch ends pinned: {events:?}"
    );
    wait_ready(&proxy, "team/pinned:v1").await;
    let p = pin_of(&proxy, "team/pinned:v1", "api")
        .await
        .expect("pinned by the API");
    assert_eq!(p["digests"], 4, "manifest, config and two layers: {p}");
    assert_eq!(p["top"], pinned.digest.as_str());

    for i in 0..4 {
        pull(&proxy, &format!("team/other{i}"), "v1").await;
        proxy.fills_done().await;
    }
    assert!(proxy.metric("regproxy_cache_evictions_total").await > 0);
    assert!(
        !proxy.cache_path(&others[0].layers[0]).exists(),
        "the pressure evicts the unpinned image pulled first"
    );
    for l in &pinned.layers {
        assert!(
            proxy.cache_path(l).exists(),
            "pinned layer {l} is never evicted"
        );
    }
    assert!(proxy.metric("regproxy_pinned_bytes").await >= 600 << 10);
    stop(proxy);

    reg.stop();
    let proxy = start(&reg.url(), cache.path(), &token, &args);
    assert_eq!(
        offline_ready(&proxy, "team/pinned:v1").await,
        Some(1),
        "after a restart the pin is still whole"
    );
    let out = temp_dir("pins-skopeo");
    let copied = skopeo_copy(&proxy, "team/pinned:v1", &out.path().join("pinned")).await;
    succeeded(
        copied,
        "skopeo copy of the pinned image with the upstream down",
    );
    for l in &pinned.layers {
        let bytes = std::fs::read(out.path().join("pinned").join(&l[7..])).unwrap();
        assert_eq!(
            &sha256_digest(&bytes),
            l,
            "skopeo got the pinned layer whole"
        );
    }
    let copied = skopeo_copy(&proxy, "team/other0:v1", &out.path().join("other")).await;
    assert!(
        !copied.status.success(),
        "an unpinned image that was evicted cannot be pulled with the upstream down"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_pinned_tag_is_pinned_anew_and_the_old_image_stays_until_then() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let old = push_image(&reg, "team/moving", "v1", 20, &[300 << 10]).await;
    for i in 0..4 {
        push_image(&reg, &format!("team/p{i}"), "v1", 30 + i, &[600 << 10]).await;
    }
    let cache = temp_dir("pins-moving");
    let (_t, token) = token_file();
    let args = ["--cache-size", "2MiB", "--tag-ttl", "30s"];
    let proxy = start(&gate.url(), cache.path(), &token, &args);
    proxy.wait_learned_open();
    pin(&proxy, &["team/moving:v1"]).await;
    wait_ready(&proxy, "team/moving:v1").await;

    // The tag moves; its revalidation (a period after the pin) fetches
    // the new layer, held by the gate after its first bytes.
    let new = push_image(&reg, "team/moving", "v1", 21, &[800 << 10]).await;
    gate.hold_after(64 << 10);
    wait_until(
        || reg.blob_gets(&new.layers[0]) >= 1,
        "the revalidation of the pinned tag fetches the new layer",
    )
    .await;
    for i in 0..3 {
        pull(&proxy, &format!("team/p{i}"), "v1").await;
    }
    let p = pin_of(&proxy, "team/moving:v1", "api").await.unwrap();
    assert_eq!(
        p["top"],
        old.digest.as_str(),
        "the old image is pinned while the new one is fetched: {p}"
    );
    assert_eq!(offline_ready(&proxy, "team/moving:v1").await, Some(1));
    assert!(
        !proxy.cache_path(&new.layers[0]).exists(),
        "the new layer is still held by the gate: the new image is not complete"
    );
    assert!(
        proxy.cache_path(&old.layers[0]).exists(),
        "pressure during the rollout does not evict the old image"
    );

    gate.open();
    wait_for(
        || async {
            pin_of(&proxy, "team/moving:v1", "api")
                .await
                .is_some_and(|p| p["top"] == new.digest.as_str() && p["complete"] == true)
        },
        "the new image is pinned once complete",
    )
    .await;
    let p = pin_of(&proxy, "team/moving:v1", "api").await.unwrap();
    assert_eq!(p["previous"], 0, "the old image is unpinned: {p}");
    assert_eq!(offline_ready(&proxy, "team/moving:v1").await, Some(1));
    assert!(proxy.cache_path(&new.layers[0]).exists());
    // Now the old image is evicted like any other.
    pull(&proxy, "team/p3", "v1").await;
    proxy.fills_done().await;
    pull(&proxy, "team/p0", "v1").await;
    proxy.fills_done().await;
    assert!(
        !proxy.cache_path(&old.layers[0]).exists(),
        "the old image, unpinned, goes under pressure"
    );
    assert!(
        proxy.cache_path(&new.layers[0]).exists(),
        "the new image stays"
    );
}

/// A ConfigMap volume: `FILE` → `..data/FILE`, `..data` → a dir of one
/// version; an update writes a new version and swaps `..data`.
struct ConfigMap {
    dir: TempDir,
    version: u32,
}

impl ConfigMap {
    fn new(text: &str) -> ConfigMap {
        let dir = temp_dir("configmap");
        std::os::unix::fs::symlink("..data/prefetch.list", dir.path().join("prefetch.list"))
            .unwrap();
        let mut cm = ConfigMap { dir, version: 0 };
        cm.update(text);
        cm
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("prefetch.list")
    }

    fn update(&mut self, text: &str) {
        self.version += 1;
        let v = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.path().join(&v)).unwrap();
        std::fs::write(self.dir.path().join(&v).join("prefetch.list"), text).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_prefetch_file_is_read_again_when_its_configmap_changes() {
    let reg = Registry::start();
    let c1 = push_image(&reg, "team/c1", "v1", 40, &[100 << 10]).await;
    let c2 = push_image(&reg, "team/c2", "v1", 41, &[100 << 10]).await;
    let c3 = push_image(&reg, "team/c3", "v1", 42, &[100 << 10]).await;
    let mut cm = ConfigMap::new("# for the rollout\nteam/c1:v1 pin\nTeam/Bad pin\n");
    let cache = temp_dir("pins-file");
    let (_t, token) = token_file();
    let file = cm.path();
    let proxy = start(
        &reg.url(),
        cache.path(),
        &token,
        &["--prefetch-file", file.to_str().unwrap()],
    );
    wait_ready(&proxy, "team/c1:v1").await;
    assert!(proxy.cache_path(&c1.layers[0]).exists());
    assert_eq!(
        count(&proxy, "line 3:"),
        1,
        "the bad line is reported with its number: {}",
        proxy.logs()
    );

    cm.update("team/c2:v1 pin\nteam/c3:v1\n");
    wait_ready(&proxy, "team/c2:v1").await;
    wait_until(
        || proxy.cache_path(&c3.layers[0]).exists(),
        "the unpinned line is prefetched",
    )
    .await;
    let listed = pins(&proxy).await;
    let refs: Vec<&str> = listed.iter().map(|p| p["ref"].as_str().unwrap()).collect();
    assert_eq!(
        refs,
        ["team/c2:v1"],
        "c1's line went and its pin with it; c3 is not pinned"
    );
    assert_eq!(listed[0]["source"], "file");
    assert_eq!(offline_ready(&proxy, "team/c1:v1").await, None);
    assert!(proxy.cache_path(&c2.layers[0]).exists());

    let (st, body) = admin(
        &proxy,
        Method::POST,
        "/admin/unpin",
        Some(json!({"refs": ["team/c2:v1"]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["in_file"],
        json!(["team/c2:v1"]),
        "the file's pin stays: {v}"
    );
    assert_eq!(v["removed"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_over_the_cap_are_said_once_and_kept() {
    const OVER: &str = "pinned images alone are more than --cache-size";
    let reg = Registry::start();
    let big1 = push_image(&reg, "team/big1", "v1", 50, &[700 << 10]).await;
    push_image(&reg, "team/big2", "v1", 51, &[700 << 10]).await;
    let cache = temp_dir("pins-over");
    let (_t, token) = token_file();
    let proxy = start(&reg.url(), cache.path(), &token, &["--cache-size", "1MiB"]);
    proxy.wait_learned_open();
    pin(&proxy, &["team/big1:v1"]).await;
    wait_ready(&proxy, "team/big1:v1").await;
    assert_eq!(proxy.metric("regproxy_pins_over_cap").await, 0);

    pin(&proxy, &["team/big2:v1"]).await;
    wait_for(
        || async { proxy.metric("regproxy_pins_over_cap").await == 1 },
        "the pins are over the cap",
    )
    .await;
    assert_eq!(
        offline_ready(&proxy, "team/big1:v1").await,
        Some(1),
        "the first pin is kept"
    );
    assert_eq!(
        offline_ready(&proxy, "team/big2:v1").await,
        Some(0),
        "the second does not fit"
    );
    assert!(proxy.cache_path(&big1.layers[0]).exists());
    pull(&proxy, "team/big2", "v1").await;
    pin(&proxy, &["team/big2:v1"]).await;
    assert_eq!(count(&proxy, OVER), 1, "said once, not on every fill");

    let (st, body) = admin(
        &proxy,
        Method::POST,
        "/admin/unpin",
        Some(json!({"refs": ["team/big2:v1", "team/none:v1"]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["removed"], json!(["team/big2:v1"]), "{v}");
    assert_eq!(v["not_pinned"], json!(["team/none:v1"]), "{v}");
    wait_for(
        || async { proxy.metric("regproxy_pins_over_cap").await == 0 },
        "the pins fit once one is gone",
    )
    .await;
    assert_eq!(count(&proxy, OVER), 1);
}
