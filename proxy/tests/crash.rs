//! Crashes at every step, many times: regproxy is killed (`kill -9`) at a
//! random moment of each run, with fills in flight (paced through the
//! `Gate`), pushes and tag writes through it, tags moved upstream, and a
//! cache small enough that every run evicts. After each restart on the same
//! cache dir, everything that must survive any crash is checked: the
//! content hashes to its names, no temp file is left, the index matches the
//! disk under the cap, the state files parse, and every tag cached before
//! resolves, with the upstream cut off, to the digest it last had. One
//! restart in four is killed during its start-up first.
//!
//! `REGPROXY_CRASH_RUNS` (default 30) sets the runs, `REGPROXY_CRASH_SEED`
//! replays a seed the test printed; `scripts/crashloop.sh` runs many more.

mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::crash::*;
use support::*;

/// The cache's cap. A run starts with the cache full (`World::top_up`),
/// so its first fill evicts. What a run fills (at most ~3.9 MiB) is under
/// half the cap, and the manifests checked at its start are used after the
/// top-up: what it evicts is older than them.
const CAP: &str = "8MiB";
const REPO: &str = "crash/app";
const BLOBS: &str = "crash/blobs";
const TAGS: [&str; 4] = ["t0", "t1", "t2", "t3"];
/// Response bytes a second per upstream connection: a 512 KiB blob is in
/// flight for almost half a second.
const RATE: u64 = 1200 << 10;

/// What the test knows of the upstream and of what the proxy may hold.
struct World {
    reg: Registry,
    gate: Gate,
    switch: Switch,
    cache: TempDir,
    rng: Rng,
    /// Per tag, the digests the proxy may have last recorded for it: one
    /// once a pull or push of it completed, more while one was cut.
    proxy_may: HashMap<&'static str, BTreeSet<String>>,
    /// Per tag, the digests the upstream's tag may point at.
    upstream_may: HashMap<&'static str, BTreeSet<String>>,
    /// Tags that a client got through the proxy once: they must resolve
    /// offline from then on.
    cached: HashSet<&'static str>,
    /// Blobs in the upstream: digest and size.
    blobs: Vec<(String, usize)>,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    runs: u64,
    blob_gets: u64,
    blob_gets_whole: u64,
    pulls_whole: u64,
    pushes_done: u64,
    runs_evicting: u64,
    offline_checks: u64,
    killed_starting: u64,
}

/// What one operation of a run got.
enum Done {
    /// A blob GET: whether it came whole (its hash checked), else what it got.
    Blob(Result<(), String>),
    /// A pull of a tag: the digest its HEAD answered, whether all came whole.
    Pull(&'static str, Option<String>, bool),
    /// A push through the proxy: the digest its tag got, if it went through.
    Push(&'static str, Option<String>),
}

fn runs() -> u64 {
    std::env::var("REGPROXY_CRASH_RUNS").map_or(30, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("REGPROXY_CRASH_RUNS is a number, not {s:?}"))
    })
}

#[test]
fn kill_9_at_random_moments_leaves_a_cache_that_serves_every_tag_offline() {
    let seed = Rng::seed_from_env("REGPROXY_CRASH_SEED");
    let runs = runs();
    println!("crash loop: {runs} runs, seed {seed} (replay: REGPROXY_CRASH_SEED={seed})");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg = Registry::start();
    let gate = rt.block_on(Gate::start(reg.addr));
    let switch = rt.block_on(Switch::start(gate.addr));
    let mut w = World {
        reg,
        gate,
        switch,
        cache: temp_dir("crash-cache"),
        rng: Rng::new(seed),
        proxy_may: HashMap::new(),
        upstream_may: HashMap::new(),
        cached: HashSet::new(),
        blobs: Vec::new(),
        stats: Stats::default(),
    };
    for tag in TAGS {
        let d = rt.block_on(w.image_upstream(tag));
        w.upstream_may.insert(tag, BTreeSet::from([d]));
    }
    let started = Instant::now();
    for run in 0..runs {
        w.run(&rt, run, seed);
    }
    // The last run's crash is checked too.
    let proxy = w.restart(&rt, runs);
    w.check_tags_offline(
        &rt,
        &proxy,
        &format!("after run {} of seed {seed}", runs - 1),
    );
    drop(proxy);
    println!(
        "crash loop: {runs} runs, seed {seed}, {:.1} s, no invariant broken: {:?}",
        started.elapsed().as_secs_f64(),
        w.stats
    );
}

impl World {
    /// A new image for `tag` put straight into the upstream (a tag moved
    /// behind the proxy's back); returns its manifest digest.
    async fn image_upstream(&mut self, tag: &str) -> String {
        let (config, layer) = self.image_parts();
        self.reg.put_blob_files(REPO, &config);
        self.reg.put_blob_files(REPO, &layer);
        let m = image_manifest(&config, &[&layer]);
        try_push_manifest(&self.reg.url(), REPO, tag, &m)
            .await
            .expect("the upstream takes a manifest");
        sha256_digest(&m)
    }

