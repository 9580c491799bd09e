//! The uplink budget (issue 12): `serve --upstream-rate` caps what this node
//! takes from the upstream, measured on the upstream's side.
//!
//! - a cold pull of three 12 MiB blobs at once with `--upstream-rate
//!   20Mbit/s` across a link shaped to 100 Mbit/s: Debian's
//!   `docker-registry` sends at most 21 Mbit/s, over the whole pull and over
//!   any 5 s of it (from its own log of each response's bytes, start and
//!   end); the same pull without a rate gets over 50 Mbit/s, so the link
//!   was not what held it back;
//! - `PUT /admin/rate` from 4 Mbit/s to unlimited in the middle of a fill
//!   takes effect within a second (the proxy's count of upstream bytes,
//!   sampled); `GET /admin/rate` and `regproxy rate` say the rate;
//! - the budget counts upstream bytes only: a node with `--upstream-rate
//!   2Mbit/s` gets a 32 MiB blob from its peer (the blob's owner, with no
//!   rate) in far less than the budget's time, and its upstream byte count
//!   stays 0.
//!
//! They need root (for `ip netns` and `tc`) and `docker-registry`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::peers::*;
use support::shaped::{rates, sent, Acked, Rates, ShapedUpstream};
use support::*;

const REPO: &str = "team/budget";
const MBIT: f64 = 1e6;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// What the upstream's log says it sent after byte `from` of its log:
/// the successful blob GETs, and their rates.
fn blob_rates(up: &Registry, from: usize) -> Rates {
    let log = up.log();
    let blobs: Vec<_> = sent(&log[from..])
        .into_iter()
        .filter(|s| s.is_blob_get() && matches!(s.status, 200 | 206))
        .collect();
    rates(&blobs)
}

/// What the upstream sent for a pull.
struct Pulled {
    /// From its log.
    log: Rates,
    /// The most its connections got acknowledged in any 5 s, bits/s.
    acked_5s: f64,
    acked: u64,
}

/// A cold pull of `digests` through a fresh proxy with `args`, each blob
/// by one client, all at once; what the upstream sent for them.
async fn cold_pull(up: &ShapedUpstream, digests: &[String], args: &[&str]) -> Pulled {
    let cache = temp_dir("budget-cache");
    let proxy = Proxy::start(&up.url(), cache.path(), args);
    proxy.wait_learned_open();
    let from = up.registry.log().len();
    let acked = Acked::start(up);
    let urls: Vec<String> = digests
        .iter()
        .map(|d| format!("{}/v2/{REPO}/blobs/{d}", proxy.url()))
        .collect();
    let got = Clients::start(&urls, 1).results().await;
    for (g, d) in got.iter().zip(digests) {
        assert!(
            verified(g, d),
            "the client of {d} should get it whole: {g:?}"
        );
    }
    let (acked_5s, acked) = acked.finish(Duration::from_secs(5));
    let gets = proxy.settled(&up.registry).await;
    assert!(
        gets >= digests.len(),
        "each blob should be fetched upstream"
    );
    Pulled {
        log: blob_rates(&up.registry, from),
        acked_5s,
        acked,
    }
}

