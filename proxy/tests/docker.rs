//! A real dockerd pulls through regproxy by the registry's cluster name, as a
//! node does: the name maps to loopback in the daemon's `/etc/hosts`, and
//! docker treats 127.0.0.0/8 registries as insecure, so plain HTTP just works.

mod support;

use support::*;

#[test]
fn docker_pulls_through_the_registry_name_and_the_second_pull_stays_on_the_node() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let docker = Dockerd::start();

    // An image made without any network, pushed straight to the upstream.
    let root = temp_dir("rootfs");
    std::fs::create_dir_all(root.path().join("app")).unwrap();
    std::fs::write(root.path().join("app/data.bin"), blob(3 << 20, 42)).unwrap();
    std::fs::write(
        root.path().join("app/hello.txt"),
        b"hello from the upstream\n",
    )
    .unwrap();
    let upstream_ref = format!("{}/team/app:v1", reg.addr);
    let id = docker.push_imported(root.path(), &upstream_ref);

    let node_ref = format!("{REGISTRY_NAME}:{}/team/app:v1", proxy.addr.port());
    docker.docker(&["pull", &node_ref]);
    assert_eq!(
        docker.image_id(&node_ref),
        id,
        "the image pulled through the proxy is the upstream's image"
    );
    // The pull is done once the bytes are verified: wait for the proxy's
    // commits and the upstream's access log before counting.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream_gets = rt.block_on(proxy.settled(&reg));
    assert!(
        upstream_gets >= 2,
        "the first pull fetched config and layer from upstream"
    );

    docker.docker(&["rmi", &node_ref]);
    docker.docker(&["pull", &node_ref]);
    assert_eq!(docker.image_id(&node_ref), id);
    assert_eq!(
        rt.block_on(proxy.settled(&reg)),
        upstream_gets,
        "the second pull makes no upstream blob GET"
    );
    let hits = rt.block_on(proxy.metric("regproxy_requests_total{kind=\"blob\",result=\"hit\"}"));
    assert!(
        hits >= 2,
        "config and layer came from the node cache ({hits} hits)"
    );
}

/// An image of one layer, made without any network, tagged `reference`.
fn import(docker: &Dockerd, reference: &str, seed: u64) {
    let root = temp_dir("rootfs");
    std::fs::write(root.path().join("data.bin"), blob(2 << 20, seed)).unwrap();
    docker.sh(&format!(
        "tar c -C {} . | docker import - {reference}",
        root.path().display()
    ));
}

#[test]
fn docker_pushes_through_the_name_and_pulls_it_back_from_the_node() {
    let reg = Registry::start();
    let cache = temp_dir("cache");
    // The tag pushed must still be fresh when it is pulled back, however
    // slowly docker gets there: a TTL far longer than the test.
    let proxy = Proxy::start(&reg.url(), cache.path(), &["--tag-ttl", "1h"]);
    let docker = Dockerd::start();
    let image = format!("{REGISTRY_NAME}:{}/team/pushed:v1", proxy.addr.port());
    import(&docker, &image, 7);
    let id = docker.image_id(&image);
    docker.docker(&["push", &image]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (st, _, _) = rt.block_on(get(
        &format!("{}/v2/team/pushed/manifests/v1", reg.url()),
        &[(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
    ));
    assert_eq!(st, http::StatusCode::OK, "the push reached the upstream");

    docker.docker(&["rmi", &image]);
    docker.docker(&["pull", &image]);
    assert_eq!(docker.image_id(&image), id, "the same image comes back");
    let tag_hits =
        rt.block_on(proxy.metric("regproxy_requests_total{kind=\"tag\",result=\"hit\"}"));
    assert!(
        tag_hits >= 1,
        "the pushed manifest and tag were kept on the node and served from it"
    );
    assert!(
        rt.block_on(proxy.metric("regproxy_requests_total{kind=\"push\",result=\"passthrough\"}"))
            >= 3
    );
}

#[test]
fn docker_pulls_a_tag_it_pulled_before_while_the_upstream_is_stopped() {
    let mut reg = Registry::start();
    let cache = temp_dir("cache");
    // A TTL of 0s: every pull revalidates the tag, so the second one finds
    // the upstream down, as a pull past any TTL does.
    let proxy = Proxy::start(
        &reg.url(),
        cache.path(),
        &["--tag-ttl", "0s", "--connect-timeout", "1s"],
    );
    let docker = Dockerd::start();
    let upstream_ref = format!("{}/team/app:v1", reg.addr);
    import(&docker, &upstream_ref, 8);
    docker.docker(&["push", &upstream_ref]);
    let id = docker.image_id(&upstream_ref);
    docker.docker(&["rmi", &upstream_ref]);

    let image = format!("{REGISTRY_NAME}:{}/team/app:v1", proxy.addr.port());
    docker.docker(&["pull", &image]);
    reg.stop();
    docker.docker(&["rmi", &image]);
    docker.docker(&["pull", &image]);
    assert_eq!(
        docker.image_id(&image),
        id,
        "the image comes from the node while the upstream is down"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(proxy.metric("regproxy_tags_stale_served_total")) >= 1);
}
