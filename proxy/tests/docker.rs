//! A real dockerd pulls through regproxy by the registry's cluster name, as a
//! node does: the name maps to loopback in the daemon's `/etc/hosts`, and
//! docker treats 127.0.0.0/8 registries as insecure, so plain HTTP just works.

mod support;

use support::*;

#[test]
fn docker_pulls_through_the_registry_name_and_the_second_pull_stays_on_the_node() {
    let reg = Registry::start();
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let docker = Dockerd::start();

    // An image made without any network, pushed straight to the upstream.
    let root = TempDir::new("rootfs");
    std::fs::create_dir_all(root.path().join("app")).unwrap();
    std::fs::write(root.path().join("app/data.bin"), blob(3 << 20, 42)).unwrap();
    std::fs::write(
        root.path().join("app/hello.txt"),
        b"hello from the upstream\n",
    )
    .unwrap();
    let upstream_ref = format!("{}/team/app:v1", reg.addr);
    docker.sh(&format!(
        "tar c -C {} . | docker import - {upstream_ref}",
        root.path().display()
    ));
    docker.docker(&["push", &upstream_ref]);
    let id = docker.image_id(&upstream_ref);
    docker.docker(&["rmi", &upstream_ref]);

    let node_ref = format!("{REGISTRY_NAME}:{}/team/app:v1", proxy.addr.port());
    docker.docker(&["pull", &node_ref]);
    assert_eq!(
        docker.image_id(&node_ref),
        id,
        "the image pulled through the proxy is the upstream's image"
    );
    let upstream_gets = reg.all_blob_gets();
    assert!(
        upstream_gets >= 2,
        "the first pull fetched config and layer from upstream"
    );

    docker.docker(&["rmi", &node_ref]);
    docker.docker(&["pull", &node_ref]);
    assert_eq!(docker.image_id(&node_ref), id);
    assert_eq!(
        reg.all_blob_gets(),
        upstream_gets,
        "the second pull makes no upstream blob GET"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hits = rt.block_on(proxy.metric("regproxy_requests_total{kind=\"blob\",result=\"hit\"}"));
    assert!(
        hits >= 2,
        "config and layer came from the node cache ({hits} hits)"
    );
}
