//! Debian's `docker-registry` (Distribution 2.8) as the upstream, on a
//! loopback port, its storage and access log in a temp dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, sha256_digest, temp_dir, wait_until, TempDir, PATIENCE};

/// Why a started registry is not serving.
pub enum NotListening {
    /// Another process took the port between `free_port` and the bind.
    PortTaken,
    Failed(String),
}

/// Waits for a `docker-registry` started with its log going to `log` to say
/// that it listens on `addr` (it logs that after the bind): the line is
/// looked for after byte `from`, where this start's output begins.
pub fn wait_listening(
    child: &mut Child,
    log: &Path,
    from: usize,
    addr: SocketAddr,
) -> Result<(), NotListening> {
    let needle = format!("listening on {addr}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = std::fs::read(log).unwrap_or_default();
        let out = String::from_utf8_lossy(out.get(from..).unwrap_or_default());
        if out.contains(&needle) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let out = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()[from..])
                .into_owned();
            return Err(if out.contains("address already in use") {
                NotListening::PortTaken
            } else {
                NotListening::Failed(format!(
                    "docker-registry exited with {st} before listening on {addr}:\n{out}"
                ))
            });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NotListening::Failed(format!(
                "docker-registry did not listen on {addr} within {PATIENCE:?}:\n{out}"
            )));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Debian's `docker-registry`, filesystem storage in a temp dir, access log on.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: TempDir,
    child: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    scheme: &'static str,
    /// The network namespace it runs in, if not the root one.
    netns: Option<String>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with("")
    }

    /// `extra` is YAML appended at the top level of the config.
    pub fn start_with(extra: &str) -> Registry {
        Registry::start_config(extra, "", "http")
    }

    /// A registry whose every request needs one of `users`' passwords
    /// (htpasswd auth), and the dir of its htpasswd file (keep it alive).
    pub fn start_private(users: &[(&str, &str)]) -> (Registry, TempDir) {
        let dir = temp_dir("htpasswd");
        let file = dir.path().join("htpasswd");
        let mut lines = Vec::new();
        for (user, pw) in users {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pw])
                .output()
                .expect("htpasswd (apache2-utils) is installed");
            assert!(out.status.success(), "htpasswd {user}: {out:?}");
            lines.extend_from_slice(out.stdout.trim_ascii_end());
            lines.push(b'\n');
        }
        std::fs::write(&file, lines).unwrap();
        let reg = Registry::start_with(&format!(
            "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
            file.display()
        ));
        (reg, dir)
    }

    /// Serves HTTPS with `cert` and `key` (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
        Registry::start_config("", &tls, "https")
    }

    fn start_config(extra: &str, http_extra: &str, scheme: &'static str) -> Registry {
        let dir = temp_dir("upstream");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("data");
        let log = dir.path().join("registry.log");
        let mut r = Registry {
            addr: "127.0.0.1:0".parse().unwrap(),
            dir,
            child: None,
            log,
            config,
            scheme,
            netns: None,
        };
        // The port is free when picked, but another process may bind it
        // before the registry does: then the registry says so, and it is
        // started again on another port.
        for attempt in 1.. {
            r.addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            std::fs::write(
                &r.config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}\n{http_extra}{extra}",
                    storage.display(),
                    r.addr
                ),
            )
            .unwrap();
            match r.spawn() {
                Ok(()) => break,
                Err(NotListening::PortTaken) if attempt < 5 => continue,
                Err(NotListening::PortTaken) => {
                    panic!("docker-registry found its port taken 5 times in a row")
                }
                Err(NotListening::Failed(why)) => panic!("{why}"),
            }
        }
        r
    }

    /// A registry run inside `ns`, listening on the namespace's end of its
    /// link (port 5000: nothing else listens in a namespace of the test's
    /// own), so that what it sends crosses the link.
    pub fn start_in(ns: &super::netns::Netns) -> Registry {
        let dir = temp_dir("upstream");
        let config = dir.path().join("config.yml");
        let addr = SocketAddr::from((ns.ns_ip, 5000));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display(),
            ),
        )
        .unwrap();
        let mut r = Registry {
            addr,
            log: dir.path().join("registry.log"),
            dir,
            child: None,
            config,
            scheme: "http",
            netns: Some(ns.name.clone()),
        };
        r.restart();
        r
    }

    /// Starts the registry (again) on the same address and storage.
    pub fn restart(&mut self) {
        match self.spawn() {
            Ok(()) => {}
            Err(NotListening::PortTaken) => {
                panic!(
                    "docker-registry could not listen on {} again: the port was taken meanwhile",
                    self.addr
                )
            }
            Err(NotListening::Failed(why)) => panic!("{why}"),
        }
    }

    fn spawn(&mut self) -> Result<(), NotListening> {
        assert!(self.child.is_none(), "registry is already running");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let from = out.metadata().unwrap().len() as usize;
        // `ip netns exec` execs the program: the child's pid is the registry's.
        let mut cmd = match &self.netns {
            None => Command::new("docker-registry"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
        };
        let mut child = cmd
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("docker-registry is installed (scripts/deps.sh)");
        wait_listening(&mut child, &self.log, from, self.addr)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Everything the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `GET`s for blob `digest` the registry's access log shows.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\"");
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&needle))
            .count()
    }

    /// How many `GET`s of any blob the access log shows.
    pub fn all_blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    /// Stores `data` as a blob of `repo` the way the registry's filesystem
    /// driver lays out a pushed blob (the content, and the repository's link
    /// to it): the same as a push, without sending the bytes through HTTP.
    /// Returns its digest.
    pub fn put_blob_files(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let hex = digest.strip_prefix("sha256:").unwrap();
        let data_path = self.blob_data_path(&digest);
        std::fs::create_dir_all(data_path.parent().unwrap()).unwrap();
        std::fs::write(&data_path, data).unwrap();
        let link = self
            .dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex);
        std::fs::create_dir_all(&link).unwrap();
        std::fs::write(link.join("link"), &digest).unwrap();
        digest
    }

    /// How many access log lines `is_it` picks, once there are at least
    /// `expected`. The registry writes a request's line after its response
    /// went out, so whoever sent the request (the proxy, and so the test's
    /// client) can be done with the bytes before the line is there: a count
    /// taken right away can miss it. Returns the count (then compared with
    /// `expected` by the caller), so that one too many still shows.
    pub async fn logged(&self, expected: usize, what: &str, is_it: impl Fn(&str) -> bool) -> usize {
        let count = || self.log().lines().filter(|l| is_it(l)).count();
        wait_until(
            || count() >= expected,
            &format!("the upstream's access log shows {expected} {what}"),
        )
        .await;
        count()
    }

    /// [`Registry::blob_gets`], once the access log shows at least `expected`.
    pub async fn blob_gets_logged(&self, digest: &str, expected: usize) -> usize {
        let needle = format!("/blobs/{digest} HTTP/1.1\"");
        self.logged(expected, &format!("GETs of {digest}"), |l| {
            l.contains("\"GET /v2/") && l.contains(&needle)
        })
        .await
    }

    /// Where the registry keeps the bytes of blob `digest`.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
