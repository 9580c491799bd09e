//! `regproxy prefetch` against Debian's docker-registry through the real
//! binary: only the node's platform of an index is fetched, the progress
//! shows as bars in a real terminal (tmux) and as plain lines in a pipe, a
//! missing image fails the command, `--prefetch-auth-file` opens a private
//! upstream, a client's pull under `--upstream-rate` is not held behind a
//! large prefetch, and a prefetch whose client hangs up stops.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::Value;
use support::*;

const MIB: usize = 1 << 20;
const TOKEN: &str = "prefetch-test-token";

/// The platform regproxy calls this node's.
fn node_platform() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "linux/amd64",
        "aarch64" => "linux/arm64",
        other => panic!("no test platform for {other}"),
    }
}

/// Another platform than the node's.
const OTHER_PLATFORM: &str = "linux/s390x";

/// An image pushed to the upstream.
struct Image {
    manifest: String,
    size: usize,
    config: String,
    layers: Vec<String>,
}

impl Image {
    fn blobs(&self) -> Vec<&String> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

/// Pushes an image of layers of `sizes` bytes (content from `seed`),
/// with `auth` headers.
async fn push_image_as(
    registry: &str,
    auth: &[(&str, &str)],
    repo: &str,
    tag: &str,
    seed: u64,
    sizes: &[usize],
) -> Image {
    let config = format!("{{\"architecture\":\"test\",\"seed\":{seed}}}").into_bytes();
    let layers: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| blob(*n, seed * 100 + i as u64))
        .collect();
    let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
    let (bytes, manifest) = push_manifest_as(registry, auth, repo, tag, &config, &refs).await;
    Image {
        manifest,
        size: bytes.len(),
        config: sha256_digest(&config),
        layers: layers.iter().map(|l| sha256_digest(l)).collect(),
    }
}

async fn push_image(registry: &str, repo: &str, tag: &str, seed: u64, sizes: &[usize]) -> Image {
    push_image_as(registry, &[], repo, tag, seed, sizes).await
}

/// A proxy with the admin API on, its cache and token file.
struct Node {
    proxy: Proxy,
    token: PathBuf,
    _dirs: (TempDir, TempDir),
}

impl Node {
    fn start(upstream: &str, args: &[&str]) -> Node {
        let cache = temp_dir("cache");
        let token_dir = temp_dir("token");
        let token = token_dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let mut all = vec!["--admin-token-file", token.to_str().unwrap()];
        all.extend_from_slice(args);
        let proxy = Proxy::start(upstream, cache.path(), &all);
        Node {
            proxy,
            token,
            _dirs: (cache, token_dir),
        }
    }

    /// `regproxy SUB --admin .. --admin-token-file .. ARGS`.
    fn ctl(&self, sub: &str, args: &[&str]) -> Command {
        let mut c = Command::new(regproxy_bin());
        c.arg(sub)
            .arg("--admin")
            .arg(format!("http://{}", self.proxy.admin))
            .arg("--admin-token-file")
            .arg(&self.token)
            .args(args)
            .env_remove("REGPROXY_ADMIN")
            .env_remove("REGPROXY_ADMIN_TOKEN_FILE")
            .stdin(Stdio::null());
        c
    }

    /// The command line of `ctl`, for a shell.
    fn ctl_line(&self, sub: &str, args: &[&str]) -> String {
        format!(
            "{} {sub} --admin http://{} --admin-token-file {} {}",
            regproxy_bin(),
            self.proxy.admin,
            self.token.display(),
            args.join(" ")
        )
    }

    fn cached(&self, digest: &str) -> bool {
        self.proxy.cache_path(digest).exists()
    }
}