fn show(what: &str, p: &Pulled) {
    let r = &p.log;
    println!(
        "{what}: the log: {} bytes in {:.2} s, {:.2} Mbit/s, each {:?} Mbit/s; \
         acknowledged: {} bytes, at most {:.2} Mbit/s in 5 s",
        r.bytes,
        r.span,
        r.overall / MBIT,
        r.each
            .iter()
            .map(|e| (e / MBIT * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        p.acked,
        p.acked_5s / MBIT,
    );
}

#[test]
fn a_rate_of_20_mbit_on_a_100_mbit_link_holds_the_upstream_to_21_mbit() {
    let rt = runtime();
    let up = ShapedUpstream::start(100);
    // Two sets of three blobs: one pulled under the rate, one without it
    // (each cold for its proxy).
    let digests: Vec<Vec<String>> = (0..2u64)
        .map(|set| {
            (0..3u64)
                .map(|i| {
                    up.registry
                        .put_blob_files(REPO, &blob(12 << 20, 1200 + set * 10 + i))
                })
                .collect()
        })
        .collect();
    rt.block_on(async {
        let capped = cold_pull(&up, &digests[0], &["--upstream-rate", "20Mbit/s"]).await;
        show("--upstream-rate 20Mbit/s", &capped);
        let log = &capped.log;
        assert_eq!(log.each.len(), 3, "one upstream GET per blob: {log:?}");
        assert!(
            log.overall <= 21.0 * MBIT,
            "the upstream's log should show at most 21 Mbit/s over the pull: {log:?}"
        );
        assert!(
            log.span >= 10.0,
            "3 × 12 MiB at 20 Mbit/s should take over 10 s (15 s at the rate): {log:?}"
        );
        // A connection that closes between two samples takes what it got
        // acknowledged since the last one with it: 1 % allowed for.
        assert!(
            capped.acked as f64 >= 0.99 * (3 * (12 << 20)) as f64,
            "the sampler should have seen the blobs' bytes acknowledged ({} bytes)",
            capped.acked
        );
        assert!(
            capped.acked_5s <= 21.0 * MBIT,
            "the upstream should send at most 21 Mbit/s in any 5 s, sent {:.2} Mbit/s",
            capped.acked_5s / MBIT
        );

        let free = cold_pull(&up, &digests[1], &[]).await;
        show("no rate", &free);
        assert!(
            free.log.overall >= 50.0 * MBIT,
            "without a rate the same pull should get over 50 Mbit/s from the 100 Mbit/s link: {:?}",
            free.log
        );
    });
}

/// A request to the admin API with the token; status and the JSON answer.
async fn admin(
    proxy: &Proxy,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let (st, _, got) = request(
        method,
        &format!("http://{}{path}", proxy.admin),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    let got = got.expect("the admin API answers whole");
    let json = serde_json::from_slice(&got).unwrap_or_else(|e| {
        panic!(
            "{path} should answer JSON ({e}): {}",
            String::from_utf8_lossy(&got)
        )
    });
    (st, json)
}

/// `regproxy rate ARGS` against `proxy`'s admin listener: its stdout.
fn rate_cli(proxy: &Proxy, token: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(regproxy_bin())
        .arg("rate")
        .args(["--admin", &format!("http://{}", proxy.admin)])
        .arg("--admin-token-file")
        .arg(token)
        .args(args)
        .output()
        .unwrap();
    succeeded(out, &format!("regproxy rate {args:?}"))
}

#[test]
fn a_rate_put_through_the_admin_api_takes_effect_within_a_second() {
    let rt = runtime();
    let reg = Registry::start();
    let digest = reg.put_blob_files(REPO, &blob(16 << 20, 1300));
    let (_dir, token) = token_file();
    let cache = temp_dir("budget-cache");
    let proxy = Proxy::start(
        &reg.url(),
        cache.path(),
        &[
            "--upstream-rate",
            "4Mbit/s",
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
    );
    proxy.wait_learned_open();
    let said: serde_json::Value = serde_json::from_str(&rate_cli(&proxy, &token, &["--json"]))
        .expect("regproxy rate --json prints JSON");
    assert_eq!(
        said["rate"], 500_000,
        "regproxy rate should say 4 Mbit/s in bytes per second: {said}"
    );
    assert_eq!(
        rate_cli(&proxy, &token, &[]),
        "upstream rate: 4.0 Mbit/s\n",
        "regproxy rate should print the rate for a person"
    );
    rt.block_on(async {
        assert_eq!(
            admin(&proxy, Method::GET, "/admin/rate", None).await,
            (StatusCode::OK, serde_json::json!({"rate": 500_000})),
            "GET /admin/rate should say the rate it was started with"
        );
        let upstream = || async { proxy.metric(UPSTREAM_BYTES).await };
        let base = upstream().await;
        let client = Clients::start(&[format!("{}/v2/{REPO}/blobs/{digest}", proxy.url())], 1);
        // Past the token bucket's burst, then 1 s worth at the rate.
        wait_for(
            || async { upstream().await >= base + (256 << 10) },
            "the fill has taken 256 KiB from the upstream",
        )
        .await;
        let (t1, b1) = (Instant::now(), upstream().await);
        wait_for(
            || async { upstream().await >= b1 + 1_000_000 },
            "the fill takes another 1 MB (2 s at the rate: the polls' jitter is small beside it)",
        )
        .await;
        let (t2, b2) = (Instant::now(), upstream().await);
        let before = (b2 - b1) as f64 * 8.0 / (t2 - t1).as_secs_f64();
        println!("at 4Mbit/s the fill took {:.2} Mbit/s", before / MBIT);
        assert!(
            before <= 4.4 * MBIT,
            "at 4Mbit/s the fill should take at most 4.4 Mbit/s, took {:.2}",
            before / MBIT
        );

        let (st, answer) = admin(
            &proxy,
            Method::PUT,
            "/admin/rate",
            Some(serde_json::json!({"rate": "off"})),
        )
        .await;
        let put = Instant::now();
        assert_eq!(
            (st, answer),
            (StatusCode::OK, serde_json::json!({"rate": 0})),
            "PUT /admin/rate off should answer the new rate, 0 (unlimited)"
        );
        // 2 MB: 4 s at the old rate, milliseconds on loopback without one.
        let b0 = upstream().await;
        wait_for(
            || async { upstream().await >= b0 + 2_000_000 },
            "the fill takes 2 MB more",
        )
        .await;
        let took = put.elapsed();
        println!("after PUT /admin/rate off, 2 MB more in {took:?}");
        assert!(
            took < Duration::from_secs(1),
            "a rate set through the admin API should take effect within 1 s, 2 MB took {took:?}"
        );
        let got = client.results().await;
        assert!(
            verified(&got[0], &digest),
            "the client gets the blob whole: {got:?}"
        );
        println!("the client had the blob {:?} after the PUT", put.elapsed());
        assert_eq!(proxy.metric("regproxy_upstream_rate_bytes").await, 0);
    });
    assert_eq!(
        rate_cli(&proxy, &token, &["8Mbit/s", "--json"])
            .parse::<serde_json::Value>()
            .expect("regproxy rate RATE --json prints JSON")["rate"],
        1_000_000,
        "regproxy rate 8Mbit/s should set 1 MB/s"
    );
    rt.block_on(async {
        assert_eq!(
            admin(&proxy, Method::GET, "/admin/rate", None).await.1,
            serde_json::json!({"rate": 1_000_000}),
            "GET /admin/rate should say what regproxy rate set"
        );
        assert_eq!(
            proxy.metric("regproxy_upstream_rate_bytes").await,
            1_000_000
        );
    });
}

#[test]
fn a_node_with_a_low_rate_gets_a_blob_from_its_peer_at_lan_speed() {
    const LEN: usize = 32 << 20;
    let rt = runtime();
    let reg = Registry::start();
    let ips = loopback_ips(62, 2);
    let addrs = peer_addrs(&ips);
    let list = peer_list(&addrs);
    let (_dir, secret) = secret_file();
    let asker = start_node(
        ips[0],
        addrs[0],
        &list,
        &secret,
        &reg.url(),
        &["--upstream-rate", "2Mbit/s"],
    );
    let owner = start_node(ips[1], addrs[1], &list, &secret, &reg.url(), &[]);
    let (digest, _) = blob_owned_by(&reg, REPO, addrs[1], &addrs, (LEN, 1400));
    asker.proxy.wait_learned_open();
    owner.proxy.wait_learned_open();
    rt.block_on(async {
        wait_live(&[&asker, &owner], 1).await;
        let before = asker.metric0(UPSTREAM_BYTES).await;
        let t = Instant::now();
        let got = Clients::start(&[asker.blob_url(REPO, &digest)], 1)
            .results()
            .await;
        let took = t.elapsed();
        assert!(
            verified(&got[0], &digest),
            "the client gets the blob whole: {got:?}"
        );
        // 134 s at 2 Mbit/s.
        let budget = Duration::from_secs_f64(LEN as f64 * 8.0 / (2.0 * MBIT));
        println!("32 MiB from the peer in {took:?}; the budget would take {budget:?}");
        assert!(
            took < budget / 2,
            "bytes from a peer should not wait for the upstream budget: {took:?} (the budget: {budget:?})"
        );
        fills_done(&[&asker, &owner]).await;
        assert_eq!(
            asker.metric0(UPSTREAM_BYTES).await - before,
            0,
            "the asking node should take nothing of the blob from the upstream"
        );
        let received = asker.metric0(RECEIVED).await;
        assert!(
            received >= LEN as u64,
            "the asking node should get the blob from its peer ({received} bytes)"
        );
        assert!(owner.metric0(UPSTREAM_BYTES).await >= LEN as u64);
        assert_eq!(
            asker.metric0("regproxy_budget_wait_milliseconds_total{lane=\"pull\"}").await,
            0,
            "the asking node's pulls should never have waited for its budget"
        );
    });
}

#[test]
fn the_registrys_response_lines_parse() {
    let log = r#"time="2026-11-29T02:32:00.025734475Z" level=info msg="response completed" go.version=go1.19.8 http.request.host="127.0.0.1:45123" http.request.id=9225 http.request.method=GET http.request.remoteaddr="127.0.0.1:49016" http.request.uri=/v2/ http.request.useragent=curl/7.88.1 http.response.contenttype="application/json; charset=utf-8" http.response.duration=7.081107ms http.response.status=200 http.response.written=2
127.0.0.1 - - [29/Nov/2026:02:32:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
time="2026-11-29T02:32:01.5Z" level=error msg="response completed with error" err.code="blob unknown" http.request.method=GET http.request.uri="/v2/x/blobs/sha256:00" http.response.duration=1m2.5s http.response.status=404 http.response.written=157"#;
    let s = sent(log);
    assert_eq!(s.len(), 2, "both response lines should parse: {s:?}");
    assert_eq!(
        (s[0].uri.as_str(), s[0].status, s[0].bytes),
        ("/v2/", 200, 2)
    );
    assert!((s[0].end - s[0].start - 0.007081107).abs() < 1e-6);
    assert_eq!(
        s[0].end,
        support::shaped::rfc3339_seconds("2026-11-29T02:32:00.025734475Z").unwrap()
    );
    assert_eq!(
        support::shaped::rfc3339_seconds("1970-01-02T00:00:01Z"),
        Some(86_401.0)
    );
    assert_eq!(
        support::shaped::rfc3339_seconds("2000-03-01T00:00:00Z"),
        Some(951_868_800.0)
    );
    assert!(s[1].is_blob_get() && s[1].status == 404);
    assert!((s[1].end - s[1].start - 62.5).abs() < 1e-9);
    assert_eq!(support::shaped::go_duration_seconds("512µs"), Some(512e-6));
}

#[test]
fn rates_are_over_the_wall_time_and_each_response() {
    let at = |start: f64, end: f64, bytes: u64| support::shaped::Sent {
        method: "GET".into(),
        uri: "/v2/a/blobs/sha256:00".into(),
        status: 200,
        bytes,
        start,
        end,
    };
    // 10 MB in 10 s, and 6 MB in its last 2 s from a second response.
    let r = rates(&[at(0.0, 10.0, 10_000_000), at(8.0, 10.0, 6_000_000)]);
    assert!((r.overall - 16e6 * 8.0 / 10.0).abs() < 1.0);
    assert!((r.each[1] - 24e6).abs() < 1.0);
}
