//! The node-path checks. Each reads what the node has (a file, an answer on
//! the registry address) and says `Ok(what it saw)` or a [`Failure`] with
//! the reason and the fix. Blocking: `serve` runs them on a blocking thread.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::NodeConfig;
use crate::hosts::{containerd_hosts_toml, hosts_toml, lookup};

/// A check, named by its `check` label on `regproxy_node_path_ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    EtcHosts,
    ReachesUs,
    ContainerdConfigPath,
    HostsToml,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::EtcHosts => "etc_hosts",
            Check::ReachesUs => "reaches_us",
            Check::ContainerdConfigPath => "containerd_config_path",
            Check::HostsToml => "hosts_toml",
        }
    }
}

/// Why a check failed, and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub fix: String,
}

/// One round of checks: each with what it saw, or why it failed.
pub type Round = Vec<(Check, Result<String, Failure>)>;

fn fail(reason: impl Into<String>, fix: impl Into<String>) -> Failure {
    Failure {
        reason: reason.into(),
        fix: fix.into(),
    }
}

/// How long `reaches_us` waits to connect, and then for the whole answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs every check that applies to `node` for the proxy at `proxy` (the
/// node address of `--listen`), which answers as one of `ours`, and hosts.toml
/// with the fallback `server` (`Err`: it is not known, and why).
pub fn run_all(
    node: &NodeConfig,
    proxy: SocketAddr,
    ours: &[String],
    server: Result<&str, &str>,
) -> Round {
    let hosts_path = node.on_node(&node.hosts_file);
    let hosts = std::fs::read(&hosts_path);
    let mut round = vec![
        (
            Check::EtcHosts,
            etc_hosts(&hosts, &hosts_path, node, proxy.ip()),
        ),
        (
            Check::ReachesUs,
            // The name's own port when it has one: that is where pulls go.
            reaches_us(
                &hosts,
                &hosts_path,
                node,
                node.port().unwrap_or(proxy.port()),
                ours,
            ),
        ),
    ];
    // Without a certs dir there is no hosts.toml for containerd to find.
    if let (Some(config), Some(certs)) = (&node.containerd_config, &node.certs_dir) {
        let path = node.on_node(config);
        let read = std::fs::read_to_string(&path);
        round.push((
            Check::ContainerdConfigPath,
            containerd_config_path(read, &path, certs),
        ));
    }
    if let Some(certs) = &node.certs_dir {
        let path = containerd_hosts_toml(&node.on_node(certs), &node.registry_name);
        let wanted = server.map(|s| hosts_toml(&node.registry_name, &super::endpoint(proxy), s));
        round.push((Check::HostsToml, hosts_toml_check(&path, wanted)));
    }
    round
}

fn read_error(path: &Path, e: &io::Error) -> Failure {
    fail(
        format!("cannot read {}: {e}", path.display()),
        "mount the node's /etc into the pod and pass --node-root (the DaemonSet mounts it at /host/etc, --node-root=/host)",
    )
}

/// `etc_hosts`: the node's hosts file maps the name to the proxy (the first
/// line that lists the name is the one the resolver uses).
pub fn etc_hosts(
    hosts: &io::Result<Vec<u8>>,
    path: &Path,
    node: &NodeConfig,
    want: IpAddr,
) -> Result<String, Failure> {
    let content = hosts.as_ref().map_err(|e| read_error(path, e))?;
    let name = node.host();
    let ensure = format!(
        "regproxy serve puts the line back at its next reconcile; by hand: \
         regproxy hosts ensure --hosts-file {} --name {name} --address {want}",
        path.display()
    );
    match lookup(content, name) {
        None => Err(fail(
            format!("{} has no line for {name}", path.display()),
            ensure,
        )),
        Some((line, addr)) if addr.parse::<IpAddr>() == Ok(want) => Ok(format!(
            "{} maps {name} to {want} (line {line})",
            path.display()
        )),
        Some((line, addr)) => Err(fail(
            format!(
                "{} line {line} maps {name} to {addr}, not to the proxy's {want} (the first line wins)",
                path.display()
            ),
            format!("delete or correct line {line} (regproxy does not edit lines it did not write); then: {ensure}"),
        )),
    }
}

