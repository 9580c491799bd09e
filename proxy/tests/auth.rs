//! An htpasswd-protected upstream: `docker login` through the proxy works,
//! and content on the node's disk is never served to a client the upstream
//! would refuse. Credentials are never logged or written to disk.

mod support;

use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

fn basic(user: &str, pw: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("printf '%s' '{user}:{pw}' | base64 -w0")])
        .output()
        .unwrap();
    format!("Basic {}", String::from_utf8(out.stdout).unwrap())
}

/// Bob: another user of the same registry, who never pulls before a test
/// asks for cached content with his credentials.
const BOB: (&str, &str) = ("bob", "bobs-pw");

/// A registry whose every request needs alice's (or bob's) password.
fn private_registry() -> (Registry, TempDir) {
    Registry::start_private(&[(USER, PASSWORD), BOB])
}

#[test]
fn login_pull_and_no_cached_blob_for_anyone_the_upstream_refuses() {
    let (reg, _htpasswd) = private_registry();
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let docker = Dockerd::start();

    let root = temp_dir("rootfs");
    std::fs::write(root.path().join("secret.bin"), blob(1 << 20, 99)).unwrap();
    let upstream_ref = format!("{}/team/private:v1", reg.addr);
    docker.docker(&["login", "-u", USER, "-p", PASSWORD, &reg.addr.to_string()]);
    docker.push_imported(root.path(), &upstream_ref);

    let host = format!("{REGISTRY_NAME}:{}", proxy.addr.port());
    let image = format!("{host}/team/private:v1");
    let anonymous = Command::new("/usr/bin/docker")
        .args(["pull", &image])
        .env("DOCKER_HOST", format!("unix://{}", docker.sock.display()))
        .env("DOCKER_CONFIG", docker.dir.path().join("client"))
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "an anonymous pull of a private image fails"
    );

    let login = docker.docker(&["login", "-u", USER, "-p", PASSWORD, &host]);
    assert!(
        login.contains("Login Succeeded"),
        "docker login through the proxy works: {login}"
    );
    docker.docker(&["pull", &image]);

    // The layer is on the node's disk now; ask for it as others would.
    let manifest = docker.docker(&[
        "image",
        "inspect",
        "-f",
        "{{index .RootFS.Layers 0}}",
        &image,
    ]);
    assert!(manifest.starts_with("sha256:"));
    // The pull ends when the bytes are verified; wait for the proxy's
    // commits and for the upstream to have logged its GETs.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream_gets_before = rt.block_on(proxy.settled(&reg));
    let layers: Vec<String> = std::fs::read_dir(cache.path().join("sha256"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".type"))
        .collect();
    assert!(!layers.is_empty(), "the pull filled the node cache");
    for hex in &layers {
        let url = format!("{}/v2/team/private/blobs/sha256:{hex}", proxy.url());
        let (st, h, _) = rt.block_on(get(&url, &[]));
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "an anonymous client gets 401 for content on disk"
        );
        assert!(
            h["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("test-realm"),
            "with the upstream's challenge"
        );
        let (st, _, _) = rt.block_on(get(&url, &[("authorization", &basic(USER, "wrong"))]));
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "a wrong password gets 401 for content on disk"
        );
        let (st, _, _) = rt.block_on(get(&url, &[("authorization", &basic("mallory", PASSWORD))]));
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "another user's guess gets 401"
        );
        let (st, _, body) = rt.block_on(get(&url, &[("authorization", &basic(USER, PASSWORD))]));
        assert_eq!(
            st,
            StatusCode::OK,
            "the right password gets the cached blob"
        );
        assert_eq!(sha256_digest(&body.unwrap()), format!("sha256:{hex}"));
        let other = format!("{}/v2/team/other/blobs/sha256:{hex}", proxy.url());
        let (st, _, _) = rt.block_on(get(&other, &[("authorization", &basic(USER, PASSWORD))]));
        assert_eq!(
            st,
            StatusCode::NOT_FOUND,
            "cached bytes are not served through a repository the upstream says does not hold them"
        );
    }

    assert_eq!(
        rt.block_on(proxy.settled(&reg)),
        upstream_gets_before,
        "the checks were HEADs; the bytes came from the node"
    );
    assert!(rt.block_on(proxy.metric("regproxy_auth_denied_total")) >= 3);

    // Tags too: a cached tag is not resolved for an anonymous client.
    let (st, _, _) = rt.block_on(get(
        &format!("{}/v2/team/private/manifests/v1", proxy.url()),
        &[],
    ));
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    // Credentials are never logged nor written to disk.
    let b64 = basic(USER, PASSWORD);
    let b64 = b64.trim_start_matches("Basic ");
    let logs = proxy.logs();
    assert!(
        !logs.contains(PASSWORD) && !logs.contains(b64),
        "no credential in the logs"
    );
    let out = Command::new("grep")
        .args(["-rlF", "-e", PASSWORD, "-e", b64])
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "no credential in the cache dir: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Pushes `repo:v1`, a config and one layer, as alice; returns the layer.
fn push_private(rt: &tokio::runtime::Runtime, reg: &Registry, repo: &str, seed: u64) -> Vec<u8> {
    let alice = basic(USER, PASSWORD);
    let layer = blob(200 << 10, seed);
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    rt.block_on(push_manifest_as(
        &reg.url(),
        &[("authorization", &alice)],
        repo,
        "v1",
        config.as_bytes(),
        &[&layer],
    ));
    layer
}

