//! Peers (issue 11): nodes fill from each other, so that each blob crosses
//! the uplink once per cluster. Real `regproxy serve` nodes, each on a
//! loopback address of its own (a block of `127.0.<n>.*` per test) with its
//! peer listener, in front of Debian's `docker-registry`; every count of
//! upstream GETs is the registry's own access log.
//!
//! - a cold 256 MiB blob, 3 nodes × 4 clients: one upstream GET;
//! - the owner killed mid-blob: the survivors' clients still get it whole,
//!   and it crosses the uplink once more (the new owner's resume);
//! - a peer serving flipped bytes: caught, banned, bypassed (and one that
//!   answers 404: bypassed, still live);
//! - the peer port: nothing without the secret, only content by digest;
//! - dockerd, containerd's order and skopeo, one per node: one GET per blob;
//! - `--peers dns:NAME:PORT` through a name server the test runs, and the
//!   answer shrinking under it;
//! - a node leaving (kill -9) and joining again while two others pull;
//! - a peer silent before its head, or mid-body (while it answers its
//!   probes, past --upstream-timeout): the upstream instead, resumed with a
//!   Range from where the peer stopped;
//! - a manifest by digest: once upstream for three nodes;
//! - a private upstream: a peer's copy reaches only clients the upstream
//!   lets in, and a blob the owner may not fetch anonymously is fetched by
//!   the asking node itself;
//! - a live peer that trickles: given up as a stall after --upstream-timeout,
//!   the upstream sends the rest, the peer stays live;
//! - a peer that announces a blob larger than it is: banned once the
//!   upstream's size contradicts it, the fill fails, the next pull is right;
//! - the peer listener past its connection cap: 503 at once, and silent
//!   connections are closed after --peer-timeout;
//! - a range from a peer starts no fill on a node without the blob;
//! - `serve` refuses peers without a listener or a usable secret.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{Method, StatusCode};
use support::handover::{docker_cli, get_counting, get_verified};
use support::peers::*;
use support::*;

const REPO: &str = "team/peers";
const BIG: usize = 256 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_nodes_times_four_clients_fetch_a_cold_256_mib_blob_from_the_upstream_once() {
    let rt = runtime();
    let reg = Registry::start();
    let c = Cluster::start(21, 3, &reg.url(), &[]);
    for n in &c.nodes {
        n.proxy.wait_learned_open();
    }
    rt.block_on(async {
        wait_live(&c.all(), 2).await;
        let digest = reg.put_blob_files(REPO, &blob(BIG, 2101));
        let owner = c.owner_of(&digest);
        let urls: Vec<String> = c.nodes.iter().map(|n| n.blob_url(REPO, &digest)).collect();
        let t = Instant::now();
        let got = Clients::start(&urls, 4).results().await;
        let took = t.elapsed();
        for (i, g) in got.iter().enumerate() {
            assert!(
                verified(g, &digest),
                "client {i} of node {} should get the blob whole: {g:?}",
                i / 4
            );
        }
        fills_done(&c.all()).await;
        assert_eq!(
            reg.blob_gets_logged(&digest, 1).await,
            1,
            "12 clients on 3 nodes should make exactly one upstream GET of the blob"
        );
        println!("3 nodes x 4 clients, 256 MiB cold: {took:?}, owner node {owner}");

        // The metrics tell the same story: the owner (by the rendezvous
        // rule) filled from the upstream and served both other nodes, which
        // got the whole blob from it and nothing of it from the upstream.
        // (A counter of body bytes may or may not count the liveness
        // probes' `{}`: a few bytes every 2 s are allowed for.)
        let about = |n: u64, bytes: u64| (bytes..bytes + PROBES).contains(&n);
        let o = &c.nodes[owner];
        // Its fill was started by its own client (a miss it counts as its
        // own) or by the first peer that asked (a peer request it answered
        // with a fill): which one is a race, so only the sum is sure.
        let asked =
            o.metric0(&peer_requests("miss")).await + o.metric0(&peer_requests("hit")).await;
        assert_eq!(asked, 2, "each other node asked the owner once");
        assert_eq!(o.metric0(OWNER_PEER).await, 0, "the owner owns it");
        assert!(o.metric0(OWNER_SELF).await <= 1);
        let got = o.metric0(RECEIVED).await;
        assert!(about(got, 0), "the owner asked no peer ({got} bytes)");
        let served = o.metric0(SERVED).await;
        assert!(
            about(served, 2 * BIG as u64),
            "the owner served the blob once to each other node ({served} bytes)"
        );
        assert!(o.metric0(UPSTREAM_BYTES).await >= BIG as u64);
        for (i, n) in c.nodes.iter().enumerate().filter(|(i, _)| *i != owner) {
            assert_eq!(n.metric0(OWNER_SELF).await, 0, "node {i} owns nothing");
            assert!(n.metric0(OWNER_PEER).await >= 1, "node {i} asked the owner");
            let got = n.metric0(RECEIVED).await;
            assert!(
                about(got, BIG as u64),
                "node {i} got the blob from the owner ({got} bytes)"
            );
            let up = n.metric0(UPSTREAM_BYTES).await;
            assert!(
                up < 1 << 20,
                "node {i} got none of the blob from the upstream ({up} bytes)"
            );
        }
    });
}

