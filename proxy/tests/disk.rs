//! This node's own disk failing is this node's failure: never a clean short
//! body, never counted against the upstream, nothing partial kept, and the
//! proxy goes on caching once there is room.
//!
//! Each test mounts a tmpfs of its own for the cache dir, with a cap
//! (`--cache-size`) larger than the file system: the disk, not the cap, is
//! what runs out. What fills it from outside is `dd`, as the node's other
//! files would.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = temp_dir("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Appends zeros to `filler` until the file system is full, as something
/// else on the node would.
fn fill_up(filler: &Path) {
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "oflag=append", "conv=notrunc"])
        .arg(format!("of={}", filler.display()))
        .output()
        .expect("dd runs");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "dd should stop only at the full disk: {out:?}"
    );
}

/// The committed content under `sha256/` (not the manifests' `.type`
/// sidecars): its files and their bytes.
fn committed(cache: &Path) -> (u64, u64) {
    fn walk(p: &Path, out: &mut (u64, u64)) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_none() {
                out.0 += 1;
                out.1 += e.metadata().unwrap().len();
            }
        }
    }
    let mut out = (0, 0);
    walk(&cache.join("sha256"), &mut out);
    out
}

/// The index matches the disk (no fill in flight): as many entries and bytes
/// as committed files, and the cap holds.
async fn assert_index_matches_disk(proxy: &Proxy) {
    proxy.fills_done().await;
    let (files, bytes) = committed(&proxy.cache_dir);
    let m = proxy.metrics().await;
    assert_eq!(
        (m["regproxy_cache_entries"], m["regproxy_cache_bytes"]),
        (files, bytes),
        "the index should hold exactly the committed files and their bytes"
    );
    assert!(
        m["regproxy_cache_bytes"] <= m["regproxy_cache_capacity_bytes"],
        "the cap should hold"
    );
}

/// Lines of the proxy's log that contain `what`.
fn lines(proxy: &Proxy, what: &str) -> usize {
    proxy.logs().lines().filter(|l| l.contains(what)).count()
}

const FULL: &str = "cache disk is full";
const ROOM: &str = "cache disk has room again";

/// Pulls blob `d` of `repo` and checks that it came whole and right.
async fn pull(proxy: &Proxy, repo: &str, d: &str) {
    let url = format!("{}/v2/{repo}/blobs/{d}", proxy.url());
    let (status, _, body) = get(&url, &[]).await;
    assert_eq!(status, 200, "{d} should be served");
    let body = body.unwrap_or_else(|e| panic!("{d} should come whole: {e}"));
    assert_eq!(sha256_digest(&body), d, "{d} should hash to its digest");
}

#[tokio::test]
async fn a_blob_larger_than_the_free_space_is_streamed_whole_and_not_kept() {
    let reg = Registry::start();
    // The cap says 1 GiB fits; the filesystem under it holds 8 MiB. The
    // free space is checked before the fill: the blob is streamed whole,
    // uncached, rather than cut when the disk fills under it.
    let disk = Tmpfs::mount(8);
    let cache = disk.path().join("cache");
    let big = blob(24 << 20, 77);
    let big_digest = reg.put_blob_files("team/disk", &big);
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();
    let errors_before = proxy.metric("regproxy_upstream_errors_total").await;
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 0);

    pull(&proxy, "team/disk", &big_digest).await;
    proxy.fills_done().await;
    assert_eq!(
        proxy.metric("regproxy_upstream_errors_total").await,
        errors_before,
        "the node's disk is not the upstream's fault"
    );
    assert_eq!(
        proxy.metric("regproxy_uncached_fills_no_room_total").await,
        1,
        "the blob was streamed uncached for lack of room"
    );
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 1);
    wait_until(|| lines(&proxy, FULL) == 1, "the node says why, once").await;
    let left = temp_files(&cache);
    assert!(left.is_empty(), "no temp file was left: {left:?}");
    assert!(
        !proxy.cache_path(&big_digest).exists(),
        "nothing partial is committed"
    );

    // Small blobs that fit are cached between large ones that do not, and
    // the state does not flip with each: the disk stays full (for blobs the
    // size of the one refused) and says so once, not once per request.
    for i in 0..4 {
        let small = blob(256 << 10, 78 + i);
        let small_digest = reg.put_blob_files("team/disk", &small);
        pull(&proxy, "team/disk", &small_digest).await;
        proxy.fills_done().await;
        assert!(
            proxy.cache_path(&small_digest).exists(),
            "a blob that fits is cached"
        );
        pull(&proxy, "team/disk", &big_digest).await;
        proxy.fills_done().await;
        assert!(!proxy.cache_path(&big_digest).exists());
    }
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 1);
    assert_eq!(
        proxy.metric("regproxy_uncached_fills_no_room_total").await,
        5,
        "each pull of the large blob was streamed uncached"
    );
    assert_eq!(
        (lines(&proxy, FULL), lines(&proxy, ROOM)),
        (1, 0),
        "mixed sizes do not flip the state: one line for the one change"
    );
    assert_index_matches_disk(&proxy).await;
}