/// Alice pulls `repo:v1` through `proxy` in containerd's order; every step
/// must answer 200 with the right bytes.
fn alice_pulls(rt: &tokio::runtime::Runtime, proxy: &Proxy, repo: &str, what: &str) -> Vec<Step> {
    let alice = basic(USER, PASSWORD);
    let steps = rt.block_on(containerd_order_pull(
        &proxy.url(),
        repo,
        "v1",
        Some(&alice),
    ));
    assert!(all_ok(&steps), "{what}: {steps:?}");
    steps
}

async fn status(method: Method, url: &str, auth: &str) -> StatusCode {
    request(method, url, &[("authorization", auth)], Default::default())
        .await
        .0
}

#[test]
fn a_yes_for_one_repository_opens_no_other_repositorys_digests_online_or_offline() {
    let (mut reg, _htpasswd) = private_registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secret = push_private(&rt, &reg, "private/app", 1);
    push_private(&rt, &reg, "other/app", 2);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let alice = basic(USER, PASSWORD);

    let steps = alice_pulls(&rt, &proxy, "private/app", "alice pulls private/app");
    let manifest = steps[1].what.rsplit(' ').next().unwrap().to_owned();
    alice_pulls(&rt, &proxy, "other/app", "alice pulls other/app");

    let secret_blob = format!(
        "{}/v2/other/app/blobs/{}",
        proxy.url(),
        sha256_digest(&secret)
    );
    let secret_manifest = format!("{}/v2/other/app/manifests/{manifest}", proxy.url());
    // The access log's line for a GET comes after its bytes went out.
    let gets_before = rt.block_on(reg.logged(4, "blob GETs of the two pulls", |l| {
        l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")
    }));
    for upstream in ["up", "down"] {
        for m in [Method::GET, Method::HEAD] {
            assert_eq!(
                rt.block_on(status(m.clone(), &secret_blob, &alice)),
                StatusCode::NOT_FOUND,
                "upstream {upstream}: {m} of private/app's layer through other/app is 404, \
                 although alice may read other/app and the layer is on the node"
            );
        }
        assert_eq!(
            rt.block_on(status(Method::GET, &secret_manifest, &alice)),
            StatusCode::NOT_FOUND,
            "upstream {upstream}: private/app's manifest through other/app is 404"
        );
        reg.stop();
    }
    assert_eq!(
        reg.all_blob_gets(),
        gets_before,
        "the checks were HEADs, never downloads"
    );
    alice_pulls(
        &rt,
        &proxy,
        "private/app",
        "with the upstream down, what alice was allowed before is still served",
    );
}

#[test]
fn an_allowed_client_pulls_after_a_restart_during_an_outage_with_remember_allowed() {
    let (mut reg, _htpasswd) = private_registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    push_private(&rt, &reg, "private/app", 3);
    let cache = temp_dir("cache");
    let remember = ["--remember-allowed", "1h"];
    let mut proxy = Proxy::start(&reg.url(), cache.path(), &remember);
    let alice = basic(USER, PASSWORD);
    alice_pulls(&rt, &proxy, "private/app", "alice pulls");
    let allowed = cache.path().join("allowed.json");
    wait_blocking(
        || {
            std::fs::read(&allowed).is_ok_and(|b| {
                serde_json::from_slice::<serde_json::Value>(&b)
                    .is_ok_and(|v| v["allowed"].as_array().is_some_and(|a| a.len() >= 4))
            })
        },
        "the yeses for alice (credential, manifest, config, layer) are saved in allowed.json",
    );
    proxy.signal("-TERM");
    assert!(proxy.wait_exit(Duration::from_secs(30)));
    reg.stop();

    let proxy = Proxy::start(&reg.url(), cache.path(), &remember);
    alice_pulls(
        &rt,
        &proxy,
        "private/app",
        "after a restart during the outage, alice still pulls what she was allowed",
    );
    for (who, cred) in [
        ("a wrong password", Some(basic(USER, "wrong"))),
        ("bob, never seen allowed", Some(basic(BOB.0, BOB.1))),
        ("an anonymous client", None),
    ] {
        let steps = rt.block_on(containerd_order_pull(
            &proxy.url(),
            "private/app",
            "v1",
            cred.as_deref(),
        ));
        assert_eq!(
            steps[0].status,
            StatusCode::UNAUTHORIZED,
            "{who} gets 401 offline: {steps:?}"
        );
        let (_, h, _) = rt.block_on(request(
            Method::GET,
            &format!("{}/v2/private/app/manifests/v1", proxy.url()),
            &cred
                .as_deref()
                .map(|c| vec![("authorization", c)])
                .unwrap_or_default(),
            Default::default(),
        ));
        assert!(
            h.contains_key("www-authenticate"),
            "{who}'s 401 carries a challenge"
        );
    }
    let mut proxy = proxy;
    proxy.signal("-TERM");
    assert!(proxy.wait_exit(Duration::from_secs(30)));

    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let steps = rt.block_on(containerd_order_pull(
        &proxy.url(),
        "private/app",
        "v1",
        Some(&alice),
    ));
    assert_eq!(
        steps[0].status,
        StatusCode::UNAUTHORIZED,
        "without --remember-allowed nothing of alice's survives a restart: {steps:?}"
    );
    assert!(!allowed.exists(), "and allowed.json is removed");
}

