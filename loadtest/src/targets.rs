//! The things measured, each started with a fresh cache in its own temp dir:
//! regproxy; Distribution's proxy mode; nginx `proxy_cache` with
//! `proxy_cache_lock` (the docker-registry-proxy recipe); and "direct", the
//! upstream itself with no cache in between. Plus the upstream registry.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::procs::{free_port, AccessLog, Proc};
use crate::registry::Registry;

/// What a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Regproxy,
    Nginx,
    Distribution,
    Direct,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Regproxy => "regproxy",
            Kind::Nginx => "nginx",
            Kind::Distribution => "distribution",
            Kind::Direct => "direct",
        })
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Tools {
    pub registry: PathBuf,
    pub nginx: PathBuf,
    pub regproxy: PathBuf,
}

/// The upstream registry: Distribution with filesystem storage and its
/// access log on stdout, so a run can count what it sent.
pub struct Upstream {
    pub proc: Proc,
    /// `host:port`.
    pub addr: String,
    pub log: AccessLog,
}

fn registry_config(dir: &Path, storage: &Path, addr: &str, extra: &str) -> anyhow::Result<PathBuf> {
    let cfg = format!(
        "version: 0.1\n\
         log:\n  level: info\n  accesslog:\n    disabled: false\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: loadtest-not-a-secret\n{extra}",
        storage.display()
    );
    let path = dir.join(format!("registry-{}.yml", addr.replace([':', '.'], "_")));
    std::fs::write(&path, cfg)?;
    Ok(path)
}

/// Starts Distribution as the upstream on `addr` with storage in `storage`,
/// inside network namespace `netns` when given.
pub async fn start_upstream(
    tools: &Tools,
    dir: &Path,
    storage: &Path,
    addr: &str,
    netns: Option<&str>,
) -> anyhow::Result<Upstream> {
    let cfg = registry_config(dir, storage, addr, "")?;
    let cmd = match netns {
        None => {
            let mut c = Command::new(&tools.registry);
            c.arg("serve").arg(&cfg);
            c
        }
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns])
                .arg(&tools.registry)
                .arg("serve")
                .arg(&cfg);
            c
        }
    };
    let name = format!("upstream-{}", addr.replace([':', '.'], "_"));
    let mut proc = Proc::spawn(&name, cmd, dir)?;
    let log = AccessLog {
        path: proc.stdout.clone(),
    };
    wait_ready(&mut proc, addr).await?;
    Ok(Upstream {
        proc,
        addr: addr.to_string(),
        log,
    })
}

/// Waits until `proc` answers `GET /v2/` on `addr`; fails if it exits first.
pub async fn wait_ready(proc: &mut Proc, addr: &str) -> anyhow::Result<()> {
    // Generous: a loaded machine may take long to start a program; one
    // that comes up sooner ends the wait at once.
    const WITHIN: Duration = Duration::from_secs(60);
    let reg = Registry::new(addr, Duration::from_secs(2));
    let deadline = std::time::Instant::now() + WITHIN;
    while std::time::Instant::now() < deadline {
        proc.check_alive()?;
        if reg.ping().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proc.check_alive()?;
    anyhow::bail!(
        "{} did not answer GET /v2/ on {addr} within {WITHIN:?}",
        proc.name
    )
}

/// A running target with a fresh cache.
pub struct Target {
    pub kind: Kind,
    /// `host:port` where clients connect.
    pub addr: String,
    pub proc: Option<Proc>,
    /// regproxy's admin address (`/metrics`).
    pub admin: Option<String>,
    _dir: tempfile::TempDir,
}

impl Target {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }
}

fn nginx_config(prefix: &Path, listen: &str, upstream: &str) -> String {
    let p = prefix.display();
    // Cache keyed by digest (not by URL) so a shared layer is cached once
    // across repositories: nginx's best configuration for this workload.
    let cached = |re: &str| {
        format!(
            r#"        location ~ "{re}" {{
            proxy_pass http://registry;
            proxy_cache blobs;
            proxy_cache_key $1;
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 1h;
            proxy_cache_lock_age 1h;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
        }}
"#
        )
    };
    format!(
        r#"user root;
worker_processes auto;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy_temp;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    proxy_cache_path {p}/cache levels=1:2 keys_zone=blobs:32m max_size=20g inactive=7d use_temp_path=off;
    upstream registry {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_read_timeout 900s;
        proxy_send_timeout 900s;
        proxy_buffer_size 64k;
        proxy_buffers 16 64k;
{blobs}{manifests}        # Manifests by tag for as long as regproxy's default tag TTL (30 s),
        # as docker-registry-proxy caches them for a while too; by URL and
        # Accept, since the answer depends on what the client accepts.
        location ~ "^/v2/.+/manifests/[^/]+$" {{
            proxy_pass http://registry;
            proxy_cache blobs;
            proxy_cache_key $uri$http_accept;
            proxy_cache_valid 200 30s;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
        }}
        location / {{
            proxy_pass http://registry;
        }}
    }}
}}
"#,
        blobs = cached(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$"),
        manifests = cached(r"^/v2/.+/manifests/(sha256:[0-9a-f]{64})$"),
    )
}

/// Starts a target in front of `upstream` (`host:port`) with a fresh cache.
pub async fn start_target(
    kind: Kind,
    tools: &Tools,
    upstream: &str,
    work: &Path,
    label: &str,
) -> anyhow::Result<Target> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{kind}-{label}-"))
        .tempdir_in(work)?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let name = format!("{kind}-{label}");
    let (proc, admin) = match kind {
        Kind::Direct => {
            return Ok(Target {
                kind,
                addr: upstream.to_string(),
                proc: None,
                admin: None,
                _dir: dir,
            })
        }
        Kind::Regproxy => {
            let admin = format!("127.0.0.1:{}", free_port()?);
            let mut cmd = Command::new(&tools.regproxy);
            cmd.arg("serve")
                .args(["--listen", &addr])
                .args(["--upstream", &format!("http://{upstream}")])
                .arg("--cache-dir")
                .arg(dir.path().join("cache"))
                .args(["--cache-size", "20GiB"])
                .args(["--admin-listen", &admin])
                .env("RUST_LOG", "info");
            (Proc::spawn(&name, cmd, dir.path())?, Some(admin))
        }
        Kind::Distribution => {
            let storage = dir.path().join("storage");
            std::fs::create_dir_all(&storage)?;
            let cfg = registry_config(
                dir.path(),
                &storage,
                &addr,
                &format!("proxy:\n  remoteurl: http://{upstream}\n"),
            )?;
            let mut cmd = Command::new(&tools.registry);
            cmd.arg("serve").arg(cfg);
            (Proc::spawn(&name, cmd, dir.path())?, None)
        }
        Kind::Nginx => {
            let prefix = dir.path().join("nginx");
            std::fs::create_dir_all(&prefix)?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, nginx_config(&prefix, &addr, upstream))?;
            let mut cmd = Command::new(&tools.nginx);
            cmd.arg("-p").arg(&prefix).arg("-c").arg(&conf);
            (Proc::spawn(&name, cmd, dir.path())?, None)
        }
    };
    let mut proc = proc;
    wait_ready(&mut proc, &addr)
        .await
        .with_context(|| format!("starting {kind}"))?;
    Ok(Target {
        kind,
        addr,
        proc: Some(proc),
        admin,
        _dir: dir,
    })
}