#[test]
fn an_owner_killed_mid_blob_leaves_every_client_of_the_survivors_with_a_verified_body() {
    const SIZE: usize = 64 << 20;
    /// Where the gate holds the owner's fill: mid-blob, surely.
    const HELD_AT: u64 = 16 << 20;
    let rt = runtime();
    let reg = Registry::start();
    let gate = rt.block_on(Gate::start(reg.addr));
    // A peer timeout longer than the test's hold, so that only the kill
    // breaks the survivors' streams from the owner.
    let mut c = Cluster::start(22, 3, &gate.url(), &["--peer-timeout", "60s"]);
    for n in &c.nodes {
        n.proxy.wait_learned_open();
    }
    let digest = reg.put_blob_files(REPO, &blob(SIZE, 2202));
    let owner = c.owner_of(&digest);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let clients = rt.block_on(async {
        wait_live(&c.all(), 2).await;
        gate.hold_after(HELD_AT);
        let urls: Vec<String> = c.nodes.iter().map(|n| n.blob_url(REPO, &digest)).collect();
        let clients = Clients::start(&urls, 4);
        // Every client of the survivors is following the owner's fill
        // through its own node.
        let following =
            |i: usize| (0..4).all(|k| clients.progress[i * 4 + k].load(SeqCst) >= 1 << 20);
        wait_until(
            || survivors.iter().all(|i| following(*i)),
            "every client of the other two nodes has 1 MiB of the blob, from the owner's fill",
        )
        .await;
        clients
    });
    let killed_at = gate.passed();
    assert!(killed_at < SIZE as u64, "the owner's fill is mid-blob");
    c.nodes[owner].kill();
    gate.open();
    rt.block_on(async {
        let got = clients.results().await;
        for (i, g) in got.iter().enumerate() {
            if i / 4 == owner {
                assert!(
                    g.is_err(),
                    "client {i} of the killed node is cut, never given a clean body: {g:?}"
                );
            } else {
                assert!(
                    verified(g, &digest),
                    "client {i} of surviving node {} should get the blob whole: {g:?}",
                    i / 4
                );
            }
        }
        let alive: Vec<&Node> = survivors.iter().map(|i| &c.nodes[*i]).collect();
        for n in &alive {
            let (broken, unreachable) = (
                n.metric0(&fallbacks("broken")).await,
                n.metric0(&fallbacks("unreachable")).await,
            );
            println!(
                "node {}: fallbacks broken {broken}, unreachable {unreachable}",
                n.peer
            );
            let broke = broken + unreachable;
            assert!(
                broke >= 1,
                "node {} counts the owner's death as a fallback (broken or unreachable)",
                n.peer
            );
        }
        wait_live(&alive, 1).await;
        fills_done(&alive).await;
        // The survivors agree on a new owner: it resumes from the upstream,
        // the other one from it. The blob crosses the uplink once more.
        let gets = reg.blob_gets_logged(&digest, 1).await;
        assert!(
            gets <= 2,
            "the dead owner's GET and the new owner's resume reach the upstream, not {gets}"
        );
        let peers: Vec<SocketAddr> = alive.iter().map(|n| n.peer).collect();
        let new_owner = support::peers::owner(&digest, &peers);
        let other = alive.iter().find(|n| n.peer != new_owner).unwrap();
        let up = other.metric0(UPSTREAM_BYTES).await;
        assert!(
            up < PROBES,
            "node {} resumed from the new owner {new_owner}, not the upstream ({up} bytes)",
            other.peer
        );
        let got = other.metric0(RECEIVED).await;
        assert!(
            got >= SIZE as u64,
            "node {} got every byte from peers ({got})",
            other.peer
        );
        println!(
            "owner killed with {killed_at} of {SIZE} bytes sent upstream; {gets} upstream GETs"
        );
        for n in &alive {
            let cached = std::fs::read(n.proxy.cache_path(&digest)).unwrap();
            assert_eq!(
                sha256_digest(&cached),
                digest,
                "node {} cached it right",
                n.peer
            );
        }
    });
}

#[test]
fn a_peer_that_serves_flipped_bytes_is_caught_banned_and_bypassed() {
    let rt = runtime();
    let reg = Registry::start();
    let ips = loopback_ips(23, 2);
    let addrs = peer_addrs(&ips);
    let (node_peer, fake_addr) = (addrs[0], addrs[1]);
    // Three blobs the fake owns by the rendezvous rule; it lies about two
    // and does not know the third.
    let mut owned = HashMap::new();
    let mut order = Vec::new();
    for seed in 2300.. {
        let data = blob(1 << 20, seed);
        let d = sha256_digest(&data);
        if owner(&d, &addrs) == fake_addr {
            order.push(reg.put_blob_files(REPO, &data));
            owned.insert(d, data);
        }
        if owned.len() == 3 {
            break;
        }
    }
    let (a, b, unknown) = (order[0].clone(), order[1].clone(), order[2].clone());
    owned.remove(&unknown);
    let fake = rt.block_on(FakePeer::start(fake_addr, owned));
    let (_secret_dir, secret) = secret_file();
    let node = start_node(
        ips[0],
        node_peer,
        &peer_list(&addrs),
        &secret,
        &reg.url(),
        &[],
    );
    node.proxy.wait_learned_open();
    rt.block_on(async {
        wait_live(&[&node], 1).await;
        // A 404 from the owner: the upstream instead; the peer stays live.
        get_verified(&node.blob_url(REPO, &unknown), &unknown)
            .await
            .unwrap();
        assert_eq!(
            fake.blob_requests().len(),
            1,
            "the node asked the owner first"
        );
        wait_metric(&node, &fallbacks("error"), 1).await;
        assert_eq!(node.metric0("regproxy_peers_live").await, 1);

        let got = get_counting(node.blob_url(REPO, &a), Default::default()).await;
        match &got {
            Err(_) => {}
            Ok((st, _, _)) if *st != StatusCode::OK => {}
            Ok(_) => panic!("the first GET of {a} must not end as a whole 200 body: {got:?}"),
        }
        assert_eq!(
            fake.blob_requests().len(),
            2,
            "the node asked the owner (the fake) first"
        );
        wait_metric(&node, &fallbacks("bad_bytes"), 1).await;
        wait_metric(&node, "regproxy_peer_bad_total", 1).await;
        wait_live(&[&node], 0).await;

        get_verified(&node.blob_url(REPO, &a), &a).await.unwrap();
        get_verified(&node.blob_url(REPO, &b), &b).await.unwrap();
        assert_eq!(
            fake.blob_requests().len(),
            2,
            "a banned peer is not asked again, even for a blob it owns"
        );
        node.proxy.fills_done().await;
        for d in [&a, &b] {
            assert_eq!(
                reg.blob_gets_logged(d, 1).await,
                1,
                "{d} came from the upstream"
            );
            let cached = std::fs::read(node.proxy.cache_path(d)).unwrap();
            assert_eq!(
                &sha256_digest(&cached),
                d,
                "the cache holds the right bytes"
            );
        }
    });
}