/// `reaches_us`: the name, resolved through the node's hosts file and
/// connected to on the proxy's port, answers `GET /_regproxy/instance`
/// with one of `ours`.
pub fn reaches_us(
    hosts: &io::Result<Vec<u8>>,
    path: &Path,
    node: &NodeConfig,
    port: u16,
    ours: &[String],
) -> Result<String, Failure> {
    let content = hosts.as_ref().map_err(|e| read_error(path, e))?;
    let name = node.host();
    let ip = lookup(content, name)
        .and_then(|(_, a)| a.parse::<IpAddr>().ok())
        .ok_or_else(|| {
            fail(
                format!("{name} does not resolve through {}", path.display()),
                "see the etc_hosts check",
            )
        })?;
    let addr = SocketAddr::new(ip, port);
    match who_answers(addr, name, ours) {
        Answer::Ours(id) => Ok(format!("{name} -> {addr} answers as regproxy instance {id}")),
        Answer::Nothing(e) => Err(fail(
            format!("nothing answers on {addr} ({name}): {e}"),
            "start regproxy on that address (is the pod running? `regproxy doctor` in it tells more)",
        )),
        Answer::Other { status, body } => Err(fail(
            format!(
                "{name} -> {addr} is answered by another server, not this regproxy: {}",
                describe(&status, &body)
            ),
            format!(
                "find what answers on {addr}: another process listening there, or a DNAT rule \
                 (a pod with hostPort {port} makes the CNI portmap plugin's rule match every local address: \
                 `iptables -t nat -S CNI-HOSTPORT-DNAT`); move that pod's hostPort or give the proxy another address"
            ),
        )),
    }
}

/// Who answers `GET /_regproxy/instance` on an address.
pub enum Answer {
    /// A regproxy whose id is one of ours.
    Ours(String),
    /// Something else (or a regproxy not among ours): its status line and
    /// its body.
    Other { status: String, body: String },
    /// Nothing: no connection, or no HTTP answer.
    Nothing(io::Error),
}

/// Asks `addr` (with `Host: host`) who it is.
pub fn who_answers(addr: SocketAddr, host: &str, ours: &[String]) -> Answer {
    // With the cache dir's key known, only a proof of a fresh nonce counts:
    // an id is public, and a server could replay one.
    let nonce = crate::instance::challenge();
    let (status, body) = match get_instance(addr, host, nonce.as_deref()) {
        Ok(x) => x,
        Err(e) => return Answer::Nothing(e),
    };
    let id = match &nonce {
        Some(n) => crate::instance::verify(n, &body),
        None => Some(body.trim()).filter(|id| ours.iter().any(|o| o == id)),
    };
    match id {
        Some(id) if status.contains(" 200 ") => Answer::Ours(id.to_owned()),
        _ => Answer::Other { status, body },
    }
}

/// An answer that is not ours, for a log line: the status line and the
/// start of the body.
pub fn describe(status: &str, body: &str) -> String {
    let snippet: String = body.chars().take(120).collect();
    format!("`{}` `{}`", status.trim(), snippet.trim())
}

/// `GET /_regproxy/instance` over a plain HTTP/1.1 connection: the status
/// line and the body (at most 64 KiB; enough to recognise what answered).
fn get_instance(addr: SocketAddr, host: &str, nonce: Option<&str>) -> io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let query = nonce.map(|n| format!("?nonce={n}")).unwrap_or_default();
    write!(
        s,
        "GET {}{query} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: regproxy-node-check\r\n\r\n",
        crate::instance::PATH
    )?;
    let mut buf = Vec::new();
    s.take(64 << 10).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    if !status.starts_with("HTTP/") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not an HTTP answer: `{}`",
                status.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok((status, body.to_owned()))
}

/// containerd 2.x's `config_path` when its config sets none.
const DEFAULT_CONFIG_PATH_2X: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";

