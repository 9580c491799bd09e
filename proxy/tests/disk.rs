//! This node's own disk failing is this node's failure: never a clean short
//! body, never counted against the upstream, nothing partial kept, and the
//! proxy goes on caching once there is room.

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

#[tokio::test]
async fn a_cache_write_that_fails_cuts_the_client_and_is_not_an_upstream_error() {
    let reg = Registry::start();
    // The cap says 1 GiB fits; the filesystem under it holds 8 MiB.
    let disk = Tmpfs::mount(8);
    let cache = disk.path().join("cache");
    let big = blob(24 << 20, 77);
    let big_digest = reg.put_blob_files("team/disk", &big);
    let proxy = Proxy::start(&reg.url(), &cache, &["--cache-size", "1GiB"]);
    proxy.wait_learned_open();
    let errors_before = proxy.metric("regproxy_upstream_errors_total").await;

    let url = format!("{}/v2/team/disk/blobs/{big_digest}", proxy.url());
    let (status, _, body) = get(&url, &[]).await;
    assert_eq!(status, 200, "the head goes out before the disk fills");
    assert!(
        body.is_err(),
        "a fill whose cache write failed must cut the client, not end cleanly short: got {} bytes",
        body.map(|b| b.len()).unwrap_or(0)
    );
    proxy.fills_done().await;
    assert_eq!(
        proxy.metric("regproxy_upstream_errors_total").await,
        errors_before,
        "the node's disk is not the upstream's fault"
    );
    assert!(
        proxy.logs().contains("cache write failed"),
        "the node says why: {}",
        proxy.logs()
    );
    let left = temp_files(&cache);
    assert!(
        left.is_empty(),
        "no temp file survives a failed fill: {left:?}"
    );
    assert!(
        !proxy.cache_path(&big_digest).exists(),
        "nothing partial is committed"
    );

    // The failed fill gave its room back: a blob that fits is cached.
    let small = blob(1 << 20, 78);
    let small_digest = reg.put_blob_files("team/disk", &small);
    let url = format!("{}/v2/team/disk/blobs/{small_digest}", proxy.url());
    let (status, _, body) = get(&url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body.expect("whole body"), small);
    proxy.fills_done().await;
    assert!(
        proxy.cache_path(&small_digest).exists(),
        "a blob that fits is cached once there is room"
    );
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