#[test]
fn the_peer_port_refuses_without_the_secret_and_serves_only_content_by_digest() {
    let rt = runtime();
    let reg = Registry::start();
    // The second address is listed but nothing serves it: a peer that is
    // known and never live.
    let ips = loopback_ips(24, 2);
    let addrs = peer_addrs(&ips);
    let (_secret_dir, secret) = secret_file();
    let node = start_node(
        ips[0],
        addrs[0],
        &peer_list(&addrs),
        &secret,
        &reg.url(),
        &[],
    );
    let layer = blob(300 << 10, 2401);
    let cold = blob(200 << 10, 2402);
    let (manifest, mdigest) = rt.block_on(push_manifest(
        &reg.url(),
        REPO,
        "v1",
        br#"{"architecture":"amd64","os":"linux"}"#,
        &[&layer],
    ));
    let ldigest = sha256_digest(&layer);
    let cdigest = reg.put_blob_files(REPO, &cold);
    rt.block_on(async {
        // Through the API port: the tag, then the layer, into the cache.
        let api = node.url();
        let accept = [("accept", ACCEPT_MANIFESTS)];
        let (st, _, body) = send(
            Method::GET,
            &format!("{api}/v2/{REPO}/manifests/v1"),
            &accept,
        )
        .await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &manifest[..]));
        get_verified(&node.blob_url(REPO, &ldigest), &ldigest)
            .await
            .unwrap();
        node.proxy.fills_done().await;

        let p = node.peer_url();
        let blob_path = format!("/v2/{REPO}/blobs/{ldigest}");
        let manifest_path = format!("/v2/{REPO}/manifests/{mdigest}");
        let right = format!("Bearer {SECRET}");
        let wrong = format!("Bearer {WRONG_SECRET}");
        let prefix = format!("Bearer {}", &SECRET[..SECRET.len() - 1]);
        let longer = format!("Bearer {SECRET}0");
        let basic = format!("Basic {SECRET}");
        let refused: [(&str, Vec<(&str, &str)>); 5] = [
            ("no Authorization", vec![]),
            ("a wrong secret", vec![("authorization", wrong.as_str())]),
            (
                "the secret less its last byte",
                vec![("authorization", prefix.as_str())],
            ),
            (
                "the secret and a byte more",
                vec![("authorization", longer.as_str())],
            ),
            (
                "the secret as Basic",
                vec![("authorization", basic.as_str())],
            ),
        ];
        let mut unauthorized = 0;
        for (what, headers) in &refused {
            for path in ["/v2/", &blob_path, &manifest_path] {
                for method in [Method::GET, Method::HEAD] {
                    let (st, h, body) = send(method.clone(), &format!("{p}{path}"), headers).await;
                    unauthorized += 1;
                    assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path} with {what}");
                    let challenge = h
                        .get("www-authenticate")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    assert!(
                        challenge.starts_with("Bearer")
                            && challenge.contains("realm=\"regproxy-peers\""),
                        "{method} {path} with {what}: challenge {challenge:?}"
                    );
                    assert_eq!(
                        h.get("connection").map(|v| v.to_str().unwrap()),
                        Some("close"),
                        "{method} {path} with {what}: a refused peer connection is closed"
                    );
                    if method == Method::GET {
                        let e: serde_json::Value = serde_json::from_slice(&body)
                            .unwrap_or_else(|_| panic!("an OCI error body, not {body:?}"));
                        assert_eq!(e["errors"][0]["code"], "UNAUTHORIZED", "{path} with {what}");
                    }
                }
            }
        }

        // With the secret: liveness, content by digest (cached), ranges.
        let auth = [("authorization", right.as_str())];
        let (st, _, _) = send(Method::GET, &format!("{p}/v2/"), &auth).await;
        assert_eq!(st, StatusCode::OK, "GET /v2/ with the secret");
        let (st, h, body) = send(Method::GET, &format!("{p}{blob_path}"), &auth).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body), ldigest, "the cached layer, whole");
        assert_eq!(h["docker-content-digest"], ldigest.as_str());
        let (st, h, _) = send(Method::HEAD, &format!("{p}{blob_path}"), &auth).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(h["content-length"], layer.len().to_string().as_str());
        let ranged = [auth[0], ("range", "bytes=100-199")];
        let (st, _, body) = send(Method::GET, &format!("{p}{blob_path}"), &ranged).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT);
        assert_eq!(&body[..], &layer[100..200]);
        let (st, _, body) = send(Method::GET, &format!("{p}{manifest_path}"), &auth).await;
        assert_eq!(
            (st, &body[..]),
            (StatusCode::OK, &manifest[..]),
            "the manifest by digest"
        );

        // A blob not cached: HEAD says 404, GET fills it from the upstream.
        let cold_path = format!("/v2/{REPO}/blobs/{cdigest}");
        let (st, _, _) = send(Method::HEAD, &format!("{p}{cold_path}"), &auth).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "HEAD of a blob not cached");
        get_verified(&format!("{p}{cold_path}"), &cdigest)
            .await
            .expect_err("get_verified sends no secret, so it is refused");
        let (st, _, body) = send(Method::GET, &format!("{p}{cold_path}"), &auth).await;
        assert_eq!(st, StatusCode::OK, "GET of a blob not cached fills it");
        assert_eq!(sha256_digest(&body), cdigest);
        node.proxy.fills_done().await;
        assert_eq!(reg.blob_gets_logged(&cdigest, 1).await, 1);

        // Nothing else, even with the secret: no tags, no uploads, no
        // catalog, no tag lists, no deletes, and nothing sent upstream.
        // What the peer port might wrongly pass on, in the access log.
        let passed_on = || {
            reg.log()
                .lines()
                .filter(|l| {
                    [
                        "\"POST ",
                        "\"PUT ",
                        "\"DELETE ",
                        "_catalog",
                        "/tags/list",
                        "/manifests/v1 ",
                    ]
                    .iter()
                    .any(|n| l.contains(n))
                })
                .count()
        };
        let requests_before = passed_on();
        let not_served = [
            (Method::GET, format!("/v2/{REPO}/manifests/v1")),
            (Method::HEAD, format!("/v2/{REPO}/manifests/v1")),
            (Method::POST, format!("/v2/{REPO}/blobs/uploads/")),
            (Method::PUT, format!("/v2/{REPO}/manifests/v2")),
            (Method::DELETE, blob_path.clone()),
            (Method::GET, "/v2/_catalog".to_owned()),
            (Method::GET, format!("/v2/{REPO}/tags/list")),
            (Method::GET, "/metrics".to_owned()),
        ];
        for (method, path) in &not_served {
            let (st, _, _) = send(method.clone(), &format!("{p}{path}"), &auth).await;
            assert!(
                st == StatusCode::NOT_FOUND || st == StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} on the peer port with the secret: {st}"
            );
        }
        assert_eq!(
            passed_on(),
            requests_before,
            "none of those reached the upstream"
        );

        // The API port is as before: the secret is nothing to it, tags are
        // served there.
        for headers in [vec![], vec![auth[0]]] {
            let mut h = headers.clone();
            h.push(accept[0]);
            let (st, _, body) =
                send(Method::GET, &format!("{api}/v2/{REPO}/manifests/v1"), &h).await;
            assert_eq!((st, &body[..]), (StatusCode::OK, &manifest[..]));
            let (st, _, body) = send(Method::GET, &node.blob_url(REPO, &ldigest), &headers).await;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(sha256_digest(&body), ldigest);
        }

        assert!(node.metric0(&peer_requests("unauthorized")).await >= unauthorized);
        assert!(node.metric0(&peer_requests("hit")).await >= 3);
        assert!(node.metric0(&peer_requests("miss")).await >= 1);
        assert!(node.metric0(&peer_requests("not_found")).await >= 1);
        assert_eq!(node.metric0("regproxy_peers_known").await, 1);
        assert_eq!(node.metric0("regproxy_peers_live").await, 0);
    });
}