/// `containerd_config_path`: containerd's config has a CRI registry
/// `config_path` that lists `certs` (a colon-separated list).
pub fn containerd_config_path(
    read: io::Result<String>,
    path: &Path,
    certs: &Path,
) -> Result<String, Failure> {
    let certs_s = certs.display().to_string();
    let certs_s = certs_s.trim_end_matches('/');
    let add = |version: i64| {
        let plugin = if version >= 3 {
            "io.containerd.cri.v1.images"
        } else {
            "io.containerd.grpc.v1.cri"
        };
        format!(
            "set `[plugins.\"{plugin}\".registry] config_path = \"{certs_s}\"` in {} and restart containerd \
             (k3s/RKE2: their registries.yaml instead; on a node without containerd's CRI: --containerd-config=\"\")",
            path.display()
        )
    };
    let text = match read {
        Ok(t) => t,
        // No config: containerd 2.x's defaults list the certs dir, and a
        // node without containerd has nothing to fail. (1.x without a
        // config reads no hosts.toml; distributions ship one.)
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(format!(
                "no containerd config at {}: containerd 2.x's default config_path \
                 \"{DEFAULT_CONFIG_PATH_2X}\" applies (1.x would need one)",
                path.display()
            ))
        }
        Err(e) => return Err(read_error(path, &e)),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| fail(format!("cannot parse {}: {e}", path.display()), add(2)))?;
    let version = table
        .get("version")
        .and_then(toml::Value::as_integer)
        .unwrap_or(1);
    // dockerd's own containerd (docker-ce ships `disabled_plugins =
    // ["cri"]`): no CRI pulls, so no hosts.toml to read.
    let cri_off = table
        .get("disabled_plugins")
        .and_then(toml::Value::as_array)
        .is_some_and(|a| {
            a.iter().filter_map(toml::Value::as_str).any(|p| {
                matches!(
                    p,
                    "cri" | "io.containerd.grpc.v1.cri" | "io.containerd.cri.v1.images"
                )
            })
        });
    if cri_off {
        return Ok(format!(
            "{} disables containerd's CRI (dockerd's containerd): no image pulls read hosts.toml",
            path.display()
        ));
    }
    let at = |plugin: &str| {
        table
            .get("plugins")?
            .get(plugin)?
            .get("registry")?
            .get("config_path")?
            .as_str()
    };
    let set = [
        "io.containerd.cri.v1.images",
        "io.containerd.grpc.v1.cri",
        "cri",
    ]
    .into_iter()
    .find_map(at);
    let (config_path, how) = match set {
        Some(p) => (p, "config_path"),
        None if version >= 3 => (
            DEFAULT_CONFIG_PATH_2X,
            "containerd 2.x's default config_path",
        ),
        None => {
            return Err(fail(
                format!(
                    "{} sets no CRI registry config_path, so containerd ignores hosts.toml files",
                    path.display()
                ),
                add(version),
            ))
        }
    };
    if config_path
        .split(':')
        .any(|p| p.trim_end_matches('/') == certs_s)
    {
        Ok(format!("{how} \"{config_path}\" lists {certs_s}"))
    } else {
        Err(fail(
            format!(
                "{how} in {} is \"{config_path}\", which does not list {certs_s}",
                path.display()
            ),
            format!(
                "add {certs_s} to config_path (a colon-separated list) and restart containerd, \
                 or pass --containerd-certs-dir with a folder it lists"
            ),
        ))
    }
}

