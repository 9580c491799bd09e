//! A real containerd pulls the registry name through regproxy because of the
//! `hosts.toml` that `regproxy hosts containerd ensure` writes, straight from
//! the registry (the file's `server`) while regproxy is down, and no longer
//! once `remove` took the file away. `ctr --hosts-dir` reads that file with
//! the same code (`remotes/docker/config`) as the CRI's `config_path`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

fn regproxy(args: &[&str]) -> String {
    let out = Command::new(regproxy_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "regproxy {args:?} should succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ctr images pull`: resolve, fetch and unpack, as the CRI does (with the
/// `native` snapshotter, which needs no overlay mount).
fn pull(containerd: &Containerd, certs: &Path, image: &str) -> Output {
    containerd.ctr(&[
        "images",
        "pull",
        "--snapshotter",
        "native",
        "--hosts-dir",
        certs.to_str().unwrap(),
        image,
    ])
}

/// An image containerd can unpack: one uncompressed tar layer holding a
/// file of `len` bytes from `seed`, and a config naming its diff id.
fn unpackable(len: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let dir = temp_dir("layer");
    std::fs::write(dir.path().join("data"), blob(len, seed)).unwrap();
    let out = Command::new("tar")
        .args(["-c", "--owner=0", "--group=0", "-C"])
        .arg(dir.path())
        .arg("data")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {out:?}");
    let layer = out.stdout;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha256_digest(&layer)
    );
    (layer, config.into_bytes())
}

#[test]
fn containerd_pulls_through_the_proxy_by_hosts_toml_and_from_the_registry_when_it_is_down() {
    let reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (layer, config) = unpackable(1 << 20, 11);
    rt.block_on(push_manifest(
        &reg.url(),
        "team/ctr",
        "v1",
        &config,
        &[&layer],
    ));
    let layer_digest = sha256_digest(&layer);
    // A second image, pulled only while the proxy is down: containerd keeps
    // a blob it once had until its GC runs, so a layer of its own is what
    // shows that the second pull really fetched.
    let (layer2, config2) = unpackable(1 << 20, 12);
    rt.block_on(push_manifest(
        &reg.url(),
        "team/ctr",
        "v2",
        &config2,
        &[&layer2],
    ));
    let layer2_digest = sha256_digest(&layer2);

    let cache = temp_dir("ctr-cache");
    let mut proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let containerd = Containerd::start();
    let certs_dir = temp_dir("certs.d");
    let certs = certs_dir.path().to_str().unwrap();
    let endpoint = format!("http://{}", proxy.addr);
    // The image reference has no port, as on a node (the proxy is on :80 there).
    let image = format!("{REGISTRY_NAME}/team/ctr:v1");

    let said = regproxy(&[
        "hosts",
        "containerd",
        "ensure",
        "--certs-dir",
        certs,
        "--name",
        REGISTRY_NAME,
        "--endpoint",
        &endpoint,
        // The registry's own address, as the Service's cluster IP is on a node.
        "--server",
        &reg.url(),
    ]);
    assert!(said.contains("added"), "{said}");

    let out = pull(&containerd, certs_dir.path(), &image);
    assert!(
        out.status.success(),
        "containerd should pull {image} through the proxy; ctr said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let content = containerd.ctr(&["content", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&content.stdout).contains(&layer_digest),
        "containerd's content store should hold the layer"
    );
    // containerd is done once the bytes are verified; the proxy's commit
    // into its cache follows.
    rt.block_on(proxy.fills_done());
    assert!(
        proxy.cache_path(&layer_digest).exists(),
        "the layer should have come through the proxy and into its cache"
    );
    assert_eq!(
        rt.block_on(reg.blob_gets_logged(&layer_digest, 1)),
        1,
        "the proxy fetched the layer upstream once"
    );
    let served = rt.block_on(proxy.metric("regproxy_served_cache_bytes_total"));
    assert!(
        served >= layer.len() as u64,
        "the proxy should have served the layer to containerd, it served {served} bytes"
    );

    // The proxy dies (a crash, a rollout without a successor): containerd
    // finds nothing on the mirror and pulls from `server`, the registry.
    proxy.signal("-KILL");
    proxy.wait_exit(PATIENCE);
    let image2 = format!("{REGISTRY_NAME}/team/ctr:v2");
    let out = pull(&containerd, certs_dir.path(), &image2);
    assert!(
        out.status.success(),
        "with the proxy down containerd should pull {image2} from the registry itself; ctr said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let content = containerd.ctr(&["content", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&content.stdout).contains(&layer2_digest),
        "containerd's content store should hold the second image's layer"
    );
    // Straight from containerd, the request carries `?ns=<registry name>`.
    let straight = format!("/blobs/{layer2_digest}?ns={REGISTRY_NAME} HTTP/1.1\"");
    assert_eq!(
        rt.block_on(reg.logged(1, "containerd's own GET of the layer", |l| {
            l.contains("\"GET /v2/") && l.contains(&straight)
        })),
        1,
        "containerd should have fetched the layer from the registry itself"
    );
    assert!(
        !proxy.cache_path(&layer2_digest).exists(),
        "and not through the (dead) proxy"
    );

    // Without the file containerd goes to https://NAME:443 (here: loopback,
    // where nothing listens), so the pull fails: the file is what routes it.
    let said = regproxy(&[
        "hosts",
        "containerd",
        "remove",
        "--certs-dir",
        certs,
        "--name",
        REGISTRY_NAME,
    ]);
    assert!(said.contains("removed"), "{said}");
    assert!(
        std::fs::read_dir(certs).unwrap().next().is_none(),
        "remove should leave certs.d as it was"
    );
    let rm = containerd.ctr(&["content", "rm", &layer_digest]);
    assert!(rm.status.success(), "ctr content rm should succeed");
    let out = pull(&containerd, certs_dir.path(), &image);
    assert!(
        !out.status.success(),
        "without hosts.toml containerd should no longer reach the registry name"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("https://") && said.contains("127.0.0.1:443"),
        "containerd should have fallen back to https on port 443: {said}"
    );
    assert_eq!(
        reg.blob_gets(&layer_digest),
        1,
        "and nothing more should reach the upstream"
    );
}