    /// A fresh config and one layer of 16-128 KiB.
    fn image_parts(&mut self) -> (Vec<u8>, Vec<u8>) {
        let n = self.rng.next();
        let config = format!(r#"{{"architecture":"amd64","os":"linux","crash":"{n}"}}"#);
        let layer = blob(self.rng.range(16 << 10, 128 << 10) as usize, n);
        (config.into_bytes(), layer)
    }

    /// Starts regproxy on the cache dir with the upstream cut off and
    /// checks the dir and the index; returns it running.
    fn restart(&mut self, rt: &tokio::runtime::Runtime, run: u64) -> Proxy {
        let first = run == 0;
        // The first start learns that the upstream is open (kept in
        // open.json), as any node does before it serves offline.
        self.switch.set(first);
        let args = ["--cache-size", CAP, "--tag-ttl", "0s"];
        // One restart in four is itself killed during start-up first.
        if self.rng.chance(25) {
            let after = Duration::from_millis(self.rng.range(0, 40));
            start_and_kill(&self.switch.url(), self.cache.path(), &args, after);
            self.stats.killed_starting += 1;
        }
        let proxy = Proxy::start(&self.switch.url(), self.cache.path(), &args);
        if first {
            proxy.wait_learned_open();
        }
        let disk = check_cache_dir(self.cache.path());
        check_index(&rt.block_on(proxy.metrics()), disk);
        proxy
    }

    /// With the upstream cut off, every tag a client got through the proxy
    /// before resolves to the digest it last had, and its manifest is
    /// served (and so becomes the most recently used content).
    fn check_tags_offline(&mut self, rt: &tokio::runtime::Runtime, proxy: &Proxy, at: &str) {
        self.switch.set(false);
        for tag in TAGS {
            if !self.cached.contains(tag) {
                continue;
            }
            let may = &self.proxy_may[tag];
            let d = rt.block_on(resolve_offline(&proxy.url(), tag));
            let d = d.unwrap_or_else(|why| {
                panic!(
                    "{at}: tag {tag}, cached before, resolves with the upstream cut off \
                     (to one of {may:?}): {why}\n{}",
                    proxy.logs()
                )
            });
            assert!(
                may.contains(&d),
                "{at}: tag {tag} resolves offline to its last known digest, one of {may:?}, not {d}"
            );
            self.proxy_may.insert(tag, BTreeSet::from([d]));
            self.stats.offline_checks += 1;
        }
        self.switch.set(true);
    }

    /// Fills the cache up to its cap with one blob (what the last crash
    /// freed: the room its fills in flight had reserved), unpaced, so that
    /// the run's first fill evicts.
    fn top_up(&mut self, rt: &tokio::runtime::Runtime, proxy: &Proxy) {
        // Drawn whatever `free` is: the choices of a seed do not depend on
        // how the last run's timing went.
        let seed = self.rng.next();
        let m = rt.block_on(proxy.metrics());
        let free = m["regproxy_cache_capacity_bytes"] - m["regproxy_cache_bytes"];
        if free < 16 << 10 {
            return;
        }
        self.gate.throttle(0);
        let size = free as usize;
        let d = self.reg.put_blob_files(BLOBS, &blob(size, seed));
        let (st, _, body) = rt.block_on(get(&format!("{}/v2/{BLOBS}/blobs/{d}", proxy.url()), &[]));
        assert_eq!(st, StatusCode::OK, "the top-up pulls {d}");
        assert_eq!(
            sha256_digest(&body.unwrap()),
            d,
            "the top-up's blob is right"
        );
        rt.block_on(proxy.fills_done());
    }

    /// One run: restart and check, then traffic, killed at a random moment.
    fn run(&mut self, rt: &tokio::runtime::Runtime, run: u64, seed: u64) {
        let proxy = self.restart(rt, run);
        self.switch.set(true);
        self.top_up(rt, &proxy);
        // After the top-up: the manifests checked are then more recent than
        // all else, and the run's fills evict the top-up blob before them.
        self.check_tags_offline(rt, &proxy, &format!("run {run} of seed {seed}"));
        self.gate.throttle(RATE);
        let base = proxy.url();

        // The plan: 3-5 new blobs of 16-512 KiB, up to 2 older ones of at
        // most 512 KiB (hits or refills of evicted ones), a push through the proxy to one tag,
        // one tag moved upstream, every tag but the pushed one pulled.
        let mut gets: Vec<(String, usize)> = Vec::new();
        for _ in 0..self.rng.range(3, 5) {
            let size = self.rng.range(16 << 10, 512 << 10) as usize;
            let d = self.reg.put_blob_files(BLOBS, &blob(size, self.rng.next()));
            gets.push((d.clone(), size));
            self.blobs.push((d, size));
        }
        for _ in 0..self.rng.range(0, 2) {
            // The run's new blobs are in `blobs` already: never empty.
            let i = self.rng.range(0, self.blobs.len() as u64 - 1) as usize;
            gets.push(self.blobs[i].clone());
        }
        let pushed = TAGS[self.rng.range(0, 3) as usize];
        let moved = TAGS[self.rng.range(0, 3) as usize];
        if moved != pushed {
            let d = rt.block_on(self.image_upstream(moved));
            self.upstream_may.insert(moved, BTreeSet::from([d]));
        }
        let (config, layer) = self.image_parts();
        let m = image_manifest(&config, &[&layer]);
        let pushed_digest = sha256_digest(&m);
        // A cut push may or may not have moved the tag, upstream and in
        // the proxy; a cut pull may have recorded what the upstream said.
        for tag in TAGS {
            let up = self.upstream_may[tag].clone();
            if tag == pushed {
                self.upstream_may
                    .get_mut(tag)
                    .unwrap()
                    .insert(pushed_digest.clone());
                self.proxy_may
                    .entry(tag)
                    .or_default()
                    .insert(pushed_digest.clone());
            } else {
                self.proxy_may.entry(tag).or_default().extend(up);
            }
        }
        let expected: u64 = gets.iter().map(|(_, s)| *s as u64).sum::<u64>() + (300 << 10);
        let kill_after = self.rng.range(0, expected);
        let jitter = Duration::from_millis(self.rng.range(0, 30));

        let from = self.gate.passed();
        let mut tasks = Vec::new();
        for (d, size) in gets {
            let url = format!("{base}/v2/{BLOBS}/blobs/{d}");
            tasks.push(rt.spawn(async move {
                match try_request(Method::GET, &url, &[], Bytes::new()).await {
                    Ok((StatusCode::OK, _, body)) => {
                        assert!(
                            body.len() == size && sha256_digest(&body) == d,
                            "a blob answered whole is the blob {d}"
                        );
                        Done::Blob(Ok(()))
                    }
                    Ok((st, ..)) => Done::Blob(Err(format!("blob-{}", st.as_u16()))),
                    Err(_) => Done::Blob(Err("blob-cut".into())),
                }
            }));
        }
        for tag in TAGS {
            let base = base.clone();
            tasks.push(if tag == pushed {
                let (config, layer, m, d) = (
                    config.clone(),
                    layer.clone(),
                    m.clone(),
                    pushed_digest.clone(),
                );
                rt.spawn(async move {
                    let pushed = async {
                        try_push_blob(&base, REPO, &config).await?;
                        try_push_blob(&base, REPO, &layer).await?;
                        try_push_manifest(&base, REPO, tag, &m).await
                    };
                    Done::Push(tag, pushed.await.ok().map(|()| d))
                })
            } else {
                rt.spawn(async move {
                    let (d, whole) = try_pull(&base, tag).await;
                    Done::Pull(tag, d, whole)
                })
            });
        }

        // The moment: once a random share of the run's bytes came through
        // (or all is done), and a few milliseconds more.
        rt.block_on(async {
            let deadline = Instant::now() + PATIENCE;
            while self.gate.passed() - from < kill_after
                && !tasks.iter().all(|t| t.is_finished())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(jitter).await;
        });
        let evicted = rt.block_on(proxy.metrics())["regproxy_cache_evictions_total"];
        proxy.signal("-KILL");
        let killed_at = self.gate.passed() - from;
        drop(proxy);

        let mut line = format!(
            "run {run}: killed after {killed_at} of ~{expected} bytes (+{jitter:?}), {evicted} evicted;"
        );
        for t in tasks {
            match rt.block_on(t).expect("a run's task ends without a panic") {
                Done::Blob(got) => {
                    self.stats.blob_gets += 1;
                    self.stats.blob_gets_whole += u64::from(got.is_ok());
                    line.push(' ');
                    line.push_str(match &got {
                        Ok(()) => "blob",
                        Err(e) => e,
                    });
                }
                Done::Pull(tag, head, whole) => {
                    if let Some(d) = head {
                        let up = &self.upstream_may[tag];
                        assert!(
                            up.contains(&d),
                            "run {run}: the proxy resolved {tag} to {d}, one the upstream's tag \
                             may point at ({up:?})"
                        );
                        self.upstream_may.insert(tag, BTreeSet::from([d.clone()]));
                        self.proxy_may.insert(tag, BTreeSet::from([d]));
                        self.cached.insert(tag);
                    }
                    self.stats.pulls_whole += u64::from(whole);
                    line.push_str(&format!(" pull-{tag}{}", if whole { "" } else { "-cut" }));
                }
                Done::Push(tag, done) => {
                    line.push_str(&format!(
                        " push-{tag}{}",
                        if done.is_none() { "-cut" } else { "" }
                    ));
                    if let Some(d) = done {
                        self.upstream_may.insert(tag, BTreeSet::from([d.clone()]));
                        self.proxy_may.insert(tag, BTreeSet::from([d]));
                        self.cached.insert(tag);
                        self.stats.pushes_done += 1;
                    }
                }
            }
        }
        println!("{line}");
        self.stats.runs += 1;
        self.stats.runs_evicting += u64::from(evicted > 0);
    }
}

/// The digest `tag` resolves to (a `HEAD` by tag) and whether its manifest
/// comes whole and right by that digest.
async fn resolve_offline(base: &str, tag: &str) -> Result<String, String> {
    let accept = [("accept", ACCEPT_MANIFESTS)];
    let (st, h, _) = try_request(
        Method::HEAD,
        &format!("{base}/v2/{REPO}/manifests/{tag}"),
        &accept,
        Bytes::new(),
    )
    .await?;
    if st != StatusCode::OK {
        return Err(format!("HEAD by tag answered {st}"));
    }
    let d = h["docker-content-digest"].to_str().unwrap().to_owned();
    let (st, _, body) = try_request(
        Method::GET,
        &format!("{base}/v2/{REPO}/manifests/{d}"),
        &accept,
        Bytes::new(),
    )
    .await?;
    if st != StatusCode::OK || sha256_digest(&body) != d {
        return Err(format!(
            "GET manifest {d} answered {st} with {} bytes",
            body.len()
        ));
    }
    Ok(d)
}

/// A pull of `tag` in containerd's order: the digest its `HEAD` answered,
/// and whether the manifest, config and layers then all came whole. A
/// body that came whole must be right.
async fn try_pull(base: &str, tag: &str) -> (Option<String>, bool) {
    let accept = [("accept", ACCEPT_MANIFESTS)];
    let head = try_request(
        Method::HEAD,
        &format!("{base}/v2/{REPO}/manifests/{tag}"),
        &accept,
        Bytes::new(),
    )
    .await;
    let d = match head {
        Ok((StatusCode::OK, h, _)) => h["docker-content-digest"].to_str().unwrap().to_owned(),
        _ => return (None, false),
    };
    let Ok((StatusCode::OK, _, m)) = try_request(
        Method::GET,
        &format!("{base}/v2/{REPO}/manifests/{d}"),
        &accept,
        Bytes::new(),
    )
    .await
    else {
        return (Some(d), false);
    };
    assert_eq!(
        sha256_digest(&m),
        d,
        "a manifest answered whole is the one asked for"
    );
    for b in referenced(&m) {
        match try_request(
            Method::GET,
            &format!("{base}/v2/{REPO}/blobs/{b}"),
            &[],
            Bytes::new(),
        )
        .await
        {
            Ok((StatusCode::OK, _, body)) => {
                assert_eq!(sha256_digest(&body), b, "a blob answered whole is the blob");
            }
            _ => return (Some(d), false),
        }
    }
    (Some(d), true)
}

/// A start-up killed in the middle of sweeping a dead process's temp dir
/// leaves that dir for the next start to finish: its `owner` file goes
/// last. (Found by the crash loop: a sweep that lost `owner` first left a
/// dir taken for one being created, with a `.fill` in it, forever.)
#[test]
fn a_sweep_killed_midway_is_finished_by_the_next_start() {
    const FILES: usize = 20_000;
    let cache = temp_dir("crash-sweep-cache");
    let tmp = cache.path().join("tmp");
    for round in 0..10 {
        // A dead process's temp dir: owned, not locked, many files.
        let dead = tmp.join(format!("{round:032x}"));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("owner"), "1\n").unwrap();
        for i in 0..FILES {
            let n = ((round * FILES + i) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            std::fs::write(dead.join(format!("{n:016x}.part")), b"x").unwrap();
        }
        let mut child = spawn_serve("http://127.0.0.1:9", cache.path(), &[]);
        // Killed once the sweep has removed a share of the files that grows
        // each round (1/11 to 10/11): `owner` is somewhere in that order.
        let left = FILES * (10 - round) / 11;
        wait_blocking(
            || std::fs::read_dir(&dead).map_or(true, |d| d.count() < left),
            "regproxy's start-up sweeps the dead process's temp dir",
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            !dead.exists() || dead.join("owner").is_file(),
            "round {round}: a sweep killed midway leaves the dead dir gone or still owned \
             (so the next start sweeps it), not unowned with files in it"
        );
    }
    let proxy = Proxy::start("http://127.0.0.1:9", cache.path(), &[]);
    let left = temp_files(cache.path());
    assert!(
        left.is_empty(),
        "the next start sweeps what is left: {} files remain",
        left.len()
    );
    drop(proxy);
}