#[tokio::test]
async fn pulls_past_the_file_systems_size_evict_and_keep_caching() {
    let reg = Registry::start();
    let disk = Tmpfs::mount(64);
    let cache = disk.path().join("cache");
    // 96 MiB of blobs through a 64 MiB disk, under a cap of 1 GiB.
    let digests: Vec<String> = (0..12)
        .map(|i| reg.put_blob_files("team/many", &blob(8 << 20, 100 + i)))
        .collect();
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();
    for d in &digests {
        pull(&proxy, "team/many", d).await;
        proxy.fills_done().await;
        assert!(
            proxy.cache_path(d).exists(),
            "{d} should be cached: eviction makes room on the disk"
        );
    }
    let m = proxy.metrics().await;
    assert!(
        m["regproxy_cache_evictions_total"] > 0,
        "the oldest blobs were evicted"
    );
    assert!(
        !proxy.cache_path(&digests[0]).exists(),
        "the least recently used blob went first"
    );
    assert_eq!(m["regproxy_uncached_fills_total"], 0, "every fill was kept");
    assert_eq!(
        m["regproxy_cache_disk_full"], 0,
        "the disk never counted as full"
    );
    assert_eq!(lines(&proxy, FULL), 0);
    assert!(
        m["regproxy_cache_bytes"] <= 64 << 20,
        "the cache holds what the disk holds"
    );
    assert_index_matches_disk(&proxy).await;
    let left = temp_files(&cache);
    assert!(left.is_empty(), "no temp file was left: {left:?}");
}

#[tokio::test]
async fn a_blob_tried_while_the_disk_was_full_is_cached_once_there_is_room() {
    let reg = Registry::start();
    let disk = Tmpfs::mount(8);
    let cache = disk.path().join("cache");
    let data = blob(1 << 20, 79);
    let d = reg.put_blob_files("team/disk", &data);
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();

    // The node's own files fill the disk from outside.
    let filler = disk.path().join("filler");
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=16"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "dd stops at the full disk");
    let url = format!("{}/v2/team/disk/blobs/{d}", proxy.url());
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(
        sha256_digest(&body.expect("streamed uncached")),
        d,
        "a full disk still serves the blob, uncached"
    );
    proxy.fills_done().await;
    assert!(!proxy.cache_path(&d).exists());
    let left = temp_files(&cache);
    assert!(
        left.is_empty(),
        "nothing of the failed fill is left: {left:?}"
    );

    // Room again: the same digest is cached now, and served from the cache.
    std::fs::remove_file(&filler).unwrap();
    let (st, _, body) = get(&url, &[]).await;
    assert_eq!(st, 200);
    assert_eq!(sha256_digest(&body.unwrap()), d);
    proxy.fills_done().await;
    assert!(
        proxy.cache_path(&d).exists(),
        "the blob is cached once there is room"
    );
}

