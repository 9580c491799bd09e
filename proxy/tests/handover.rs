//! Zero-downtime replacement (issue 9): a successor `regproxy serve` with the
//! same `--listen` and `--cache-dir` starts beside the running one, and the
//! old one, sent SIGTERM, stops accepting and drains, while a real dockerd
//! and a client in containerd's order pull in a loop: five times over, one
//! of them in the middle of a 256 MiB cold fill. No pull may fail, no body
//! may be corrupt, and the upstream sends the big blob once.
//!
//! Everything runs in a network namespace of the test's own, where
//! `net.ipv4.tcp_migrate_req=1` (as `regproxy sysctl` sets it on a node):
//! without it the kernel resets the connections still queued in a closing
//! listener's backlog instead of moving them to the successor's, and a
//! host's setting is no test's to change.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::handover::{docker_cli, get_counting, get_verified, in_netns, listening_pids};
use support::netns::Netns;
use support::*;

const HANDOVERS: usize = 5;
/// The handover that the big blob's cold fill spans.
const BIG_AT: usize = 2;
const BIG: usize = 256 << 20;
/// Where the gate holds the big fill until a client of the successor is
/// following it: the fill is then surely still running in its predecessor.
const HELD_AT: u64 = 64 << 20;
/// New connections opened all at once as each predecessor is sent SIGTERM,
/// so that some are queued in its backlog when it closes its listener (the
/// kernel resets those unless `tcp_migrate_req` moves them) and some are
/// accepted but not yet read from when it starts draining (hyper's graceful
/// shutdown closes such a connection unanswered). Either way the client's
/// request was sent on a fresh connection, which Go's HTTP client (dockerd,
/// containerd) does not retry: a failed pull.
const BURST: usize = 100;
/// Bounds of each pull loop, besides stopping when the handovers are done.
const MAX_PULLS: u64 = 20_000;
const LOOP_TIME: Duration = Duration::from_secs(240);
/// Every process gets the same flags: room to finish a held fill.
const ARGS: &[&str] = &["--shutdown-grace", "90s"];

#[test]
fn five_handovers_under_docker_and_containerd_pulls_lose_no_pull_and_fetch_a_spanning_fill_once() {
    let ns = Netns::create();
    succeeded(
        ns.command("sysctl")
            .args(["-w", "net.ipv4.tcp_migrate_req=1"])
            .output()
            .unwrap(),
        "setting net.ipv4.tcp_migrate_req in the test's namespace",
    );
    in_netns(&ns, handovers);
}

/// Pulls that succeeded, and what went wrong with the others.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, SeqCst);
            }
            Err(why) => self.failed.lock().unwrap().push(why),
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(SeqCst)
    }

    fn attempts(&self) -> u64 {
        self.ok() + self.failed.lock().unwrap().len() as u64
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }
}

/// Sets the flag when dropped, also by a panic: the loops then end, and a
/// failing test does not wait out their time bound.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

fn keep_pulling(stop: &AtomicBool, tally: &Tally) -> bool {
    !stop.load(SeqCst) && tally.attempts() < MAX_PULLS
}

/// `docker pull` of each image in turn, its id checked, then `docker rmi`,
/// so that the next pull fetches every blob again; dockerd asks `/v2/`
/// first, as always.
fn docker_loop(docker: &Dockerd, images: &[(String, String)], stop: &AtomicBool, tally: &Tally) {
    let deadline = Instant::now() + LOOP_TIME;
    let run = |args: &[&str]| {
        let out = docker_cli(docker).args(args).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "docker {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    while keep_pulling(stop, tally) && Instant::now() < deadline {
        for (image, id) in images {
            let pulled = run(&["pull", image]).and_then(|_| {
                let got = run(&["image", "inspect", "-f", "{{.Id}}", image])?;
                run(&["rmi", image])?;
                if got == *id {
                    Ok(())
                } else {
                    Err(format!("docker pull {image} got image {got}, not {id}"))
                }
            });
            tally.record(pulled);
        }
    }
}

