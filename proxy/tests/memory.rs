//! Memory bounded in total, not per fill: two hundred cold fills at once,
//! each held in flight for seconds by a slow upstream, stay within a fixed
//! budget of anonymous memory.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

const BLOBS: usize = 200;
const SIZE: usize = 8 << 20;
/// What the proxy's anonymous memory must stay under (half its pod limit).
const PEAK_LIMIT: u64 = 64 << 20;

/// `count` distinct blobs of `SIZE` bytes stored in the registry as `repo`,
/// written by a few threads at once; their digests.
fn store_blobs(reg: &Registry, repo: &str, count: usize) -> Vec<String> {
    let base = blob(SIZE, 4242);
    let threads = 4;
    let per = count.div_ceil(threads);
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let base = &base;
                sc.spawn(move || {
                    let mut data = base.clone();
                    (t * per..((t + 1) * per).min(count))
                        .map(|i| {
                            // Distinct content: the blob's number in its first bytes.
                            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
                            reg.put_blob_files(repo, &data)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_cold_fills_at_once_keep_the_proxy_under_64_mib() {
    raise_fd_limit();
    let reg = Registry::start();
    let digests = store_blobs(&reg, "team/many", BLOBS);
    let gate = Gate::start(reg.addr).await;
    // 1 MiB/s per upstream connection: every fill takes 8 s or more, so all
    // two hundred are in flight at once for seconds.
    gate.throttle(1 << 20);
    let cache = temp_dir("cache");
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    let pid = proxy.pid();
    let rss = RssSampler::start(pid);

    // The most fills in flight, sampled every 100 ms (an interval between
    // samples, not a wait for anything).
    let max_fills = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (max_fills, admin) = (Arc::clone(&max_fills), proxy.admin);
        tokio::spawn(async move {
            loop {
                let url = format!("http://{admin}/metrics");
                let (_, _, body) = get(&url, &[]).await;
                let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
                if let Some(v) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("regproxy_fills_inflight "))
                {
                    max_fills.fetch_max(v.parse().unwrap(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = std::time::Instant::now();
    let pulls: Vec<_> = digests
        .iter()
        .map(|d| {
            let (client, d) = (client.clone(), d.clone());
            let url = format!("{}/v2/team/many/blobs/{d}", proxy.url());
            tokio::spawn(async move {
                let req = Request::get(&url).body(Empty::new()).unwrap();
                let resp = client.request(req).await.expect("the proxy answers");
                assert_eq!(resp.status(), StatusCode::OK, "{d} should be served");
                // Hashed as it streams: the test keeps no blob in memory.
                let mut body = resp.into_body();
                let (mut h, mut n) = (Sha256Digester::default(), 0usize);
                while let Some(f) = body.frame().await {
                    if let Ok(c) = f.expect("the body should not be cut").into_data() {
                        n += c.len();
                        h.update(&c);
                    }
                }
                assert_eq!(n, SIZE, "{d} should be whole");
                assert_eq!(h.finish(), d, "every body should hash to its digest");
            })
        })
        .collect();
    let all = async {
        for p in pulls {
            p.await.expect("a pull succeeded");
        }
    };
    tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .expect(
        "two hundred 8 MiB pulls through a 1 MiB/s-per-connection upstream finish within 5 minutes",
    );
    let took = started.elapsed();
    watcher.abort();
    let peak = rss.finish();
    let max_fills = max_fills.load(Ordering::SeqCst);
    eprintln!(
        "{BLOBS} cold fills of {} MiB: peak RssAnon {} KiB, at most {max_fills} fills in flight, {took:?}",
        SIZE >> 20,
        peak >> 10
    );
    assert_eq!(
        max_fills, BLOBS as u64,
        "all fills should have been in flight at once, or the test proves nothing"
    );
    assert!(
        peak <= PEAK_LIMIT,
        "peak RssAnon of the proxy was {} KiB; it should stay under {} KiB whatever the number of fills",
        peak >> 10,
        PEAK_LIMIT >> 10
    );
}