/// A disk that something else fills while the proxy works: the fill in
/// flight is cut (never a clean short body), the disk counts as full (one
/// log line, a gauge), hits and uncached pulls go on (a real client's too),
/// the state file stays whole, and once the filler is gone fills are kept
/// again (one more log line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_from_outside_cuts_the_fill_in_flight_and_serves_on_until_there_is_room() {
    let reg = Registry::start();
    let gate = Gate::start(reg.addr).await;
    let disk = Tmpfs::mount(64);
    let cache = disk.path().join("cache");
    let filler = disk.path().join("filler");
    let proxy = Proxy::start(&gate.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();
    let blob_url = |repo: &str, d: &str| format!("{}/v2/{repo}/blobs/{d}", proxy.url());

    // Before: a blob cached (a hit later), and a tag in state.json.
    let hit = reg.put_blob_files("team/full", &blob(512 << 10, 200));
    pull(&proxy, "team/full", &hit).await;
    let (_, v0) = push_manifest(&reg.url(), "team/app", "v0", b"{}", &[&blob(1000, 201)]).await;
    let (st, _, body) = get(&format!("{}/v2/team/app/manifests/v0", proxy.url()), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(sha256_digest(&body.unwrap()), v0);
    proxy.fills_done().await;
    let state = cache.join("state.json");
    let saved = std::fs::read(&state).expect("the tag is in state.json");
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 0);

    // A slowed fill of 32 MiB (8 s at 4 MiB/s) is in flight...
    let big = reg.put_blob_files("team/full", &blob(32 << 20, 202));
    gate.throttle(4 << 20);
    let slow_url = blob_url("team/full", &big);
    let slow = tokio::spawn(async move { get(&slow_url, &[]).await });
    let before = gate.passed();
    wait_until(
        || gate.passed() > before + (2 << 20),
        "the slowed fill has written some of its bytes",
    )
    .await;
    // ...when dd fills the disk.
    let f = filler.clone();
    tokio::task::spawn_blocking(move || fill_up(&f))
        .await
        .unwrap();
    gate.throttle(0);
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200, "the head went out before the disk filled");
    match body {
        Err(_) => {}
        Ok(b) => assert_eq!(
            sha256_digest(&b),
            big,
            "a body that ends cleanly must be whole and right, never short"
        ),
    }
    proxy.fills_done().await;
    assert!(
        !proxy.cache_path(&big).exists(),
        "nothing partial is committed"
    );
    let left = temp_files(&cache);
    assert!(left.is_empty(), "the cut fill left no temp file: {left:?}");
    assert_eq!(
        proxy.metric("regproxy_cache_disk_full").await,
        1,
        "a write that found the disk full says so"
    );
    // The cut fill's temp file gave its blocks back: the filler takes them.
    let f = filler.clone();
    tokio::task::spawn_blocking(move || fill_up(&f))
        .await
        .unwrap();

    // While full: many requests, hits and misses, all served.
    let hits = r#"regproxy_requests_total{kind="blob",result="hit"}"#;
    let hits_before = proxy.metrics().await[hits];
    let mut misses = Vec::new();
    for i in 0..10 {
        pull(&proxy, "team/full", &hit).await;
        let d = reg.put_blob_files("team/full", &blob(1 << 20, 300 + i));
        pull(&proxy, "team/full", &d).await;
        misses.push(d);
    }
    proxy.fills_done().await;
    let m = proxy.metrics().await;
    assert_eq!(m[hits] - hits_before, 10, "every hit is served while full");
    assert!(
        m["regproxy_uncached_fills_no_room_total"] >= 10,
        "the misses are streamed uncached for lack of room"
    );
    assert!(
        misses.iter().all(|d| !proxy.cache_path(d).exists()),
        "nothing is kept while the disk is full"
    );

    // A real client pulls an image (tag, config, layer) while the disk is full.
    let layer = blob(1 << 20, 400);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_manifest(&reg.url(), "team/app", "v1", config, &[&layer]).await;
    let out_dir = temp_dir("skopeo");
    let image = format!("{REGISTRY_NAME}:{}/team/app:v1", proxy.addr.port());
    let dest = format!("dir:{}", out_dir.path().join("img").display());
    let out = tokio::task::spawn_blocking(move || {
        on_node(
            "skopeo",
            &[
                "copy",
                "--src-tls-verify=false",
                "--insecure-policy",
                &format!("docker://{image}"),
                &dest,
            ],
        )
    })
    .await
    .unwrap();
    succeeded(out, "skopeo copy through the proxy while the disk is full");
    let layer_digest = sha256_digest(&layer);
    let copied = std::fs::read(out_dir.path().join("img").join(&layer_digest[7..]))
        .expect("skopeo wrote the layer");
    assert_eq!(sha256_digest(&copied), layer_digest);
    assert_eq!(
        std::fs::read(&state).unwrap(),
        saved,
        "a state write that failed leaves the last saved file whole"
    );
    proxy.fills_done().await;
    assert_eq!(lines(&proxy, FULL), 1, "one log line says the disk is full");
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 1);
    assert_eq!(lines(&proxy, ROOM), 0);

    // The filler goes: fills are kept again, the big one too.
    std::fs::remove_file(&filler).unwrap();
    for d in misses.iter().chain([&big]) {
        pull(&proxy, "team/full", d).await;
        proxy.fills_done().await;
        assert!(
            proxy.cache_path(d).exists(),
            "{d} should be cached once there is room"
        );
    }
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 0);
    wait_until(|| lines(&proxy, ROOM) == 1, "the node says there is room").await;
    assert_eq!(
        lines(&proxy, FULL),
        1,
        "still one line said the disk was full"
    );
    assert_eq!(lines(&proxy, ROOM), 1, "one line says there is room again");

    let parsed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).expect("state.json parses");
    assert!(parsed.to_string().contains(&v0), "state.json keeps the tag");
    let left = temp_files(&cache);
    assert!(left.is_empty(), "no temp file was left: {left:?}");
    assert_index_matches_disk(&proxy).await;
}