/// Pulls each repository's `v1` in containerd's order (no `/v2/` first),
/// every body checked against its digest.
async fn containerd_loop(
    base: String,
    repos: Vec<String>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let deadline = Instant::now() + LOOP_TIME;
    while keep_pulling(&stop, &tally) && Instant::now() < deadline {
        for repo in &repos {
            let (b, r) = (base.clone(), repo.clone());
            // The support client panics on a refused or reset connection:
            // its own task turns that into a failed pull.
            let pull = tokio::spawn(async move { containerd_order_pull(&b, &r, "v1", None).await });
            tally.record(match tokio::time::timeout(PATIENCE, pull).await {
                Ok(Ok(steps)) if all_ok(&steps) => Ok(()),
                Ok(Ok(steps)) => Err(format!("containerd order {repo}: {steps:?}")),
                Ok(Err(e)) => Err(format!("containerd order {repo}: {e}")),
                Err(_) => Err(format!("containerd order {repo}: not done in {PATIENCE:?}")),
            });
        }
    }
}

/// [`BURST`] GETs of a cached blob at once, each on a new connection.
async fn burst(url: String, digest: String) -> Vec<String> {
    let gets: Vec<_> = (0..BURST)
        .map(|_| {
            let (u, d) = (url.clone(), digest.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                get_verified(&u, &d)
                    .await
                    .map_err(|e| format!("{e} ({:?} after it was sent)", t.elapsed()))
            })
        })
        .collect();
    let mut failed = Vec::new();
    for g in gets {
        if let Err(why) = g.await.unwrap() {
            failed.push(why);
        }
    }
    failed
}