#[test]
fn dockerd_containerd_order_and_skopeo_on_three_nodes_fetch_each_blob_once() {
    let rt = runtime();
    let reg = Registry::start();
    let docker = Dockerd::start();
    let root = temp_dir("rootfs");
    std::fs::write(root.path().join("data.bin"), blob(6 << 20, 2501)).unwrap();
    std::fs::write(root.path().join("hello.txt"), b"hello from the upstream\n").unwrap();
    let id = docker.push_imported(root.path(), &format!("{}/{REPO}:v1", reg.addr));
    let (st, _, manifest) = rt.block_on(get(
        &format!("{}/v2/{REPO}/manifests/v1", reg.url()),
        &[("accept", ACCEPT_MANIFESTS)],
    ));
    assert_eq!(st, StatusCode::OK);
    let blobs = referenced(&manifest.unwrap());

    let c = Cluster::start(25, 3, &reg.url(), &[]);
    for n in &c.nodes {
        n.proxy.wait_learned_open();
    }
    rt.block_on(wait_live(&c.all(), 2));
    let out_dir = temp_dir("skopeo");
    let docker_ref = format!("{}/{REPO}:v1", c.nodes[0].proxy.addr);
    let skopeo_src = format!("docker://{}/{REPO}:v1", c.nodes[2].proxy.addr);
    let dest = format!("dir:{}", out_dir.path().join("img").display());
    let t = Instant::now();
    std::thread::scope(|s| {
        let dockerd = s.spawn(|| {
            let out = docker_cli(&docker)
                .args(["pull", &docker_ref])
                .output()
                .unwrap();
            succeeded(out, &format!("docker pull {docker_ref} through node 0"));
            docker.image_id(&docker_ref)
        });
        let skopeo = s.spawn(|| {
            let out = on_node(
                "skopeo",
                &[
                    "copy",
                    "--src-tls-verify=false",
                    "--insecure-policy",
                    &skopeo_src,
                    &dest,
                ],
            );
            succeeded(out, &format!("skopeo copy {skopeo_src} through node 2"));
        });
        let steps = rt.block_on(containerd_order_pull(&c.nodes[1].url(), REPO, "v1", None));
        assert!(
            all_ok(&steps),
            "containerd's order through node 1: {steps:?}"
        );
        assert_eq!(
            dockerd.join().unwrap(),
            id,
            "dockerd pulled the upstream's image"
        );
        skopeo.join().unwrap();
    });
    println!(
        "dockerd, containerd order, skopeo on 3 nodes: {:?}",
        t.elapsed()
    );
    for d in &blobs {
        let hex = d.strip_prefix("sha256:").unwrap();
        let copied = std::fs::read(out_dir.path().join("img").join(hex)).expect("skopeo wrote it");
        assert_eq!(&sha256_digest(&copied), d, "skopeo's copy of {d}");
    }
    rt.block_on(async {
        fills_done(&c.all()).await;
        for d in &blobs {
            assert_eq!(
                reg.blob_gets_logged(d, 1).await,
                1,
                "{d} crossed the uplink once for three clients on three nodes"
            );
        }
    });
}