fn output(mut c: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().unwrap();
    (
        status.code().expect("exited, not killed"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_index_is_prefetched_for_the_nodes_platform_only() {
    let reg = Registry::start();
    let url = reg.url();
    let mine = push_image(&url, "team/app", "mine", 1, &[MIB, 2 * MIB]).await;
    let other = push_image(&url, "team/app", "other", 2, &[MIB, 2 * MIB]).await;
    let index = push_index(
        &url,
        "team/app",
        "multi",
        &[
            (&other.manifest, other.size, OTHER_PLATFORM),
            (&mine.manifest, mine.size, node_platform()),
        ],
    )
    .await;
    let node = Node::start(&url, &[]);
    // With the upstream's host, as the ref would be written for a pull.
    let reference = format!("{}/team/app:multi", reg.addr);
    let (code, out, err) = output(node.ctl("prefetch", &[&reference]));
    assert_eq!(code, 0, "the prefetch succeeds: {out}{err}");
    assert!(
        out.contains(&format!("{reference}: done {index} ")),
        "the done line names the index digest: {out}"
    );
    node.proxy.settled(&reg).await;
    for d in mine.blobs() {
        assert!(node.cached(d), "the node's {d} is in the cache");
        assert_eq!(reg.blob_gets(d), 1, "the node's {d} was fetched once");
    }
    for d in other.blobs() {
        assert_eq!(
            reg.blob_gets(d),
            0,
            "the other platform's {d} was never fetched"
        );
        assert!(!node.cached(d), "the other platform's {d} is not cached");
    }

    // Again, as JSON: all of it cached already, nothing fetched.
    let (code, out, err) = output(node.ctl("prefetch", &["--json", &reference]));
    assert_eq!(code, 0, "{out}{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let resolved = events.iter().find(|e| e["event"] == "resolved").unwrap();
    assert_eq!(resolved["ref"], reference.as_str());
    assert_eq!(resolved["digest"], index.as_str());
    assert_eq!(resolved["manifest"], mine.manifest.as_str());
    assert_eq!(resolved["blobs"], 3);
    assert_eq!(resolved["cached"], resolved["bytes"], "all of it is cached");
    let done = events.iter().find(|e| e["event"] == "done").unwrap();
    assert_eq!(done["fetched"], 0, "nothing was fetched again: {done}");
    assert_eq!(events.last().unwrap()["event"], "summary");
    assert_eq!(events.last().unwrap()["ok"], 1);

    // Another platform, when asked for.
    let (code, out, err) = output(node.ctl(
        "prefetch",
        &["--platform", OTHER_PLATFORM, "team/app:multi"],
    ));
    assert_eq!(code, 0, "{out}{err}");
    node.proxy.settled(&reg).await;
    for d in other.blobs() {
        assert!(node.cached(d), "--platform {OTHER_PLATFORM} fetched {d}");
    }
    let (code, out, _) =
        output(node.ctl("prefetch", &["--platform", "linux/mips", "team/app:multi"]));
    assert_eq!(
        code, 1,
        "no manifest for the platform fails the image: {out}"
    );
    assert!(
        out.contains("the index has no manifest for linux/mips"),
        "{out}"
    );
}

/// A tmux server of the test's own, killed on drop.
struct Tmux {
    dir: TempDir,
}

impl Tmux {
    /// Runs `line` in a new session of a fixed size; the pane stays after
    /// the command, showing its exit code.
    fn start(line: &str) -> Tmux {
        let t = Tmux {
            dir: temp_dir("tmux"),
        };
        let shell = format!("{line}; echo exit=$?; read x");
        let st = t
            .tmux()
            .args([
                "new-session",
                "-d",
                "-x",
                "150",
                "-y",
                "20",
                "-s",
                "t",
                &shell,
            ])
            .status()
            .expect("tmux is installed");
        assert!(st.success(), "tmux starts a session");
        t
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(self.dir.path().join("sock"))
            .arg("-f")
            .arg("/dev/null");
        c
    }

    fn pane(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux().arg("kill-server").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_shows_as_bars_on_a_terminal_and_lines_in_a_pipe() {
    let reg = Registry::start();
    let url = reg.url();
    push_image(&url, "team/big", "v1", 3, &[8 * MIB, 8 * MIB, 8 * MIB]).await;
    let piped = push_image(&url, "team/big", "v2", 4, &[8 * MIB, 4 * MIB]).await;
    // Slow enough for the bar to be seen, on a loaded machine too: 24 MiB
    // at 4 MiB/s, redrawn every 250 ms.
    let node = Node::start(&url, &["--upstream-rate", "4MiB/s"]);
    let tmux = Tmux::start(&node.ctl_line("prefetch", &["team/big:v1"]));
    let mut bar = None;
    let mut pane = String::new();
    wait_until(
        || {
            pane = tmux.pane();
            // A bar with a rate in MiB/s and an ETA, once bytes flow (the
            // first samples may show the budget's first wait).
            bar = bar.take().or_else(|| {
                pane.lines()
                    .find(|l| l.starts_with("team/big:v1 [") && l.contains(" MiB/s ETA "))
                    .map(str::to_owned)
            });
            pane.contains("exit=")
        },
        "the prefetch in tmux ended",
    )
    .await;
    let bar =
        bar.unwrap_or_else(|| panic!("a progress bar was on the terminal; at the end:\n{pane}"));
    assert!(
        bar.contains("/24.0 MiB ") && bar.contains("] ") && bar.contains(" MiB/s ETA "),
        "the bar shows bytes done of the total, the rate and the ETA: {bar}"
    );
    assert!(pane.contains("exit=0"), "the prefetch succeeded:\n{pane}");
    let done = pane
        .lines()
        .find(|l| l.starts_with("team/big:v1: done sha256:"))
        .unwrap_or_else(|| panic!("the final line says done:\n{pane}"));
    assert!(done.contains(" 24.0 MiB in "), "{done}");
    assert!(
        !pane.contains("team/big:v1 ["),
        "the bar was replaced in place by the final line:\n{pane}"
    );
    eprintln!("bar seen in tmux: {bar}\nfinal: {done}");

    let (code, out, err) = output(node.ctl("prefetch", &["team/big:v2"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains('\x1b'),
        "no escape sequences in a pipe: {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("team/big:v2: resolved {} ", piped.manifest)),
        "{out}"
    );
    assert!(
        lines.last().unwrap().starts_with(&format!(
            "team/big:v2: done {} 12.0 MiB in ",
            piped.manifest
        )),
        "{out}"
    );
    assert!(lines.len() <= 11, "at most a line per tenth between: {out}");
    eprintln!("in a pipe:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_image_fails_the_command() {
    let reg = Registry::start();
    let url = reg.url();
    push_image(&url, "team/app", "v1", 5, &[MIB]).await;
    let node = Node::start(&url, &[]);
    let (code, out, err) = output(node.ctl("prefetch", &["team/app:v1", "team/app:nope"]));
    assert_eq!(code, 1, "a missing image fails the command: {out}{err}");
    assert!(out.contains("team/app:v1: done sha256:"), "{out}");
    assert!(
        out.contains("team/app:nope: failed: manifest team/app:nope: 404"),
        "the failure says what the upstream said: {out}"
    );

    let (code, _, err) = output(node.ctl("prefetch", &["Team/App"]));
    assert_eq!(code, 2, "a bad ref is a usage error: {err}");
    assert!(err.contains("`Team/App` is not an image ref"), "{err}");
    let mut elsewhere = Command::new(regproxy_bin());
    elsewhere
        .args([
            "prefetch",
            "--admin",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .arg("team/app:v1");
    let (code, _, err) = output(elsewhere);
    assert_eq!(code, 2, "a proxy that cannot be asked is exit 2: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetch_auth_file_opens_a_private_upstream() {
    let (reg, _htpasswd) = Registry::start_private(&[("puller", "secret")]);
    let url = reg.url();
    // base64("puller:secret")
    let basic = [("authorization", "Basic cHVsbGVyOnNlY3JldA==")];
    let img = push_image_as(&url, &basic, "team/private", "v1", 6, &[MIB]).await;
    let auth = temp_dir("auth");
    let file = auth.path().join("config.json");
    let config = serde_json::json!({"auths": {
        "elsewhere.example:5000": {"auth": "b3RoZXI6eA=="},
        format!("http://{}", reg.addr): {"auth": "cHVsbGVyOnNlY3JldA=="},
    }});
    std::fs::write(&file, config.to_string()).unwrap();

    let with = Node::start(&url, &["--prefetch-auth-file", file.to_str().unwrap()]);
    let (code, out, err) = output(with.ctl("prefetch", &["team/private:v1"]));
    assert_eq!(
        code, 0,
        "with the credential the prefetch succeeds: {out}{err}"
    );
    with.proxy.fills_done().await;
    assert!(with.cached(&img.layers[0]), "the layer is in the cache");
    // What the prefetch's credential fetched goes to clients under the
    // same rules: an anonymous one is not given it.
    let (status, _, _) = get(
        &format!(
            "{}/v2/team/private/blobs/{}",
            with.proxy.url(),
            img.layers[0]
        ),
        &[],
    )
    .await;
    assert_eq!(status, 401, "an anonymous client gets no prefetched blob");
    let (status, _, body) = get(
        &format!(
            "{}/v2/team/private/blobs/{}",
            with.proxy.url(),
            img.layers[0]
        ),
        &basic,
    )
    .await;
    assert_eq!(status, 200, "a client with the credential does");
    assert_eq!(body.unwrap().len(), MIB);

    let without = Node::start(&url, &[]);
    let (code, out, err) = output(without.ctl("prefetch", &["team/private:v1"]));
    assert_eq!(code, 1, "without the credential it fails: {out}{err}");
    assert!(
        out.contains("team/private:v1: failed: manifest team/private:v1: 401"),
        "{out}"
    );
}

/// Lines of a running command's stdout as they come.
struct Stream {
    rx: mpsc::Receiver<(Instant, String)>,
    lines: Vec<(Instant, String)>,
}

impl Stream {
    fn of(stdout: std::process::ChildStdout) -> Stream {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), l));
            }
        });
        Stream {
            rx,
            lines: Vec::new(),
        }
    }

    /// The first line so far that `is_it` picks, and when it came.
    fn find(&mut self, is_it: impl Fn(&Value) -> bool) -> Option<(Instant, Value)> {
        self.lines.extend(self.rx.try_iter());
        self.lines.iter().find_map(|(t, l)| {
            let v: Value = serde_json::from_str(l).ok()?;
            is_it(&v).then_some((*t, v))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_during_a_large_prefetch_gets_its_first_blob_before_it_ends() {
    let reg = Registry::start();
    let url = reg.url();
    push_image(&url, "team/large", "v1", 7, &[16 * MIB, 16 * MIB, 16 * MIB]).await;
    let small = push_image(&url, "team/small", "v1", 8, &[2 * MIB]).await;
    // 16 Mbit/s: the 48 MiB prefetch takes about 25 s alone.
    let node = Node::start(&url, &["--upstream-rate", "16Mbit/s"]);
    let mut child = node
        .ctl("prefetch", &["--json", "team/large:v1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = Stream::of(child.stdout.take().unwrap());
    let started = Instant::now();
    wait_until(
        || {
            events
                .find(|e| e["event"] == "progress" && e["done"].as_u64() > Some(0))
                .is_some()
        },
        "the prefetch's bytes flow",
    )
    .await;
    let pull_started = Instant::now();
    let proxy = node.proxy.url();
    let (status, _, body) = get(
        &format!("{proxy}/v2/team/small/manifests/v1"),
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await;
    assert_eq!(status, 200, "the client gets its manifest");
    assert_eq!(sha256_digest(&body.unwrap()), small.manifest);
    let (status, _, body) = get(
        &format!("{proxy}/v2/team/small/blobs/{}", small.layers[0]),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), small.layers[0]);
    let pulled = Instant::now();
    assert!(
        events
            .find(|e| e["event"] == "done" || e["event"] == "failed")
            .is_none(),
        "the client's blob came while the prefetch still ran"
    );
    let mut done = None;
    wait_until(
        || {
            done = events.find(|e| e["event"] == "summary");
            done.is_some()
        },
        "the prefetch ended",
    )
    .await;
    assert!(child.wait().unwrap().success(), "the prefetch succeeded");
    let (ended, _) = events.find(|e| e["event"] == "done").expect("a done event");
    eprintln!(
        "prefetch of 48 MiB at 16Mbit/s: {:.1}s; a 2 MiB pull started {:.1}s in took {:.2}s, {:.1}s before the prefetch ended",
        (ended - started).as_secs_f64(),
        (pull_started - started).as_secs_f64(),
        (pulled - pull_started).as_secs_f64(),
        (ended - pulled).as_secs_f64(),
    );
    assert!(pulled < ended, "the pull ended before the prefetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefetch_stops_when_its_client_hangs_up() {
    let reg = Registry::start();
    let url = reg.url();
    let img = push_image(&url, "team/six", "v1", 9, &[4 * MIB; 6]).await;
    // Three blobs at a time at 4 MiB/s: the fourth layer cannot start
    // within the first second.
    let node = Node::start(&url, &["--upstream-rate", "4MiB/s"]);
    let mut child = node
        .ctl("prefetch", &["--json", "team/six:v1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = Stream::of(child.stdout.take().unwrap());
    wait_until(
        || {
            events
                .find(|e| e["event"] == "progress" && e["done"].as_u64() > Some(0))
                .is_some()
        },
        "the prefetch's bytes flow",
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        || node.proxy.logs().contains("prefetch stopped"),
        "the proxy saw its client hang up and stopped the prefetch",
    )
    .await;
    let fetched = node.proxy.settled(&reg).await;
    for d in &img.layers[3..] {
        assert_eq!(reg.blob_gets(d), 0, "{d} was not started after the hang-up");
    }
    for d in &img.layers[..2] {
        assert!(node.cached(d), "the fill of {d}, started before, finished");
    }
    eprintln!("blob GETs of the 7 blobs once the client hung up: {fetched}");
}
