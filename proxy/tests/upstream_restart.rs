//! The upstream killed (`kill -9`) and started again on the same address
//! and storage, ten times in the middle of one fill: the fill resumes each
//! time from the byte it lacks, the client gets the whole blob, verified,
//! and the upstream sends the blob about once.

mod support;

use support::*;

/// The blob: large enough for ten restarts in its middle. A registry
/// killed mid-answer does not cut it at once: what its kernel took already
/// (up to `net.ipv4.tcp_wmem`'s 4 MiB here) still arrives, then the
/// connection ends. Each restart so costs up to that much more of the blob
/// before the fill resumes; 64 MiB leaves room for ten of them.
const SIZE: usize = 64 << 20;

/// Bytes a resume may cost on top of the blob, over the ten restarts
/// together. A resume asks (with `Range`) from the first byte the fill has
/// not got, so what it costs is what crossed the gate but never reached
/// the fill when the connection ended, plus the head of each new answer.
/// The fill reads every byte the gate wrote before it sees the end, so the
/// first is nothing when the upstream dies, and at most what sits between
/// the gate and the fill (socket buffers, hyper's 64 KiB read buffer,
/// `upstream::READ_BUF`) if the proxy's side ever broke it: under 100 KiB
/// a restart, 1 MiB for ten. A head is under 1 KiB. A fill that started
/// over from byte 0 even once would cost megabytes more: the bound tells
/// the two apart.
const RESUME_WINDOW: u64 = 1 << 20;

const RESTARTS: u64 = 10;

/// Bytes of the blob that pass on a resumed connection before the next
/// kill: the fill is in the middle of the blob, streaming from the new
/// registry process.
const BETWEEN: u64 = 256 << 10;

#[test]
fn a_fill_resumes_across_ten_upstream_restarts_and_fetches_the_blob_about_once() {
    let mut reg = Registry::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = blob(SIZE, 77);
    let digest = reg.put_blob_files("team/big", &data);
    // A small receive buffer toward the upstream: of a killed registry's
    // answer, only its own send buffer (see `SIZE`) still comes, not also
    // what the gate's receive buffer would grow to behind a paced reader.
    let gate = rt.block_on(Gate::start_buffered(reg.addr, Some(32 << 10)));
    let cache = temp_dir("upstream-restart-cache");
    // The default retries: the point is that they suffice.
    let proxy = Proxy::start(&gate.url(), cache.path(), &[]);
    proxy.wait_learned_open();
    // 16 MiB/s: the blob takes four seconds, and each restart costs a
    // registry's socket buffer of it (see `SIZE`) before the cut.
    gate.throttle(16 << 20);
    let base = gate.passed();
    let url = format!("{}/v2/team/big/blobs/{digest}", proxy.url());
    let client = rt.spawn(async move { get(&url, &[]).await });

    let resumes = || rt.block_on(proxy.metric("regproxy_upstream_resumes_total"));
    for i in 1..=RESTARTS {
        let from = gate.passed();
        wait_blocking(
            || client.is_finished() || gate.passed() >= from + BETWEEN,
            &format!("the fill made progress before restart {i}"),
        );
        let before = resumes();
        reg.stop();
        if i % 2 == 0 {
            // Every other time the registry stays down until a resume has
            // found it gone: the fill waits and asks again.
            rt.block_on(wait_for(
                || async {
                    client.is_finished()
                        || proxy.metric("regproxy_upstream_resumes_total").await >= before + 2
                },
                &format!("a resume found the registry down after kill {i}"),
            ));
        }
        reg.restart();
        // The cut has reached the fill, which asked again (or the client is
        // done: cut, which the checks below report).
        rt.block_on(wait_for(
            || async {
                client.is_finished()
                    || proxy.metric("regproxy_upstream_resumes_total").await > before
            },
            &format!("the fill resumed after restart {i} (the blob is too small?)"),
        ));
    }

    let (status, _, body) = rt.block_on(client).unwrap();
    assert_eq!(status, http::StatusCode::OK);
    let body = body.unwrap_or_else(|e| {
        panic!(
            "the client gets the whole blob across {RESTARTS} upstream restarts; it was cut: {e}\n{}",
            proxy.logs()
        )
    });
    assert_eq!(body.len(), SIZE, "the client gets every byte of the blob");
    assert_eq!(
        sha256_digest(&body),
        digest,
        "the client's body hashes to the blob's digest"
    );
    rt.block_on(proxy.fills_done());
    assert!(
        proxy.cache_path(&digest).is_file(),
        "the fill committed the blob"
    );
    let resumes = resumes();
    assert!(
        resumes >= RESTARTS + RESTARTS / 2,
        "the fill resumed at least once per restart, twice when it found the registry \
         down ({resumes} resumes)"
    );
    let sent = gate.passed() - base;
    println!(
        "upstream bytes for a {SIZE}-byte blob across {RESTARTS} restarts: {sent} \
         (+{} over the blob), {resumes} resumes",
        sent - SIZE as u64
    );
    assert!(
        sent <= SIZE as u64 + RESUME_WINDOW,
        "the upstream sent {sent} bytes for a {SIZE}-byte blob across {RESTARTS} restarts: \
         more than the blob and one resume window ({RESUME_WINDOW})"
    );
}
