//! The cache an admin can see (issue 12): `regproxy cache ls|rm|verify`
//! against a proxy in front of a real `docker-registry`, and the admin
//! API's token rules.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::handover::get_verified;
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry, a proxy in front of it with an admin token, and the image
/// `team/app:v1` (a config and two layers) pushed to the registry.
struct Node {
    reg: Registry,
    proxy: Proxy,
    _cache: TempDir,
    _token_dir: TempDir,
    token_file: PathBuf,
    image: Image,
}

struct Image {
    manifest: String,
    config: String,
    layers: Vec<String>,
    layer_bytes: Vec<Vec<u8>>,
}

impl Node {
    async fn start(layer_sizes: &[usize]) -> Node {
        let reg = Registry::start();
        let cache = temp_dir("cache-admin");
        let (token_dir, token_file) = token_file();
        let proxy = Proxy::start(
            &reg.url(),
            &cache.path().join("c"),
            &["--admin-token-file", token_file.to_str().unwrap()],
        );
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer_bytes: Vec<Vec<u8>> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, n)| blob(*n, 40 + i as u64))
            .collect();
        let layers: Vec<&[u8]> = layer_bytes.iter().map(Vec::as_slice).collect();
        let (_, manifest) = push_manifest(&reg.url(), "team/app", "v1", &config, &layers).await;
        let image = Image {
            manifest,
            config: sha256_digest(&config),
            layers: layer_bytes.iter().map(|l| sha256_digest(l)).collect(),
            layer_bytes,
        };
        Node {
            reg,
            proxy,
            _cache: cache,
            _token_dir: token_dir,
            token_file,
            image,
        }
    }

    /// Pulls `team/app:v1` through the proxy as a client would, checking
    /// every body against its digest; waits until every fill committed.
    async fn pull(&self) {
        let base = format!("{}/v2/team/app", self.proxy.url());
        let (st, _, body) = get(&format!("{base}/manifests/v1"), &[("accept", OCI_MANIFEST)]).await;
        assert_eq!(st, StatusCode::OK, "the tag resolves through the proxy");
        assert_eq!(sha256_digest(&body.unwrap()), self.image.manifest);
        let blobs = std::iter::once(&self.image.config).chain(&self.image.layers);
        for d in blobs {
            get_verified(&format!("{base}/blobs/{d}"), d)
                .await
                .unwrap_or_else(|e| panic!("the pull gets every blob whole: {e}"));
        }
        self.proxy.fills_done().await;
    }

    /// `regproxy cache ARGS...` against this proxy's admin listener.
    async fn cli(&self, args: &[&str]) -> Output {
        self.regproxy("cache", args).await
    }

    /// `regproxy COMMAND ARGS...` against this proxy's admin listener.
    async fn regproxy(&self, command: &str, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(regproxy_bin());
        cmd.arg(command)
            .args(args)
            .arg("--admin")
            .arg(format!("http://{}", self.proxy.admin))
            .arg("--admin-token-file")
            .arg(&self.token_file);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// `cache ls --json`.
    async fn ls(&self) -> Value {
        let out = succeeded(self.cli(&["ls", "--json"]).await, "cache ls --json");
        serde_json::from_str(&out).unwrap()
    }

    /// An admin API request with `token`: its status and JSON body.
    async fn admin(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        admin_request(self.proxy.admin, method, path, token, body).await
    }
}

/// An admin API request to `admin` with `token`: its status and JSON body.
async fn admin_request(
    admin: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut h = vec![("content-type", "application/json".to_owned())];
    if let Some(t) = token {
        h.push(("authorization", format!("Bearer {t}")));
    }
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = format!("http://{admin}{path}");
    let (st, _, b) = request(method, &url, &h, Bytes::from(body.to_owned())).await;
    (
        st,
        serde_json::from_slice(&b.unwrap()).unwrap_or(Value::Null),
    )
}

fn entry<'a>(ls: &'a Value, digest: &str) -> Option<&'a Value> {
    ls["entries"]
        .as_array()?
        .iter()
        .find(|e| e["digest"] == digest)
}

