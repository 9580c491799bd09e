//! An htpasswd-protected upstream: `docker login` through the proxy works,
//! and content on the node's disk is never served to a client the upstream
//! would refuse. Credentials are never logged or written to disk.

mod support;

use std::process::Command;

use http::StatusCode;
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

/// A registry whose every request needs alice's password.
fn private_registry() -> (Registry, TempDir) {
    let dir = TempDir::new("htpasswd");
    let file = dir.path().join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbn", USER, PASSWORD])
        .output()
        .expect("htpasswd (apache2-utils) is installed");
    assert!(out.status.success());
    std::fs::write(&file, out.stdout).unwrap();
    let reg = Registry::start_with(&format!(
        "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
        file.display()
    ));
    (reg, dir)
}

#[test]
fn login_pull_and_no_cached_blob_for_anyone_the_upstream_refuses() {
    let (reg, _htpasswd) = private_registry();
    let cache = TempDir::new("cache");
    let proxy = Proxy::start(&reg.url(), cache.path(), &[]);
    let docker = Dockerd::start();

    let root = TempDir::new("rootfs");
    std::fs::write(root.path().join("secret.bin"), blob(1 << 20, 99)).unwrap();
    let upstream_ref = format!("{}/team/private:v1", reg.addr);
    docker.docker(&["login", "-u", USER, "-p", PASSWORD, &reg.addr.to_string()]);
    docker.sh(&format!(
        "tar c -C {} . | docker import - {upstream_ref}",
        root.path().display()
    ));
    docker.docker(&["push", &upstream_ref]);
    docker.docker(&["rmi", &upstream_ref]);

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