#[test]
fn peers_from_a_dns_name_find_each_other_and_follow_the_answer_as_it_shrinks() {
    const NAME: &str = "regproxy-peers.test";
    let rt = runtime();
    let reg = Registry::start();
    let ips = loopback_ips(26, 3);
    let v4: Vec<Ipv4Addr> = ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v) => *v,
            IpAddr::V6(_) => unreachable!(),
        })
        .collect();
    let dns = rt.block_on(DnsServer::start(26, &format!("{NAME}."), v4.clone()));
    let port = free_port_on(&ips);
    let (_secret_dir, secret) = secret_file();
    let peers = format!("dns:{NAME}:{port}");
    let url = reg.url();
    let nodes: Vec<Node> = with_resolv_conf(dns.addr.ip(), || {
        ips.iter()
            .map(|ip| start_node(*ip, SocketAddr::new(*ip, port), &peers, &secret, &url, &[]))
            .collect()
    });
    for n in &nodes {
        n.proxy.wait_learned_open();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    rt.block_on(async {
        wait_live(&refs, 2).await;
        assert!(dns.queries() >= 3, "the nodes asked the test's name server");
        let digest = reg.put_blob_files(REPO, &blob(16 << 20, 2601));
        let urls: Vec<String> = nodes.iter().map(|n| n.blob_url(REPO, &digest)).collect();
        for (i, g) in Clients::start(&urls, 2).results().await.iter().enumerate() {
            assert!(verified(g, &digest), "client {i}: {g:?}");
        }
        fills_done(&refs).await;
        assert_eq!(
            reg.blob_gets_logged(&digest, 1).await,
            1,
            "one upstream GET"
        );

        // The name loses node 2: nodes 0 and 1 forget it within a few
        // refreshes; node 2 still knows both others. Pulls go on.
        dns.set(v4[..2].to_vec());
        let t = Instant::now();
        for n in &nodes[..2] {
            wait_for(
                || async { n.metric0("regproxy_peers_known").await == 1 },
                &format!("node {} knows one peer once the name drops node 2", n.peer),
            )
            .await;
        }
        println!(
            "nodes 0 and 1 dropped node 2 {:?} after the answer changed",
            t.elapsed()
        );
        let digest = reg.put_blob_files(REPO, &blob(16 << 20, 2602));
        let urls: Vec<String> = nodes.iter().map(|n| n.blob_url(REPO, &digest)).collect();
        for (i, g) in Clients::start(&urls, 2).results().await.iter().enumerate() {
            assert!(verified(g, &digest), "client {i} after the change: {g:?}");
        }
    });
}

#[test]
fn a_node_leaving_and_joining_during_pulls_fails_no_pull_of_the_others() {
    /// Pulls in each phase (before, while gone, after it is back).
    const PER_PHASE: u64 = 4;
    let rt = runtime();
    let reg = Arc::new(Registry::start());
    let mut c = Cluster::start(27, 3, &reg.url(), &[]);
    for n in &c.nodes {
        n.proxy.wait_learned_open();
    }
    rt.block_on(wait_live(&c.all(), 2));
    // Nodes 0 and 1 pull a new cold blob each round, both at once, until
    // told to stop; node 2 leaves (kill -9) and joins again meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let pulling = {
        let (reg, stop, rounds, failures) = (
            Arc::clone(&reg),
            Arc::clone(&stop),
            Arc::clone(&rounds),
            Arc::clone(&failures),
        );
        let bases = [c.nodes[0].url(), c.nodes[1].url()];
        rt.spawn(async move {
            let mut digests = Vec::new();
            for seed in 2700..3700 {
                if stop.load(SeqCst) {
                    break;
                }
                let d = reg.put_blob_files(REPO, &blob(2 << 20, seed));
                let urls = bases.each_ref().map(|b| format!("{b}/v2/{REPO}/blobs/{d}"));
                let (a, b) = tokio::join!(get_verified(&urls[0], &d), get_verified(&urls[1], &d));
                for r in [a, b] {
                    if let Err(why) = r {
                        failures.lock().unwrap().push(why);
                    }
                }
                digests.push(d);
                rounds.fetch_add(1, SeqCst);
            }
            digests
        })
    };
    let after = |n: u64| {
        let from = rounds.load(SeqCst);
        wait_blocking(
            || rounds.load(SeqCst) >= from + n,
            &format!("{n} more rounds of pulls"),
        );
    };
    after(PER_PHASE);
    c.nodes[2].kill();
    rt.block_on(wait_live(&[&c.nodes[0], &c.nodes[1]], 1));
    after(PER_PHASE);
    c.restart(2);
    rt.block_on(wait_live(&c.all(), 2));
    after(PER_PHASE);
    stop.store(true, SeqCst);
    let digests = rt.block_on(pulling).unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "pulls failed: {failures:#?}");
    rt.block_on(async {
        fills_done(&c.all()).await;
        let mut total = 0;
        for d in &digests {
            let gets = reg.blob_gets_logged(d, 1).await;
            assert!(gets <= 3, "{d} crossed the uplink {gets} times");
            total += gets;
        }
        println!("{} rounds, {total} upstream GETs", digests.len());
    });
}