fn handovers() {
    let t0 = Instant::now();
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .unwrap()
            .trim(),
        "1",
        "the test runs in its namespace, where queued connections migrate"
    );
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let reg = Registry::start();
    let gate = rt.block_on(Gate::start(reg.addr));
    let docker = Dockerd::start();

    // Two images docker can run, made without any network and pushed
    // straight to the upstream; three for the containerd order; one blob
    // of 256 MiB, written into the upstream's storage.
    let docker_images: Vec<(String, String)> = (0..2u64)
        .map(|i| {
            let root = temp_dir("rootfs");
            std::fs::write(root.path().join("data.bin"), blob(2 << 20, 10 + i)).unwrap();
            let upstream_ref = format!("{}/team/d{i}:v1", reg.addr);
            let id = docker.push_imported(root.path(), &upstream_ref);
            (format!("team/d{i}:v1"), id)
        })
        .collect();
    let repos: Vec<String> = (0..3u64)
        .map(|i| {
            let repo = format!("team/c{i}");
            let config = format!("{{\"image\":{i}}}");
            rt.block_on(push_manifest(
                &reg.url(),
                &repo,
                "v1",
                config.as_bytes(),
                &[&blob(256 << 10, 20 + i), &blob(1 << 20, 30 + i)],
            ));
            repo
        })
        .collect();
    // The burst's blob: the first image's config, cached by its first pull.
    let small = sha256_digest(b"{\"image\":0}");
    let big = reg.put_blob_files("team/big", &blob(BIG, 99));

    let cache = temp_dir("cache");
    // A fixed port, as on a node: a process on port 0 has no address a
    // successor could share. Free for sure: the namespace is this test's.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut current = Proxy::start_on(&listen, &gate.url(), cache.path(), ARGS);
    let addr = current.addr;
    let url = current.url();
    let big_url = format!("{url}/v2/team/big/blobs/{big}");
    let small_url = format!("{url}/v2/team/c0/blobs/{small}");
    let node_images: Vec<(String, String)> = docker_images
        .into_iter()
        .map(|(path, id)| (format!("{REGISTRY_NAME}:{}/{path}", addr.port()), id))
        .collect();
    let set_up = t0.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let (dk, cd) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let mut burst_failures = Vec::new();
    let mut big_seen = String::new();
    let handing_over = Instant::now();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let docker_thread = s.spawn(|| docker_loop(&docker, &node_images, &stop, &dk));
        let containerd_task = rt.spawn(containerd_loop(
            url.clone(),
            repos.clone(),
            Arc::clone(&stop),
            Arc::clone(&cd),
        ));
        for n in 0..HANDOVERS {
            // Both clients pull from this process before it is replaced.
            let (d0, c0) = (dk.attempts(), cd.attempts());
            wait_blocking(
                || dk.attempts() > d0 && cd.attempts() > c0,
                &format!("docker and the containerd order each pulled once more from P{n}"),
            );
            let mut big_pull = None;
            if n == BIG_AT {
                // The cold fill starts in P{n}, and is held at the gate
                // until a client of the successor follows it.
                let before = gate.passed();
                gate.hold_after(HELD_AT);
                let progress = Arc::new(AtomicU64::new(0));
                let a = rt.spawn(get_counting(big_url.clone(), Arc::clone(&progress)));
                wait_blocking(
                    || gate.passed() >= before + HELD_AT,
                    &format!("P{n}'s fill of the big blob reached the gate's hold"),
                );
                big_pull = Some((a, progress, before));
            }
            let next = Proxy::start_on(&listen, &gate.url(), cache.path(), ARGS);
            let readyz = format!("http://{}/readyz", next.admin);
            rt.block_on(wait_for(
                || async { get(&readyz, &[]).await.0 == StatusCode::OK },
                &format!("P{} beside P{n} answers /readyz with 200", n + 1),
            ));
            let queued = rt.spawn(burst(small_url.clone(), small.clone()));
            current.signal("-TERM");
            wait_blocking(
                || !listening_pids(addr.port()).contains(&current.pid()),
                &format!("P{n}, sent SIGTERM, closed its listener"),
            );
            assert!(
                listening_pids(addr.port()).contains(&next.pid()),
                "P{} listens on {addr} once P{n} stopped listening",
                n + 1
            );
            if let Some((a, a_progress, before)) = big_pull.take() {
                // Only the successor accepts now: B asks it for the blob
                // that P{n} is still filling.
                let b_progress = Arc::new(AtomicU64::new(0));
                let b = rt.spawn(get_counting(big_url.clone(), Arc::clone(&b_progress)));
                wait_blocking(
                    || b_progress.load(SeqCst) > 0 || b.is_finished(),
                    &format!(
                        "P{} sends the first bytes of the blob P{n} is filling",
                        n + 1
                    ),
                );
                let (a_at, b_at) = (a_progress.load(SeqCst), b_progress.load(SeqCst));
                assert!(
                    a_at < BIG as u64 && gate.passed() < before + BIG as u64,
                    "P{n} was still filling the big blob when P{} answered for it",
                    n + 1
                );
                gate.open();
                let (ra, rb) = (rt.block_on(a).unwrap(), rt.block_on(b).unwrap());
                for (who, r) in [(n, ra), (n + 1, rb)] {
                    assert_eq!(
                        r,
                        Ok((StatusCode::OK, big.clone(), BIG as u64)),
                        "the client of P{who} gets the whole big blob, verified"
                    );
                }
                big_seen = format!(
                    "B got its first bytes from P{} while A had {a_at} of P{n}'s fill ({b_at} for B)",
                    n + 1
                );
            }
            burst_failures.extend(rt.block_on(queued).unwrap());
            assert!(
                current.wait_exit(2 * PATIENCE),
                "P{n} drains and exits 0 after SIGTERM"
            );
            current = next;
        }
        stop.store(true, SeqCst);
        docker_thread.join().unwrap();
        rt.block_on(containerd_task).unwrap();
    });
    let handing_over = handing_over.elapsed();

    let big_gets = rt.block_on(reg.blob_gets_logged(&big, 1));
    eprintln!(
        "handover: {HANDOVERS} handovers in {handing_over:?} (set-up {set_up:?}); docker pulls \
         {} ok, {} failed; containerd-order pulls {} ok, {} failed; burst GETs {} ok, {} failed; \
         {big_gets} upstream GET(s) of the big blob; {big_seen}",
        dk.ok(),
        dk.failures().len(),
        cd.ok(),
        cd.failures().len(),
        HANDOVERS * BURST - burst_failures.len(),
        burst_failures.len(),
    );
    for (what, failed) in [
        ("docker pull", dk.failures()),
        ("pull in containerd's order", cd.failures()),
        (
            "GET on a connection opened as a handover began",
            burst_failures,
        ),
    ] {
        assert!(
            failed.is_empty(),
            "no {what} fails, but {} did; the first: {:#?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }
    assert_eq!(
        big_gets, 1,
        "the upstream sent the big blob once, however many processes served it"
    );
    wait_blocking(
        || std::fs::metadata(current.cache_path(&big)).is_ok_and(|m| m.len() == BIG as u64),
        "the big blob is committed in the cache dir",
    );
    let tmp = cache.path().join("tmp");
    wait_blocking(
        || std::fs::read_dir(&tmp).is_ok_and(|d| d.count() == 1),
        "the last process has swept its predecessors' temp dirs, leaving only its own",
    );
}
