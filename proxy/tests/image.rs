//! The image a cluster runs: `deploy/build-image.sh` builds it with a real
//! dockerd (a static binary in a `FROM scratch` image, nothing pulled), and
//! `docker run --network host` runs it in front of a real upstream, exactly
//! as the DaemonSet does; that dockerd then pulls through it by the
//! registry's cluster name.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::*;

/// Removes a container when the test ends, however it ends, before the
/// daemon goes (declare it after the `Dockerd`).
struct Container<'a> {
    docker: &'a Dockerd,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = Command::new("/usr/bin/docker")
            .args(["rm", "-f", &self.name])
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.docker.sock.display()),
            )
            .output();
    }
}

/// `GET path` over HTTP/1.0; the status code, or `None` when nothing answers.
fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = String::new();
    s.take(64).read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the proxy container `name` detached, with the arguments `args`
/// makes for a listen port and an admin address, and waits until it is
/// ready. The ports are picked free, but another process may bind one before
/// the container does: the container then exits saying so, and is run again
/// on other ports. Returns the listen port and the admin address.
fn run_proxy(
    docker: &Dockerd,
    name: &str,
    args: impl Fn(u16, SocketAddr) -> Vec<String>,
) -> (u16, SocketAddr) {
    for attempt in 1..=5 {
        let (port, admin_port) = (free_port(), free_port());
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        // It writes its ready file once it has bound both ports: only then
        // is whatever answers on them this container.
        let ready = temp_dir("ready");
        let mut run = vec!["run".to_owned(), "-d".to_owned(), "--name".to_owned()];
        run.push(name.to_owned());
        run.push("-v".to_owned());
        run.push(format!("{}:/ready", ready.path().display()));
        run.push("--env=REGPROXY_READY_FILE=/ready/ready.json".to_owned());
        run.extend(args(port, admin));
        docker.docker(&run.iter().map(String::as_str).collect::<Vec<_>>());
        let deadline = Instant::now() + PATIENCE;
        loop {
            if ready.path().join("ready.json").exists() {
                wait_ready(docker, name, admin);
                return (port, admin);
            }
            // Whether it runs first: the logs of a container that stopped are whole.
            let running = docker.docker(&["inspect", "-f", "{{.State.Running}}", name]);
            let logs = docker.sh(&format!("docker logs {name} 2>&1"));
            if running.trim() == "false" {
                if attempt < 5 && logs.contains("cannot listen") {
                    docker.docker(&["rm", "-f", name]);
                    break;
                }
                panic!("the container {name} exited before it listened; it logged:\n{logs}");
            }
            assert!(
                Instant::now() < deadline,
                "the container {name} should listen within {PATIENCE:?}; it logged:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("the container {name} found its ports taken 5 times in a row");
}

fn wait_ready(docker: &Dockerd, container: &str, admin: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if status_of(admin, "/readyz") == Some(200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the container should be ready on {admin} within {PATIENCE:?}; it logged:\n{}",
        docker.sh(&format!("docker logs {container} 2>&1"))
    );
}

/// Every path in the image's layers, from `docker save`.
fn image_files(docker: &Dockerd, tag: &str) -> Vec<String> {
    let dir = temp_dir("saved");
    docker.sh(&format!(
        "docker save {tag} | tar -x -C {}",
        dir.path().display()
    ));
    let layers = docker.sh(&format!(
        "cd {} && find . -name layer.tar",
        dir.path().display()
    ));
    let mut files = Vec::new();
    for layer in layers.lines() {
        let listing = docker.sh(&format!("tar -t -f {}/{layer}", dir.path().display()));
        files.extend(
            listing
                .lines()
                .map(|l| l.trim_start_matches("./").to_owned()),
        );
    }
    files.retain(|f| !f.is_empty() && !f.ends_with('/'));
    files.sort();
    files
}

#[test]
fn the_scratch_image_runs_with_host_network_and_a_node_pulls_through_it() {
    let docker = Dockerd::start();
    let reg = Registry::start();
    let tag = format!("regproxy:image-test-{}", std::process::id());

    // Build the image exactly as an admin does, with this dockerd.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&tag)
        .env("DOCKER_HOST", format!("unix://{}", docker.sock.display()))
        .env("DOCKER_CONFIG", docker.dir.path().join("client"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/build-image.sh should build the image; it said:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // FROM scratch: one layer holding the binary, the CA bundle, nsswitch.conf.
    assert_eq!(
        image_files(&docker, &tag),
        [
            "etc/nsswitch.conf",
            "etc/ssl/certs/ca-certificates.crt",
            "regproxy"
        ],
        "the image should hold nothing but regproxy and what it reads"
    );
    let version = docker.docker(&["run", "--rm", &tag, "--version"]);
    assert!(
        version.starts_with("regproxy "),
        "the entrypoint should be regproxy: {version}"
    );

    // An image in the upstream, made without any network.
    let root = temp_dir("rootfs");
    std::fs::create_dir_all(root.path().join("app")).unwrap();
    std::fs::write(root.path().join("app/data.bin"), blob(2 << 20, 7)).unwrap();
    let upstream_ref = format!("{}/team/image-test:v1", reg.addr);
    let id = docker.push_imported(root.path(), &upstream_ref);

    // The proxy in the image, on the host's network, as on a node: read-only
    // root, no capabilities, the cache on a host directory, and the upstream
    // named `localhost` so the static binary has to resolve it.
    let cache = temp_dir("image-cache");
    let name = format!("regproxy-image-test-{}", std::process::id());
    let container = Container {
        docker: &docker,
        name: name.clone(),
    };
    let (port, admin) = run_proxy(&docker, &name, |port, admin| {
        [
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "-v",
            &format!("{}:/var/lib/regproxy", cache.path().display()),
            &tag,
            "serve",
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--upstream=http://localhost:{}", reg.addr.port()),
            "--cache-dir=/var/lib/regproxy",
            &format!("--admin-listen={admin}"),
            "--log-format=json",
        ]
        .map(String::from)
        .to_vec()
    });

    let node_ref = format!("{REGISTRY_NAME}:{port}/team/image-test:v1");
    docker.docker(&["pull", &node_ref]);
    assert_eq!(
        docker.image_id(&node_ref),
        id,
        "the image pulled through the containerised proxy should be the upstream's"
    );
    // The pull is done once the bytes are verified: wait for the proxy's
    // commits and the upstream's access log before counting.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream_gets = rt.block_on(upstream_settled(admin, &reg));
    assert!(
        upstream_gets >= 2,
        "the first pull should have fetched config and layer upstream"
    );
    docker.docker(&["rmi", &node_ref]);
    docker.docker(&["pull", &node_ref]);
    assert_eq!(docker.image_id(&node_ref), id);
    assert_eq!(
        rt.block_on(upstream_settled(admin, &reg)),
        upstream_gets,
        "the second pull should be served from the container's cache on the host directory"
    );
    drop(container);

    // In the container /etc/hosts is the "node's", where the registry name is
    // the proxy itself: pointed at that name, the proxy must refuse to start.
    let looped = format!("regproxy-image-loop-{}", std::process::id());
    let _looped_container = Container {
        docker: &docker,
        name: looped.clone(),
    };
    let loop_port = free_port();
    let out = Command::new("timeout")
        .args([
            "60",
            "/usr/bin/docker",
            "run",
            "--name",
            &looped,
            "--network",
            "host",
            "--read-only",
        ])
        .arg("-v")
        .arg(format!("{}:/var/lib/regproxy", cache.path().display()))
        .args([
            &tag,
            "serve",
            &format!("--listen=127.0.0.1:{loop_port}"),
            &format!("--upstream=http://{REGISTRY_NAME}:{loop_port}"),
            "--cache-dir=/var/lib/regproxy",
        ])
        .env("DOCKER_HOST", format!("unix://{}", docker.sock.display()))
        .env("DOCKER_CONFIG", docker.dir.path().join("client"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "a proxy whose upstream is itself should exit at once, not serve: {said}"
    );
    assert!(
        said.contains("loop"),
        "the refusal should say it is a loop: {said}"
    );

    // An https upstream: the same storage served over TLS by a certificate
    // from a CA of our own, handed to the container with --upstream-ca.
    let tls = TlsRegistry::start(&reg.dir.path().join("data"));
    let https_cache = temp_dir("image-cache-https");
    let name = format!("regproxy-image-https-{}", std::process::id());
    let _container = Container {
        docker: &docker,
        name: name.clone(),
    };
    let (port, _) = run_proxy(&docker, &name, |port, admin| {
        [
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "-v",
            &format!("{}:/var/lib/regproxy", https_cache.path().display()),
            "-v",
            &format!("{}:/certs/ca.pem:ro", tls.ca.display()),
            &tag,
            "serve",
            &format!("--listen=127.0.0.1:{port}"),
            &format!("--upstream=https://localhost:{}", tls.port),
            "--upstream-ca=/certs/ca.pem",
            "--cache-dir=/var/lib/regproxy",
            &format!("--admin-listen={admin}"),
        ]
        .map(String::from)
        .to_vec()
    });
    docker.docker(&["rmi", &node_ref]);
    let node_ref = format!("{REGISTRY_NAME}:{port}/team/image-test:v1");
    docker.docker(&["pull", &node_ref]);
    assert_eq!(
        docker.image_id(&node_ref),
        id,
        "the image pulled through the containerised proxy from an https upstream should be the upstream's"
    );
}

/// Debian's `docker-registry` over TLS on loopback, reading `storage`, with a
/// certificate for `localhost` signed by a CA made here with `openssl`.
struct TlsRegistry {
    port: u16,
    ca: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl TlsRegistry {
    fn start(storage: &Path) -> TlsRegistry {
        let dir = temp_dir("tls-upstream");
        let script = r#"set -e
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=regproxy-test-ca -keyout ca.key -out ca.pem
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out req.pem
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
            openssl x509 -req -in req.pem -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out cert.pem"#;
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl should make the test certificates: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The port is picked free, but another process may bind it first:
        // then the registry says so, and it is started on another port.
        for attempt in 1..=5 {
            let port = free_port();
            let d = dir.path().display();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {d}/cert.pem\n    key: {d}/key.pem\n",
                    storage.display()
                ),
            )
            .unwrap();
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("docker-registry is installed (scripts/deps.sh)");
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            match wait_listening(&mut child, &log_path, 0, addr) {
                Ok(()) => {
                    return TlsRegistry {
                        port,
                        ca: dir.path().join("ca.pem"),
                        child,
                        _dir: dir,
                    }
                }
                Err(NotListening::PortTaken) if attempt < 5 => continue,
                Err(NotListening::PortTaken) => {}
                Err(NotListening::Failed(why)) => panic!("the TLS registry: {why}"),
            }
        }
        panic!("the TLS registry found its port taken 5 times in a row")
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