/// `hosts_toml`: our hosts.toml is there with the proxy as mirror and the
/// fallback server. `wanted`: the exact content, or why it is not known
/// (a failure too: a hosts.toml whose server cannot be told right is not
/// known to fall back).
pub fn hosts_toml_check(path: &Path, wanted: Result<String, &str>) -> Result<String, Failure> {
    let fix = "regproxy serve writes it at its next reconcile (see its log for why it could not)";
    let have = match std::fs::read_to_string(path) {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(fail(format!("{} is missing", path.display()), fix))
        }
        Err(e) => return Err(read_error(path, &e)),
    };
    if !have.starts_with("# managed by regproxy") {
        return Err(fail(
            format!("{} was not written by regproxy", path.display()),
            "move it away (regproxy does not replace a hosts.toml it did not write)",
        ));
    }
    match wanted {
        Ok(w) if w == have => Ok(format!(
            "{} sends pulls to the proxy, falling back to the server",
            path.display()
        )),
        Ok(_) => Err(fail(
            format!(
                "{} does not have the proxy as mirror and the registry as server",
                path.display()
            ),
            fix,
        )),
        Err(why) => Err(fail(
            format!(
                "{} cannot be checked: the fallback server is not known: {why}",
                path.display()
            ),
            "pass --containerd-server (or --upstream with a host that resolves)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERTS: &str = "/etc/containerd/certs.d";

    fn config(text: &str) -> Result<String, Failure> {
        containerd_config_path(
            Ok(text.to_owned()),
            Path::new("config.toml"),
            Path::new(CERTS),
        )
    }

    fn node() -> NodeConfig {
        NodeConfig {
            registry_name: "reg.example".into(),
            root: "/".into(),
            hosts_file: "/etc/hosts".into(),
            certs_dir: None,
            containerd_config: None,
            server: None,
            interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn etc_hosts_wants_the_first_line_for_the_name_to_be_the_proxy() {
        let check = |text: &str| {
            etc_hosts(
                &Ok(text.as_bytes().to_vec()),
                Path::new("hosts"),
                &node(),
                "127.0.0.2".parse().unwrap(),
            )
        };
        assert!(check("127.0.0.2 reg.example # regproxy-managed\n").is_ok());
        let none = check("127.0.0.1 localhost\n").unwrap_err();
        assert!(none.reason.contains("no line for reg.example"), "{none:?}");
        let other = check("10.96.0.20 reg.example\n127.0.0.2 reg.example # regproxy-managed\n")
            .unwrap_err();
        assert!(
            other
                .reason
                .contains("line 1 maps reg.example to 10.96.0.20"),
            "{other:?}"
        );
        let unreadable = etc_hosts(
            &Err(io::ErrorKind::PermissionDenied.into()),
            Path::new("hosts"),
            &node(),
            "127.0.0.2".parse().unwrap(),
        );
        assert!(unreadable.unwrap_err().fix.contains("--node-root"));
    }

    #[test]
    fn hosts_toml_must_be_ours_and_exact_when_the_server_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.toml");
        let ours = hosts_toml("reg.example", "http://127.0.0.2:80", "http://10.96.0.20:80");
        assert!(hosts_toml_check(&path, Ok(ours.clone()))
            .unwrap_err()
            .reason
            .contains("missing"));
        std::fs::write(&path, &ours).unwrap();
        assert!(hosts_toml_check(&path, Ok(ours.clone())).is_ok());
        let moved = hosts_toml("reg.example", "http://127.0.0.2:80", "http://10.96.0.21:80");
        assert!(
            hosts_toml_check(&path, Ok(moved)).is_err(),
            "a stale server fails"
        );
        assert!(hosts_toml_check(&path, Err("no upstream")).is_err());
        std::fs::write(&path, "server = \"https://x\"\n").unwrap();
        assert!(hosts_toml_check(&path, Ok(ours))
            .unwrap_err()
            .reason
            .contains("not written by regproxy"));
    }

    #[test]
    fn config_path_is_found_in_each_containerd_version() {
        let v1 = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/x:/etc/containerd/certs.d/\"\n";
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n";
        for ok in [v1, v2, v3, "version = 3\n"] {
            assert!(
                config(ok).is_ok(),
                "{ok} lists the certs dir: {:?}",
                config(ok)
            );
        }
        let none =
            config("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"x\"\n")
                .unwrap_err();
        assert!(
            none.reason.contains("sets no CRI registry config_path"),
            "{none:?}"
        );
        assert!(none.fix.contains("io.containerd.grpc.v1.cri"), "{none:?}");
        let other = config("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/docker/certs.d\"\n").unwrap_err();
        assert!(other.reason.contains("does not list"), "{other:?}");
        assert!(config("version = [").is_err(), "a broken config fails");
        let missing = containerd_config_path(
            Err(io::ErrorKind::NotFound.into()),
            Path::new("c.toml"),
            Path::new(CERTS),
        );
        assert!(
            missing.unwrap().contains("2.x's default"),
            "a node without a containerd config fails nothing"
        );
        let docker = config("disabled_plugins = [\"cri\"]\n").unwrap();
        assert!(docker.contains("disables containerd's CRI"), "{docker}");
    }
}