#[test]
fn a_manifest_by_digest_crosses_the_uplink_once_for_three_nodes() {
    let rt = runtime();
    let reg = Registry::start();
    let c = Cluster::start(28, 3, &reg.url(), &[]);
    for n in &c.nodes {
        n.proxy.wait_learned_open();
    }
    let layer = blob(100 << 10, 2801);
    rt.block_on(async {
        wait_live(&c.all(), 2).await;
        let (manifest, digest) = push_manifest(&reg.url(), REPO, "v1", b"{}", &[&layer]).await;
        let owner = c.owner_of(&digest);
        // An asking node first (the owner fetches it for it), then the
        // others: the owner from its cache, the third from the owner's.
        let order = [(owner + 1) % 3, owner, (owner + 2) % 3];
        for i in order {
            let url = format!("{}/v2/{REPO}/manifests/{digest}", c.nodes[i].url());
            let (st, h, body) = send(Method::GET, &url, &[("accept", ACCEPT_MANIFESTS)]).await;
            assert_eq!(st, StatusCode::OK, "node {i}");
            assert_eq!(&body[..], &manifest[..], "node {i} serves the manifest");
            assert_eq!(h["docker-content-digest"], digest.as_str());
        }
        let needle = format!("/manifests/{digest} HTTP/1.1\"");
        let gets = reg
            .logged(1, "GETs of the manifest by digest", |l| {
                l.contains("\"GET /v2/") && l.contains(&needle)
            })
            .await;
        assert_eq!(gets, 1, "three nodes fetched the manifest upstream once");
        let received =
            c.nodes[order[0]].metric0(RECEIVED).await + c.nodes[order[2]].metric0(RECEIVED).await;
        assert!(
            received >= 2 * manifest.len() as u64,
            "both asking nodes got it from the owner"
        );
    });
}

#[test]
fn a_node_serves_a_private_blob_from_a_peer_only_to_clients_the_upstream_lets_in() {
    let rt = runtime();
    let (reg, _htpasswd) = private_registry();
    let c = Cluster::start(29, 3, &reg.url(), &[]);
    let cached = blob(1 << 20, 2901);
    let cold = blob(1 << 20, 2902);
    let x = reg.put_blob_files(REPO, &cached);
    let y = reg.put_blob_files(REPO, &cold);
    let (alice, bob) = (basic(ALICE), basic(BOB));
    let stranger = basic(("mallory", "guess"));
    rt.block_on(async {
        wait_live(&c.all(), 2).await;
        // Alice pulls X through its owner: it is cached there.
        let o = c.owner_of(&x);
        let asker = &c.nodes[(o + 1) % 3];
        let (st, _, body) = send(
            Method::GET,
            &c.nodes[o].blob_url(REPO, &x),
            &[("authorization", &alice)],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body), x);
        c.nodes[o].proxy.fills_done().await;

        // On another node, no one the upstream refuses gets it, although
        // the owner has it and would serve it to the node.
        for (who, headers) in [
            ("an anonymous client", vec![]),
            (
                "a wrong password",
                vec![("authorization", stranger.as_str())],
            ),
        ] {
            for n in &c.nodes {
                let (st, _, body) = send(Method::GET, &n.blob_url(REPO, &x), &headers).await;
                assert_eq!(st, StatusCode::UNAUTHORIZED, "{who} on node {}", n.peer);
                assert_ne!(sha256_digest(&body), x, "{who} did not get it");
            }
        }
        // Bob, whom the upstream lets in, gets it on the asking node, from
        // the owner: no second upstream GET.
        let (st, _, body) = send(
            Method::GET,
            &asker.blob_url(REPO, &x),
            &[("authorization", &bob)],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body), x);
        asker.proxy.fills_done().await;
        assert!(
            asker.metric0(RECEIVED).await >= cached.len() as u64,
            "from the owner"
        );
        assert_eq!(ok_gets(&reg, &x, 1).await, 1, "X crossed the uplink once");

        // Y is cached nowhere: its owner's anonymous fill is refused, so the
        // asking node fetches it itself with its client's credentials.
        let oy = c.owner_of(&y);
        let asker = &c.nodes[(oy + 1) % 3];
        let (st, _, body) = send(
            Method::GET,
            &asker.blob_url(REPO, &y),
            &[("authorization", &bob)],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body), y);
        asker.proxy.fills_done().await;
        assert!(
            c.nodes[oy].metric0(&peer_requests("not_found")).await >= 1,
            "the owner said 404"
        );
        assert_eq!(ok_gets(&reg, &y, 1).await, 1, "the asker's own GET");
    });
}

