//! Container runtimes of the test's own: `dockerd` and `containerd`, each in
//! a temp dir, and `on_node` for a client that must see the node's
//! `/etc/hosts`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{succeeded, temp_dir, TempDir, PATIENCE, REGISTRY_NAME};

/// A `dockerd` of its own (vfs storage, no networking of its own), in a
/// private mount namespace whose `/etc/hosts` maps the registry name to
/// loopback, exactly as the node set-up does.
pub struct Dockerd {
    pub dir: TempDir,
    pub sock: PathBuf,
    child: Child,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        let dir = temp_dir("dockerd");
        let d = dir.path();
        let hosts = d.join("hosts");
        let mut f = std::fs::File::create(&hosts).unwrap();
        writeln!(
            f,
            "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 {REGISTRY_NAME}"
        )
        .unwrap();
        let sock = d.join("docker.sock");
        let script = format!(
            "mount --bind {hosts} /etc/hosts && exec dockerd --data-root {d}/data --exec-root {d}/exec --pidfile {d}/docker.pid \
             -H unix://{sock} --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs --containerd-namespace regproxy-test-{pid} \
             --containerd-plugins-namespace regproxy-test-plugins-{pid}",
            hosts = hosts.display(),
            d = d.display(),
            sock = sock.display(),
            pid = std::process::id(),
        );
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare and dockerd are installed");
        let deadline = Instant::now() + 2 * PATIENCE;
        loop {
            let dk = Dockerd::cli_at(&sock).arg("version").output().unwrap();
            if dk.status.success() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "dockerd exited with {st}:\n{}",
                    std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up:\n{}",
                std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Dockerd { dir, sock, child }
    }

    fn cli_at(sock: &Path) -> Command {
        // Debian's client, matched to Debian's dockerd.
        let mut c = Command::new("/usr/bin/docker");
        c.env("DOCKER_HOST", format!("unix://{}", sock.display()));
        c.env("DOCKER_CONFIG", sock.parent().unwrap().join("client"));
        c
    }

    /// Runs `docker args...`; panics with its output unless it succeeds.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Dockerd::cli_at(&self.sock).args(args).output().unwrap();
        succeeded(out, &format!("docker {args:?}"))
    }

    /// Runs `sh -c script` with `DOCKER_HOST` set to this daemon.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("sh")
            .args(["-c", script])
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        succeeded(out, script)
    }

    /// Makes an image of the files in `rootfs` without any network
    /// (`docker import`), pushes it as `upstream_ref`, and removes it
    /// locally again: its id, for comparing what a pull gives back.
    pub fn push_imported(&self, rootfs: &Path, upstream_ref: &str) -> String {
        self.sh(&format!(
            "tar c -C {} . | docker import - {upstream_ref}",
            rootfs.display()
        ));
        self.docker(&["push", upstream_ref]);
        let id = self.image_id(upstream_ref);
        self.docker(&["rmi", upstream_ref]);
        id
    }

    pub fn image_id(&self, image: &str) -> String {
        self.docker(&["image", "inspect", "-f", "{{.Id}}", image])
            .trim()
            .to_owned()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // vfs layers are plain directories; containerd may hold mounts under exec-root.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("exec"))
            .status();
    }
}

/// A containerd of its own: sockets, root and state in a temp dir, no CRI.
pub struct Containerd {
    pub dir: TempDir,
    pub sock: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn start() -> Containerd {
        let dir = temp_dir("containerd");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let sock = dir.path().join("containerd.sock");
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&sock)
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (scripts/deps.sh)");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .arg("version")
                .output()
                .unwrap();
            if v.status.success() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("containerd exited with {st}");
            }
            assert!(
                Instant::now() < deadline,
                "containerd should answer within {PATIENCE:?}:\n{}",
                std::fs::read_to_string(dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Containerd { dir, sock, child }
    }

    /// `ctr ARGS` in a mount namespace whose `/etc/hosts` maps the registry
    /// name to loopback, as on a node: whatever containerd tries, it stays on
    /// this machine.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let sock = self.sock.display().to_string();
        let mut all = vec!["--address", sock.as_str()];
        all.extend_from_slice(args);
        on_node("ctr", &all)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args...` in a mount namespace whose `/etc/hosts` maps the
/// registry name to loopback, as a node's does.
pub fn on_node(program: &str, args: &[&str]) -> Output {
    let dir = temp_dir("node-hosts");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {REGISTRY_NAME}\n"),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec timeout 120 \"$0\" \"$@\"",
        hosts.display()
    );
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            program,
        ])
        .args(args)
        .output()
        .unwrap()
}