#[test]
fn the_authorization_check_never_forwards_a_clients_range() {
    let (reg, _htpasswd) = private_registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = push_private(&rt, &reg, "private/app", 4);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    alice_pulls(&rt, &proxy, "private/app", "alice pulls");

    // Bob has not been allowed anything yet: his request is checked upstream.
    let bob = basic(BOB.0, BOB.1);
    let url = format!(
        "{}/v2/private/app/blobs/{}",
        proxy.url(),
        sha256_digest(&layer)
    );
    let past_end = format!("bytes={}-", layer.len() + 10);
    let (st, h, _) = rt.block_on(get(&url, &[("authorization", &bob), ("range", &past_end)]));
    assert_eq!(
        st,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "an unsatisfiable range gets 416 from the node, not the check's answer"
    );
    assert_eq!(
        h["content-range"],
        format!("bytes */{}", layer.len()).as_str()
    );
    let (st, _, body) = rt.block_on(get(
        &url,
        &[("authorization", &bob), ("range", "bytes=0-9")],
    ));
    assert_eq!(st, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&body.unwrap()[..], &layer[..10]);
}

/// nginx in front of the registry, answering 404 to every request without
/// credentials, as registries that hide private repositories do.
struct Hiding {
    url: String,
    _dir: TempDir,
    child: std::process::Child,
}

impl Hiding {
    fn start(registry: &Registry) -> Hiding {
        let dir = temp_dir("hiding");
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n \
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n \
             scgi_temp_path {d}/scgi;\n server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   \
             if ($http_authorization = \"\") {{ return 404 '{{\"errors\":[{{\"code\":\"NAME_UNKNOWN\"}}]}}'; }}\n   \
             proxy_pass http://{};\n  }}\n }}\n}}\n",
            registry.addr
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("nginx is installed (scripts/deps.sh)");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_blocking(
            || {
                assert!(child.try_wait().unwrap().is_none(), "nginx exited");
                std::net::TcpStream::connect(addr).is_ok()
            },
            "nginx listens",
        );
        Hiding {
            url: format!("http://{addr}"),
            _dir: dir,
            child,
        }
    }
}

impl Drop for Hiding {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_404_for_a_tag_from_a_client_the_upstream_does_not_authorize_keeps_the_stale_entry() {
    let (reg, _htpasswd) = private_registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    push_private(&rt, &reg, "private/app", 5);
    let mut hiding = Hiding::start(&reg);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&hiding.url, cache.path(), &["--tag-ttl", "0s"]);
    alice_pulls(
        &rt,
        &proxy,
        "private/app",
        "alice pulls through the hiding upstream",
    );

    let tag = format!("{}/v2/private/app/manifests/v1", proxy.url());
    let (st, _, _) = rt.block_on(request(
        Method::HEAD,
        &tag,
        &[("accept", ACCEPT_MANIFESTS)],
        Default::default(),
    ));
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "an anonymous client gets the upstream's 404"
    );
    assert!(
        std::fs::read_to_string(cache.path().join("state.json"))
            .unwrap()
            .contains("\"v1\""),
        "the node keeps the tag: that 404 was about the client, not the tag"
    );

    let _ = hiding.child.kill();
    let _ = hiding.child.wait();
    alice_pulls(
        &rt,
        &proxy,
        "private/app",
        "with the upstream down, alice still gets the tag from the node",
    );
}