#[test]
fn a_silent_peer_is_given_up_before_its_head_and_mid_body_and_the_upstream_resumes() {
    const LEN: usize = 4 << 20;
    const HALF: usize = LEN / 2;
    let rt = runtime();
    let reg = Registry::start();
    let ips = loopback_ips(30, 2);
    let addrs = peer_addrs(&ips);
    let (node_peer, fake_addr) = (addrs[0], addrs[1]);
    let mut owned = Vec::new();
    for seed in 3000.. {
        let data = blob(LEN, seed);
        if owner(&sha256_digest(&data), &addrs) == fake_addr {
            owned.push((reg.put_blob_files(REPO, &data), data));
        }
        if owned.len() == 2 {
            break;
        }
    }
    let (a, b) = (owned[0].0.clone(), owned[1].0.clone());
    let stalls = [Stall::BeforeHead, Stall::After(HALF)];
    let blobs = owned
        .into_iter()
        .zip(stalls)
        .map(|((d, data), stall)| (d, (data, stall)))
        .collect();
    let fake = rt.block_on(StallingPeer::start(fake_addr, blobs));
    let (_secret_dir, secret) = secret_file();
    let node = start_node(
        ips[0],
        node_peer,
        &peer_list(&addrs),
        &secret,
        &reg.url(),
        // A silent owner that still answers its probes is waited on for
        // --upstream-timeout, as the owner waits on its own upstream.
        &["--peer-timeout", "1s", "--upstream-timeout", "3s"],
    );
    node.proxy.wait_learned_open();
    rt.block_on(async {
        // No head: the upstream instead.
        wait_live(&[&node], 1).await;
        let t = Instant::now();
        get_verified(&node.blob_url(REPO, &a), &a).await.unwrap();
        let took = t.elapsed();
        assert_eq!(fake.blob_gets(), 1, "the node asked the owner first");
        wait_metric(&node, &fallbacks("timeout"), 1).await;
        node.proxy.fills_done().await;
        assert_eq!(ok_gets(&reg, &a, 1).await, 1);
        println!("a head that never came: served from the upstream after {took:?}");

        // Half the body, then silence: the rest from the upstream, from
        // where the owner stopped.
        wait_live(&[&node], 1).await;
        let upstream_before = node.metric0(UPSTREAM_BYTES).await;
        let t = Instant::now();
        get_verified(&node.blob_url(REPO, &b), &b).await.unwrap();
        let took = t.elapsed();
        assert_eq!(fake.blob_gets(), 2, "the node asked the owner first");
        // A stall of a live peer is a timeout, not a break: it stays live.
        wait_metric(&node, &fallbacks("timeout"), 2).await;
        assert_eq!(node.metric0(&fallbacks("broken")).await, 0);
        node.proxy.fills_done().await;
        let from_upstream = node.metric0(UPSTREAM_BYTES).await - upstream_before;
        assert!(
            from_upstream <= (LEN - HALF) as u64 + PROBES,
            "the upstream sent only what the owner had not ({from_upstream} bytes of {LEN})"
        );
        assert_eq!(ranged_gets(&reg, &b).await, 1, "one resume with Range");
        assert_eq!(ok_gets(&reg, &b, 0).await, 0, "no GET of the whole blob");
        let cached = std::fs::read(node.proxy.cache_path(&b)).unwrap();
        assert_eq!(sha256_digest(&cached), b);
        println!("a body stalled at {HALF} of {LEN}: whole after {took:?}, {from_upstream} bytes from the upstream");
    });
}

#[test]
fn serve_refuses_peers_without_a_listener_or_a_usable_secret_in_one_line_and_shows_no_secret() {
    let dir = temp_dir("peer-flags");
    let file = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let good = file("good", &format!("{SECRET}\n"));
    let short = file("short", "short-secret\n");
    let spaced = file("spaced", "a secret with spaces in it 0123456789\n");
    let cache = dir.path().join("cache");
    let cases: [(&[&str], &str); 6] = [
        (&["--peer-listen", "127.0.31.1:5101"], "--peer-secret-file"),
        (&["--peer-secret-file", &good], "--peer-listen"),
        (
            &[
                "--peer-listen",
                "127.0.31.1:5101",
                "--peer-secret-file",
                &short,
            ],
            "--peer-secret-file",
        ),
        (
            &[
                "--peer-listen",
                "127.0.31.1:5101",
                "--peer-secret-file",
                &spaced,
            ],
            "--peer-secret-file",
        ),
        (
            &["--peer-listen", "0.0.0.0:5101", "--peer-secret-file", &good],
            "--peer-listen",
        ),
        (
            &[
                "--peer-listen",
                "127.0.31.1:5101",
                "--peer-secret-file",
                "/nonexistent/secret",
            ],
            "--peer-secret-file",
        ),
    ];
    for (args, names) in cases {
        let out = std::process::Command::new(regproxy_bin())
            .args([
                "serve",
                "--listen",
                "127.0.31.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--upstream", "http://127.0.0.1:1", "--cache-dir"])
            .arg(&cache)
            .args(["--peers", "127.0.31.2:5101"])
            .args(args)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "serve {args:?} exits 2: {said}");
        assert_eq!(
            said.trim_end().lines().count(),
            1,
            "one line for {args:?}: {said}"
        );
        assert!(
            said.contains(names),
            "{args:?}: the line names {names}: {said}"
        );
        for secret in ["short-secret", "a secret with spaces", SECRET] {
            assert!(
                !said.contains(secret),
                "{args:?}: the line shows no secret: {said}"
            );
        }
    }
}