#[tokio::test]
async fn ls_shows_what_a_pull_just_put_there() {
    let n = Node::start(&[300_000, 1_200_000]).await;
    n.pull().await;

    let ls = n.ls().await;
    let m = entry(&ls, &n.image.manifest).expect("the manifest is listed");
    assert_eq!(m["kind"], "manifest");
    assert_eq!(m["repositories"], serde_json::json!(["team/app"]));
    assert_eq!(
        m["tags"],
        serde_json::json!(["team/app:v1"]),
        "the tag that points at it"
    );
    assert_eq!(m["pinned"], false);
    for (d, data) in n.image.layers.iter().zip(&n.image.layer_bytes) {
        let l = entry(&ls, d).expect("each layer is listed");
        assert_eq!(l["kind"], "blob");
        assert_eq!(l["size"], data.len() as u64);
        assert_eq!(
            l["repositories"],
            serde_json::json!(["team/app"]),
            "the repository it was pulled from"
        );
        assert!(l["last_use_unix"].as_u64().unwrap() > 0);
    }
    assert!(
        entry(&ls, &n.image.config).is_some(),
        "the config is listed"
    );
    let bytes: u64 = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .sum();
    assert_eq!(
        ls["total"]["entries"], 4,
        "a manifest, a config, two layers"
    );
    assert_eq!(ls["total"]["bytes"], bytes);
    assert_eq!(
        ls["total"]["bytes"],
        n.proxy.metric("regproxy_cache_bytes").await,
        "the listing adds up to what the cache counts"
    );

    let table = succeeded(
        n.cli(&["ls", "--sort", "size"]).await,
        "cache ls --sort size",
    );
    eprintln!("cache ls --sort size said:\n{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("DIGEST"), "a header first:\n{table}");
    assert!(
        lines[1].starts_with(&n.image.layers[1]) && lines[1].contains("1.1 MiB"),
        "the largest entry first, its size for people:\n{table}"
    );
    let mrow = lines
        .iter()
        .find(|l| l.starts_with(&n.image.manifest))
        .unwrap();
    assert!(
        mrow.contains("team/app:v1") && mrow.contains("manifest"),
        "{mrow}"
    );
    assert!(
        lines.last().unwrap().starts_with("4 entries, ") && lines.last().unwrap().contains("(of "),
        "a total line ends the table:\n{table}"
    );
}

#[tokio::test]
async fn verify_removes_a_blob_corrupted_on_disk_and_the_next_pull_refetches_it() {
    let n = Node::start(&[2_000_000, 500_000]).await;
    n.pull().await;
    let bad = &n.image.layers[0];
    let path = n.proxy.cache_path(bad);
    // In place, as bit rot would: the proxy may have the file mapped.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 1_000_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 0x20], 1_000_000).unwrap();
    drop(f);
    let fills = n.proxy.metric("regproxy_fills_total").await;

    let out = n.cli(&["verify", "--rate", "2MiB/s", "--json"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify exits 1 when it found something: {out:?}"
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = lines.last().unwrap();
    assert_eq!(report["event"], "report");
    eprintln!(
        "verify --json said:\n{}",
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(report["checked"], 4, "every entry was re-hashed");
    let (read, seconds) = (
        report["bytes"].as_u64().unwrap(),
        report["seconds"].as_f64().unwrap(),
    );
    assert!(
        seconds >= read as f64 / f64::from(2 << 20),
        "reads are paced to the rate: {read} bytes in {seconds} s at 2 MiB/s"
    );
    assert_eq!(
        report["bad"],
        serde_json::json!([bad]),
        "only the corrupted blob is bad"
    );
    assert!(lines
        .iter()
        .any(|l| l["event"] == "bad" && l["digest"] == *bad && l["removed"] == true));
    assert!(!path.exists(), "the corrupt file is removed");
    assert!(entry(&n.ls().await, bad).is_none(), "and no longer listed");
    assert_eq!(n.proxy.metric("regproxy_cache_verify_bad_total").await, 1);

    let again = succeeded(n.cli(&["verify"]).await, "a second verify finds nothing");
    eprintln!("cache verify said:\n{again}");
    assert!(
        again.contains("checked 3 entries") && again.contains("nothing corrupt"),
        "{again}"
    );

    let url = format!("{}/v2/team/app/blobs/{bad}", n.proxy.url());
    get_verified(&url, bad)
        .await
        .expect("the next pull gets the blob whole");
    n.proxy.fills_done().await;
    assert_eq!(
        n.proxy.metric("regproxy_fills_total").await,
        fills + 1,
        "it was fetched again"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        n.image.layer_bytes[0],
        "and cached right"
    );
}

#[tokio::test]
async fn rm_refuses_a_blob_being_served_and_removes_it_once_idle() {
    // Larger than every buffer between the proxy and a client that stops
    // reading, so that the response is still being sent.
    let n = Node::start(&[40 << 20]).await;
    n.pull().await;
    let d = n.image.layers[0].clone();

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let req = Request::get(format!("{}/v2/team/app/blobs/{d}", n.proxy.url()))
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Sha256Digester::default();
    let mut len = 0;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    got.update(&first);
    len += first.len();

    let (st, answer) = n
        .admin(
            Method::POST,
            "/admin/cache/rm",
            Some(TOKEN),
            &format!("{{\"target\":\"{d}\"}}"),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "a blob being served is not removed: {answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().starts_with("in use: "),
        "{answer}"
    );
    let out = n.cli(&["rm", &d]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "the CLI says no with exit 1: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    assert!(n.proxy.cache_path(&d).exists());

    while let Some(f) = body.frame().await {
        let data = f
            .expect("the client's body is never cut")
            .into_data()
            .unwrap();
        got.update(&data);
        len += data.len();
    }
    assert_eq!(len, 40 << 20);
    assert_eq!(got.finish(), d, "the slow client got the blob whole");

    // The response's guard drops as its body ends, on the proxy's side.
    let before = n.proxy.metric("regproxy_cache_bytes").await;
    let url = n.proxy.admin;
    wait_for(
        || async {
            let body = format!("{{\"target\":\"{d}\"}}");
            let h = [("authorization", &*format!("Bearer {TOKEN}"))];
            let (st, _, _) = request(
                Method::POST,
                &format!("http://{url}/admin/cache/rm"),
                &h,
                body.into(),
            )
            .await;
            st == StatusCode::OK
        },
        "cache rm removes the blob once no response sends it",
    )
    .await;
    assert!(!n.proxy.cache_path(&d).exists(), "the file is unlinked");
    assert!(entry(&n.ls().await, &d).is_none(), "ls no longer shows it");
    assert_eq!(
        n.proxy.metric("regproxy_cache_bytes").await,
        before - (40 << 20),
        "the cache's bytes drop by the blob's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_refuses_a_blob_being_filled_and_the_fill_completes() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let data = blob(4 << 20, 90);
    let d = reg.put_blob_files("team/fill", &data);
    let cache = temp_dir("cache-admin");
    let (_token_dir, token) = token_file();
    let proxy = Proxy::start(
        &gate.url(),
        &cache.path().join("c"),
        &["--admin-token-file", token.to_str().unwrap()],
    );
    proxy.wait_learned_open();

    // A pull stalled half-way by the gate: the blob is being filled.
    gate.hold_after(1 << 20);
    let url = format!("{}/v2/team/fill/blobs/{d}", proxy.url());
    let (u, d2) = (url.clone(), d.clone());
    let pull = tokio::spawn(async move { get_verified(&u, &d2).await });
    wait_until(|| gate.passed() >= 1 << 20, "the fill is under way").await;
    let body = format!("{{\"target\":\"{d}\"}}");
    let (st, answer) = admin_request(
        proxy.admin,
        Method::POST,
        "/admin/cache/rm",
        Some(TOKEN),
        &body,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "a blob being filled is not removed: {answer}"
    );
    assert!(
        answer["error"].as_str().unwrap().contains("being filled"),
        "{answer}"
    );

    gate.open();
    pull.await
        .unwrap()
        .expect("the client of the fill gets the blob whole");
    proxy.fills_done().await;
    assert!(proxy.cache_path(&d).exists(), "the fill committed its blob");
}

#[tokio::test]
async fn rm_of_a_ref_removes_its_manifest_blobs_and_tag_once_unpinned() {
    let n = Node::start(&[100_000, 200_000]).await;
    n.pull().await;
    succeeded(n.regproxy("pin", &["team/app:v1"]).await, "regproxy pin");
    let out = n.cli(&["rm", "team/app:v1"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "pinned content is not removed: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pinned; unpin it first"),
        "{out:?}"
    );
    let ls = n.ls().await;
    assert_eq!(ls["total"]["entries"], 4, "nothing was removed: {ls}");
    for d in std::iter::once(&n.image.manifest).chain(&n.image.layers) {
        assert_eq!(
            entry(&ls, d).unwrap()["pinned"],
            true,
            "ls shows {d} pinned"
        );
    }
    succeeded(
        n.regproxy("unpin", &["team/app:v1"]).await,
        "regproxy unpin",
    );
    let out = succeeded(
        n.cli(&["rm", "registry.example:5000/team/app:v1"]).await,
        "cache rm REF",
    );
    assert!(out.contains("forgot the tag team/app:v1"), "{out}");
    let ls = n.ls().await;
    assert_eq!(
        ls["total"]["entries"], 0,
        "the manifest, config and layers are gone: {ls}"
    );
    assert_eq!(n.proxy.metric("regproxy_cache_bytes").await, 0);
    let out = n.cli(&["rm", "team/app:v1"]).await;
    assert_eq!(out.status.code(), Some(1), "the tag is forgotten: {out:?}");
    // Pulled again, the image comes back whole.
    n.pull().await;
    assert_eq!(n.ls().await["total"]["entries"], 4);
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_is_only_on_the_admin_listener() {
    let n = Node::start(&[1000]).await;
    for token in [None, Some("wrong")] {
        let (st, answer) = n.admin(Method::GET, "/admin/cache", token, "").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "token {token:?}: {answer}");
        assert!(answer["error"].is_string(), "errors are JSON: {answer}");
    }
    let (st, _) = n.admin(Method::GET, "/admin/cache", Some(TOKEN), "").await;
    assert_eq!(st, StatusCode::OK, "the right token lists the cache");
    let (st, _, _) = get(&format!("http://{}/metrics", n.proxy.admin), &[]).await;
    assert_eq!(st, StatusCode::OK, "/metrics needs no token");
    let auth = format!("Bearer {TOKEN}");
    let (st, _, _) = get(
        &format!("{}/admin/cache", n.proxy.url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "the API listener has no admin API"
    );

    let cache = temp_dir("no-token");
    let bare = Proxy::start(&n.reg.url(), &cache.path().join("c"), &[]);
    let (st, _, body) = get(
        &format!("http://{}/admin/cache", bare.admin),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(
        st,
        StatusCode::FORBIDDEN,
        "without --admin-token-file the admin API is off"
    );
    let answer: Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("--admin-token-file"),
        "{answer}"
    );
    let (st, _, _) = get(&format!("http://{}/metrics", bare.admin), &[]).await;
    assert_eq!(st, StatusCode::OK);
}
