//! The node path `serve --registry-name` keeps and checks, with a temp dir as
//! the node's root (`--node-root`), so nothing of this machine is touched:
//! its hosts-file line and hosts.toml come back when something rewrites
//! them (as cloud-init does), `/readyz` fails while a check does and names
//! it, and `regproxy doctor` says the same and why. The hijack test runs the
//! proxy in a network namespace of its own, where a DNAT rule (as the CNI
//! portmap plugin writes for a `hostPort`) sends the registry address to
//! another server.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use http::StatusCode;
use support::netns::Netns;
use support::*;

/// An upstream where nothing listens: the node path does not need one.
const DEAD_UPSTREAM: &str = "http://127.0.0.1:9";
const ORIGINAL: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n";
const CONFIG_OK: &str = "version = 2\n\
    [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
const CONFIG_WITHOUT_PATH: &str = "version = 2\n\
    [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";

/// A node's `/etc`, under a temp dir passed as `--node-root`.
struct NodeRoot {
    dir: TempDir,
}

impl NodeRoot {
    fn new(containerd_config: &str) -> NodeRoot {
        let dir = temp_dir("node-root");
        std::fs::create_dir_all(dir.path().join("etc/containerd/certs.d")).unwrap();
        std::fs::write(dir.path().join("etc/hosts"), ORIGINAL).unwrap();
        let root = NodeRoot { dir };
        root.set_config(containerd_config);
        root
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn hosts(&self) -> PathBuf {
        self.dir.path().join("etc/hosts")
    }

    fn hosts_toml(&self) -> PathBuf {
        self.dir
            .path()
            .join("etc/containerd/certs.d")
            .join(REGISTRY_NAME)
            .join("hosts.toml")
    }

    fn set_config(&self, text: &str) {
        std::fs::write(self.dir.path().join("etc/containerd/config.toml"), text).unwrap();
    }

    /// The flags that point a serve or doctor at this node.
    fn flags(&self) -> Vec<String> {
        ["--registry-name", REGISTRY_NAME, "--node-root", self.path()]
            .map(String::from)
            .to_vec()
    }
}

async fn readyz(admin: SocketAddr) -> (StatusCode, String) {
    let (status, _, body) = get(&format!("http://{admin}/readyz"), &[]).await;
    (status, String::from_utf8_lossy(&body.unwrap()).into_owned())
}

fn ok_metric(check: &str) -> String {
    format!("regproxy_node_path_ok{{check=\"{check}\"}}")
}

fn repairs(file: &str) -> String {
    format!("regproxy_node_path_repairs_total{{file=\"{file}\"}}")
}

/// Waits until `/readyz` answers `want` with a body that contains `says`.
async fn wait_ready(admin: SocketAddr, want: StatusCode, says: &str) {
    wait_for(
        || async {
            let (st, body) = readyz(admin).await;
            st == want && body.contains(says)
        },
        &format!("/readyz answers {want} saying `{says}`"),
    )
    .await
}

/// Waits until the hosts file has our line for the registry name again.
async fn wait_line_back(hosts: &Path, address: &str) {
    let line = format!("{address} {REGISTRY_NAME} # regproxy-managed");
    wait_until(
        || std::fs::read_to_string(hosts).is_ok_and(|h| h.contains(&line)),
        "serve puts its hosts-file line back",
    )
    .await
}

fn doctor(program: Command, args: &[String]) -> (bool, String) {
    let mut program = program;
    let out: Output = program.arg("doctor").args(args).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn serve_heals_the_node_path_and_readiness_follows_containerds_config_path() {
    let root = NodeRoot::new(CONFIG_WITHOUT_PATH);
    let cache = temp_dir("node-cache");
    let mut args = root.flags();
    args.extend(["--reconcile-interval", "200ms"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start_on("127.0.9.10:0", DEAD_UPSTREAM, cache.path(), &args);

    // The first round writes both files and runs every check; only
    // containerd's config fails it.
    wait_ready(
        proxy.admin,
        StatusCode::SERVICE_UNAVAILABLE,
        "containerd_config_path",
    )
    .await;
    let (_, why) = readyz(proxy.admin).await;
    assert!(
        why.contains("sets no CRI registry config_path") && why.contains("fix:"),
        "/readyz should say why and what fixes it: {why}"
    );
    let m = proxy.metrics().await;
    assert_eq!(m[&ok_metric("containerd_config_path")], 0, "{m:?}");
    for check in ["etc_hosts", "reaches_us", "hosts_toml"] {
        assert_eq!(m[&ok_metric(check)], 1, "{check} should pass: {m:?}");
    }
    let hosts = std::fs::read_to_string(root.hosts()).unwrap();
    assert_eq!(
        hosts,
        format!("{ORIGINAL}127.0.9.10 {REGISTRY_NAME} # regproxy-managed\n"),
        "serve should add its line to the node's hosts file"
    );
    let toml = std::fs::read_to_string(root.hosts_toml()).unwrap();
    assert!(
        toml.contains(&format!("[host.\"http://{}\"]", proxy.addr))
            && toml.contains(&format!("server = \"{DEAD_UPSTREAM}\"")),
        "hosts.toml should name the proxy as mirror and the upstream as server:\n{toml}"
    );
    let mut doctor_args = root.flags();
    doctor_args.extend(
        [
            "--listen",
            &proxy.addr.to_string(),
            "--admin-listen",
            &proxy.admin.to_string(),
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--upstream",
            DEAD_UPSTREAM,
        ]
        .map(String::from),
    );
    let (ok, said) = doctor(Command::new(regproxy_bin()), &doctor_args);
    assert!(
        !ok && said.contains("FAILED  containerd_config_path") && said.contains("config_path ="),
        "doctor should fail on containerd's config and say what to set:\n{said}"
    );

    root.set_config(CONFIG_OK);
    wait_ready(proxy.admin, StatusCode::OK, "ready").await;
    assert_eq!(proxy.metric(&ok_metric("containerd_config_path")).await, 1);
    let (ok, said) = doctor(Command::new(regproxy_bin()), &doctor_args);
    assert!(ok, "doctor should pass on a good node:\n{said}");
    for check in [
        "proxy_answers",
        "etc_hosts",
        "reaches_us",
        "containerd_config_path",
        "hosts_toml",
    ] {
        assert!(
            said.contains(&format!("ok      {check}: ")),
            "doctor should report {check} ok:\n{said}"
        );
    }

    // cloud-init's manage_etc_hosts: a new file renamed over the old one.
    let before = proxy.metric(&repairs("etc_hosts")).await;
    let fresh = root.hosts().with_extension("cloud-init");
    std::fs::write(&fresh, format!("{ORIGINAL}10.0.0.4 node-1\n")).unwrap();
    std::fs::rename(&fresh, root.hosts()).unwrap();
    let inode = std::fs::metadata(root.hosts()).unwrap().ino();
    wait_line_back(&root.hosts(), "127.0.9.10").await;
    assert_eq!(
        std::fs::metadata(root.hosts()).unwrap().ino(),
        inode,
        "the repair should edit the new file in place"
    );
    assert!(
        std::fs::read_to_string(root.hosts())
            .unwrap()
            .starts_with(&format!("{ORIGINAL}10.0.0.4 node-1\n")),
        "the repair should keep what the rewrite wrote"
    );
    // The file is back a moment before the count moves.
    wait_for(
        || async { proxy.metric(&repairs("etc_hosts")).await > before },
        "the repair of etc_hosts is counted",
    )
    .await;

    // An editor or a script: truncate and write.
    let before = proxy.metric(&repairs("etc_hosts")).await;
    std::fs::write(root.hosts(), ORIGINAL).unwrap();
    wait_line_back(&root.hosts(), "127.0.9.10").await;
    assert_eq!(std::fs::metadata(root.hosts()).unwrap().ino(), inode);
    // The file is back a moment before the count moves.
    wait_for(
        || async { proxy.metric(&repairs("etc_hosts")).await > before },
        "the repair of etc_hosts is counted",
    )
    .await;

    // hosts.toml deleted: written again.
    let before = proxy.metric(&repairs("hosts_toml")).await;
    std::fs::remove_file(root.hosts_toml()).unwrap();
    wait_until(
        || root.hosts_toml().exists(),
        "serve writes hosts.toml again",
    )
    .await;
    // The file is back a moment before the count moves.
    wait_for(
        || async { proxy.metric(&repairs("hosts_toml")).await > before },
        "the repair of hosts_toml is counted",
    )
    .await;
    assert_eq!(std::fs::read_to_string(root.hosts_toml()).unwrap(), toml);
    let logs = proxy.logs();
    assert!(
        logs.contains("node path repaired") && logs.contains("node path check failed"),
        "each repair and each failed check should be logged:\n{logs}"
    );
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iptables(ns: &Netns, op: &str, to: &str) {
    let out = ns
        .command("iptables")
        .args(["-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", "127.0.9.2"])
        .args(["--dport", "5000", "-j", "DNAT", "--to-destination", to])
        .output()
        .unwrap();
    succeeded(out, &format!("iptables {op}"));
}

#[tokio::test]
async fn a_dnat_to_another_server_fails_readiness_and_doctor_says_why() {
    let ns = Netns::create();
    let root = NodeRoot::new(CONFIG_OK);
    let cache = temp_dir("node-cache");
    let ready_dir = temp_dir("ready");
    let ready = ready_dir.path().join("ready.json");
    let log = std::fs::File::create(ready_dir.path().join("regproxy.log")).unwrap();
    let admin_listen = format!("{}:0", ns.ns_ip);
    // The proxy on the namespace's 127.0.9.2:5000, its admin port on the
    // namespace's end of the veth, where this test reaches it.
    let _proxy = Killed(
        ns.command(regproxy_bin())
            .args([
                "serve",
                "--listen",
                "127.0.9.2:5000",
                "--admin-listen",
                &admin_listen,
            ])
            .args(["--upstream", DEAD_UPSTREAM, "--reconcile-interval", "200ms"])
            .arg("--cache-dir")
            .arg(cache.path())
            .arg("--ready-file")
            .arg(&ready)
            .args(root.flags())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let mut admin: Option<SocketAddr> = None;
    wait_until(
        || {
            let json: Option<serde_json::Value> = std::fs::read(&ready)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            admin = json.and_then(|j| j["admin"].as_str()?.parse().ok());
            admin.is_some()
        },
        "regproxy in the namespace writes its ready file",
    )
    .await;
    let admin = admin.unwrap();
    wait_ready(admin, StatusCode::OK, "ready").await;

    // Another server in the namespace, and the rule a hostPort pod's
    // portmap plugin would add: the registry address now reaches it. It
    // even answers the proxy's own id, which is public (the admin port
    // gives it out): replaying it proves nothing without the key.
    let (_, _, id) = get(&format!("http://{admin}{}", regproxy::instance::PATH), &[]).await;
    let id = String::from_utf8(id.unwrap().to_vec()).unwrap();
    // The admin port, which other pods reach, proves nothing for anyone.
    let (_, _, relayed) = get(
        &format!("http://{admin}{}?nonce=00ff", regproxy::instance::PATH),
        &[],
    )
    .await;
    assert_eq!(&relayed.unwrap()[..], id.as_bytes(), "a bare id, no proof");
    let replay = temp_dir("replay");
    std::fs::create_dir_all(replay.path().join("_regproxy")).unwrap();
    std::fs::write(replay.path().join("_regproxy/instance"), &id).unwrap();
    let other = format!("{}:8080", ns.ns_ip);
    let _other = Killed(
        ns.command("python3")
            .args(["-m", "http.server", "--bind", &ns.ns_ip.to_string(), "8080"])
            .arg("--directory")
            .arg(replay.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(
        || std::net::TcpStream::connect(&other).is_ok(),
        "the other server listens",
    )
    .await;
    iptables(&ns, "-A", &other);

    wait_ready(admin, StatusCode::SERVICE_UNAVAILABLE, "reaches_us").await;
    let (_, why) = readyz(admin).await;
    assert!(
        why.contains("answered by another server") && why.contains(&id),
        "/readyz should say what answered instead, its replayed id too: {why}"
    );
    let m = metrics_at(admin).await;
    assert_eq!(m[&ok_metric("reaches_us")], 0, "{m:?}");
    assert_eq!(
        m[&ok_metric("etc_hosts")],
        1,
        "the hosts file is fine: {m:?}"
    );

    let mut doctor_args = root.flags();
    doctor_args.extend(
        [
            "--listen",
            "127.0.9.2:5000",
            "--admin-listen",
            &admin.to_string(),
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--upstream",
            DEAD_UPSTREAM,
        ]
        .map(String::from),
    );
    let (ok, said) = doctor(ns.command(regproxy_bin()), &doctor_args);
    assert!(
        !ok && said.contains("FAILED  reaches_us")
            && said.contains("another server")
            && said.contains("CNI-HOSTPORT-DNAT"),
        "doctor should fail reaches_us and point at the DNAT rules:\n{said}"
    );
    assert!(
        said.contains("ok      proxy_answers") && said.contains("WARN    tcp_migrate_req"),
        "doctor should see the proxy itself, and the namespace's sysctl at 0:\n{said}"
    );

    // `regproxy sysctl` in this namespace only (it is per namespace).
    let out = ns.command(regproxy_bin()).arg("sysctl").output().unwrap();
    let said = succeeded(out, "regproxy sysctl");
    assert!(said.contains("set to 1 (was 0)"), "{said}");
    let out = ns.command(regproxy_bin()).arg("sysctl").output().unwrap();
    assert!(succeeded(out, "regproxy sysctl").contains("already 1"));

    iptables(&ns, "-D", &other);
    wait_ready(admin, StatusCode::OK, "ready").await;
    assert_eq!(metrics_at(admin).await[&ok_metric("reaches_us")], 1);
    let (ok, said) = doctor(ns.command(regproxy_bin()), &doctor_args);
    assert!(
        ok && said.contains("ok      reaches_us") && said.contains("ok      tcp_migrate_req"),
        "with the rule gone doctor should pass:\n{said}"
    );
}