#[test]
fn a_peer_that_announces_a_larger_blob_is_banned_once_the_upstream_contradicts_it() {
    const LEN: usize = 2 << 20;
    let rt = runtime();
    let reg = Registry::start();
    let (node, [_, fake_addr], _secret) = node_beside_a_fake(&reg, 32, &[]);
    let (d, data) = blob_owned_by(&reg, REPO, fake_addr, &[node.peer, fake_addr], (LEN, 3200));
    let lie = Stall::Oversized {
        extra: 64 << 20,
        n: LEN / 2,
    };
    let fake = rt.block_on(StallingPeer::start(
        fake_addr,
        HashMap::from([(d.clone(), (data, lie))]),
    ));
    node.proxy.wait_learned_open();
    rt.block_on(async {
        wait_live(&[&node], 1).await;
        let got = get_counting(node.blob_url(REPO, &d), Default::default()).await;
        match &got {
            Err(_) => {}
            Ok((st, _, _)) if *st != StatusCode::OK => {}
            Ok(_) => panic!("a fill sized by a lie must not end as a whole 200 body: {got:?}"),
        }
        assert_eq!(fake.blob_gets(), 1, "the node asked the owner first");
        // Its body broke off; the upstream's answer to the resume gives the
        // blob's real size: the peer lied.
        wait_metric(&node, &fallbacks("broken"), 1).await;
        wait_metric(&node, &fallbacks("bad_bytes"), 1).await;
        wait_metric(&node, "regproxy_peer_bad_total", 1).await;
        wait_live(&[&node], 0).await;
        node.proxy.fills_done().await;
        assert!(
            !node.proxy.cache_path(&d).exists(),
            "nothing is cached on a lie"
        );
        get_verified(&node.blob_url(REPO, &d), &d).await.unwrap();
        assert_eq!(fake.blob_gets(), 1, "a banned peer is not asked again");
        node.proxy.fills_done().await;
        let cached = std::fs::read(node.proxy.cache_path(&d)).unwrap();
        assert_eq!(sha256_digest(&cached), d);
    });
}

#[test]
fn the_peer_listener_refuses_past_its_cap_and_closes_silent_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    let reg = Registry::start();
    let extra = ["--max-connections", "2", "--peer-timeout", "1s"];
    let (node, _, (_dir, secret)) = node_beside_a_fake(&reg, 33, &extra);
    let addrs = [node.peer];
    let token = std::fs::read_to_string(&secret).unwrap();
    rt.block_on(async {
        // Two connections that never send a head take the listener's places.
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(tokio::net::TcpStream::connect(addrs[0]).await.unwrap());
        }
        // Past the cap: 503 at once, not a wait behind them.
        let mut third = tokio::net::TcpStream::connect(addrs[0]).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, third.read_to_end(&mut answer))
            .await
            .expect("the refusal comes at once")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        // The silent ones are closed after --peer-timeout (the listener's
        // head timeout), well before --header-read-timeout's 10 s.
        let t = Instant::now();
        for c in &mut silent {
            let mut rest = Vec::new();
            tokio::time::timeout(PATIENCE, c.read_to_end(&mut rest))
                .await
                .expect("a silent connection is closed")
                .ok();
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(8),
            "closed after --peer-timeout, not --header-read-timeout: {:?}",
            t.elapsed()
        );
        // Then a peer gets in.
        let mut c = tokio::net::TcpStream::connect(addrs[0]).await.unwrap();
        let req = format!(
            "GET /v2/ HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
            addrs[0],
            token.trim()
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    });
}

#[test]
fn a_live_peer_that_trickles_is_given_up_and_the_upstream_sends_the_rest() {
    const LEN: usize = 1 << 20;
    let rt = runtime();
    let reg = Registry::start();
    let extra = ["--peer-timeout", "1s", "--upstream-timeout", "2s"];
    let (node, [_, fake_addr], _secret) = node_beside_a_fake(&reg, 34, &extra);
    let (d, data) = blob_owned_by(&reg, REPO, fake_addr, &[node.peer, fake_addr], (LEN, 3400));
    let fake = rt.block_on(StallingPeer::start(
        fake_addr,
        HashMap::from([(d.clone(), (data, Stall::Trickle))]),
    ));
    node.proxy.wait_learned_open();
    rt.block_on(async {
        wait_live(&[&node], 1).await;
        get_verified(&node.blob_url(REPO, &d), &d).await.unwrap();
        assert_eq!(fake.blob_gets(), 1, "the node asked the owner first");
        wait_metric(&node, &fallbacks("timeout"), 1).await;
        assert_eq!(node.metric0(&fallbacks("broken")).await, 0);
        assert_eq!(
            node.metric0("regproxy_peers_live").await,
            1,
            "a slow peer is not a dead one"
        );
        node.proxy.fills_done().await;
        assert_eq!(
            ranged_gets(&reg, &d).await,
            1,
            "the rest with one Range GET"
        );
        let cached = std::fs::read(node.proxy.cache_path(&d)).unwrap();
        assert_eq!(sha256_digest(&cached), d);
    });
}

#[test]
fn a_range_from_a_peer_starts_no_fill_on_a_node_without_the_blob() {
    let rt = runtime();
    let reg = Registry::start();
    let (node, _, (_dir, secret)) = node_beside_a_fake(&reg, 35, &[]);
    let token = format!(
        "Bearer {}",
        std::fs::read_to_string(&secret).unwrap().trim()
    );
    let data = blob(1 << 20, 3500);
    let d = reg.put_blob_files(REPO, &data);
    let url = format!("{}/v2/{REPO}/blobs/{d}", node.peer_url());
    rt.block_on(async {
        // Peers ask with a range only to resume, and only from a node that
        // has the blob or fills it: a fill from byte 0 would cross the
        // uplink again while the asker waits.
        let auth = ("authorization", token.as_str());
        let (st, _, _) = send(Method::GET, &url, &[auth, ("range", "bytes=1000-")]).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        node.proxy.fills_done().await;
        assert_eq!(ok_gets(&reg, &d, 0).await, 0, "no fill was started");
        let (st, _, body) = send(Method::GET, &url, &[auth]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(sha256_digest(&body), d);
        let (st, _, body) = send(Method::GET, &url, &[auth, ("range", "bytes=1000-")]).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT, "cached now");
        assert_eq!(&body[..], &data[1000..]);
    });
}