/// A node whose disk is full when regproxy (re)starts: it starts, serves
/// blobs uncached, and keeps them once there is room.
#[tokio::test]
async fn serve_starts_on_a_completely_full_disk_and_caches_once_there_is_room() {
    let reg = Registry::start();
    let disk = Tmpfs::mount(8);
    let cache = disk.path().join("cache");
    let filler = disk.path().join("filler");
    fill_up(&filler);
    let data = blob(1 << 20, 500);
    let d = reg.put_blob_files("team/disk", &data);
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);

    for _ in 0..3 {
        pull(&proxy, "team/disk", &d).await;
    }
    proxy.fills_done().await;
    assert!(!proxy.cache_path(&d).exists(), "no room: nothing is kept");
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 1);
    assert_eq!(
        proxy.metric("regproxy_uncached_fills_no_room_total").await,
        3
    );
    let left = temp_files(&cache);
    assert!(left.is_empty(), "no temp file is left: {left:?}");

    std::fs::remove_file(&filler).unwrap();
    pull(&proxy, "team/disk", &d).await;
    proxy.fills_done().await;
    assert!(
        proxy.cache_path(&d).exists(),
        "the blob is cached once there is room"
    );
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 0);
    wait_until(|| lines(&proxy, ROOM) == 1, "the node says there is room").await;
    assert_eq!(lines(&proxy, FULL), 1, "one line said the disk was full");
    assert_index_matches_disk(&proxy).await;
}

/// Evicting a blob that a slow client is still reading frees no blocks until
/// that response ends: the room counted on it is checked again once it is
/// unlinked, and the new blob is streamed whole, uncached, rather than cut
/// when the disk fills under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_counted_on_a_blob_still_being_read_is_checked_before_the_fill() {
    use std::io::{Read, Write};
    let reg = Registry::start();
    let disk = Tmpfs::mount(64);
    let cache = disk.path().join("cache");
    let a = reg.put_blob_files("team/held", &blob(40 << 20, 201));
    let b = reg.put_blob_files("team/held", &blob(40 << 20, 202));
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();
    pull(&proxy, "team/held", &a).await;
    proxy.fills_done().await;
    assert!(proxy.cache_path(&a).exists());

    // A client that reads the first bytes of A, then stops: its response
    // holds A's file open.
    let mut slow = std::net::TcpStream::connect(proxy.addr).unwrap();
    write!(
        slow,
        "GET /v2/team/held/blobs/{a} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 4096];
    let n = slow.read(&mut first).unwrap();
    assert!(n > 0, "the slow client's response has begun");

    pull(&proxy, "team/held", &b).await;
    proxy.fills_done().await;
    assert!(!proxy.cache_path(&a).exists(), "A was evicted to make room");
    assert!(
        !proxy.cache_path(&b).exists(),
        "B is not kept: A's blocks are still held"
    );
    assert_eq!(proxy.metric("regproxy_cache_disk_full").await, 1);
    assert_eq!(
        proxy.metric("regproxy_uncached_fills_no_room_total").await,
        1
    );
    let left = temp_files(&cache);
    assert!(left.is_empty(), "no temp file was left: {left:?}");
    drop(slow);
    assert_index_matches_disk(&proxy).await;
}
