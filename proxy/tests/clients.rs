//! The other clients a node runs, pulling by the registry name through the
//! proxy: skopeo, and containerd's `ctr images pull --plain-http`.

mod support;

use support::*;

#[test]
fn skopeo_and_containerd_pull_through_the_proxy() {
    let reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A real (uncompressed tar) layer, so that containerd can unpack it.
    let root = temp_dir("rootfs");
    std::fs::write(root.path().join("data.bin"), blob(2 << 20, 21)).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("c")
        .arg("-C")
        .arg(root.path())
        .arg(".")
        .output()
        .unwrap();
    assert!(tar.status.success());
    let layer = tar.stdout;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha256_digest(&layer)
    );
    rt.block_on(push_manifest(
        &reg.url(),
        "team/app",
        "v1",
        config.as_bytes(),
        &[&layer],
    ));
    let layer_digest = sha256_digest(&layer);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let image = format!("{REGISTRY_NAME}:{}/team/app:v1", proxy.addr.port());

    let out_dir = temp_dir("skopeo");
    let dest = format!("dir:{}", out_dir.path().join("img").display());
    let out = on_node(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--insecure-policy",
            &format!("docker://{image}"),
            &dest,
        ],
    );
    assert!(
        out.status.success(),
        "skopeo copies through the proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = layer_digest.trim_start_matches("sha256:");
    let copied =
        std::fs::read(out_dir.path().join("img").join(hex)).expect("skopeo wrote the layer");
    assert_eq!(sha256_digest(&copied), layer_digest);

    let containerd = Containerd::start();
    let out = containerd.ctr(&["images", "pull", "--plain-http", &image]);
    assert!(
        out.status.success(),
        "ctr images pull --plain-http goes through the proxy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = containerd.ctr(&["images", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&image));
    assert_eq!(
        rt.block_on(reg.blob_gets_logged(&layer_digest, 1)),
        1,
        "both clients together made one upstream fetch of the layer"
    );
}
