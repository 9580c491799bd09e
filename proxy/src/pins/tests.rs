use bytes::Bytes;

use super::*;
use crate::metrics::Metrics;

struct Node {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
}

fn node(cap: u64) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let metrics = Arc::new(Metrics::default());
    let cache = Arc::new(Cache::open(&dir, cap, Arc::clone(&metrics), true).unwrap());
    Node {
        _tmp: tmp,
        dir,
        cache,
        metrics,
    }
}

impl Node {
    fn pins(&self) -> Arc<Pins> {
        let c = Arc::clone(&self.cache);
        Arc::new(Pins::open(&self.dir, c, None, Duration::ZERO))
    }

    /// Puts `parts` in the cache; the image they make.
    async fn image(&self, parts: &[&[u8]]) -> Got {
        let mut digests = Vec::new();
        for p in parts {
            let d = Digest::of(p);
            let b = Bytes::copy_from_slice(p);
            self.cache.put_manifest(d.clone(), "t".into(), b).await;
            digests.push(d);
        }
        let bytes = parts.iter().map(|p| p.len() as u64).sum();
        Got {
            top: digests[0].clone(),
            digests,
            bytes,
        }
    }
}

fn key(r: &str) -> Key {
    Key::new(r, Some("linux/amd64")).unwrap()
}

fn entry(r: &str, pin: bool) -> file::Entry {
    file::Entry { key: key(r), pin }
}

#[tokio::test]
async fn a_pin_survives_a_restart_and_pins_its_digests() {
    let n = node(1 << 20);
    let pins = n.pins();
    assert_eq!(pins.every, MIN_REVALIDATE, "the revalidation has a floor");
    let got = n.image(&[b"manifest-a", b"layer-a"]).await;
    let incomplete = pins
        .fetched(&key("team/app:v1"), Some(Source::Api), &got)
        .await;
    assert!(!incomplete, "everything it got is in the cache");
    let listed = pins.list();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].complete && pins.offline_ready(&listed[0]));
    assert_eq!(listed[0].bytes, 17);
    for d in &got.digests {
        assert!(n.cache.is_pinned(d));
    }
    drop(pins);
    let again = n.pins();
    assert_eq!(again.list(), listed, "pins.json keeps the pins");
    let soonest = again.next_due().expect("a pinned tag is revalidated");
    assert!(
        soonest >= Instant::now() + MIN_REVALIDATE - Duration::from_secs(1),
        "a complete pin is not fetched again at start, only revalidated a period later"
    );
    let mut text = String::new();
    again.render_metrics(&mut text);
    assert!(
        text.contains("regproxy_offline_ready{ref=\"team/app:v1\",platform=\"linux/amd64\"} 1"),
        "{text}"
    );
    assert!(text.contains("regproxy_pinned_bytes 17"), "{text}");
}

#[tokio::test]
async fn a_moved_tag_keeps_the_old_image_pinned_until_the_new_one_is_complete() {
    let n = node(1 << 20);
    let pins = n.pins();
    let k = key("team/app:v1");
    let old = n.image(&[b"manifest-old", b"layer-old"]).await;
    pins.fetched(&k, Some(Source::File), &old).await;

    // The tag moved; the new layer did not make it into the cache.
    let new_layer = Digest::of(b"layer-new");
    let mut new = n.image(&[b"manifest-new"]).await;
    new.digests.push(new_layer.clone());
    assert!(
        pins.fetched(&k, None, &new).await,
        "a pin missing a layer is incomplete"
    );
    let p = &pins.list()[0];
    assert!(!p.complete && !pins.offline_ready(p));
    assert_eq!(p.previous.len(), 2, "the old image stays pinned");
    for d in old.digests.iter().chain(&new.digests) {
        assert!(
            n.cache.is_pinned(d),
            "{d} is pinned while the new image is fetched"
        );
    }
    // The tag moves once more before that: the old complete image stays.
    let newer = Got {
        top: Digest::of(b"newer"),
        digests: vec![Digest::of(b"newer")],
        bytes: 5,
    };
    pins.fetched(&k, None, &newer).await;
    assert_eq!(pins.list()[0].previous.len(), 2);
    assert!(
        !n.cache.is_pinned(&new_layer),
        "an incomplete set that was replaced goes"
    );

    pins.fetched(&k, None, &new).await;
    n.image(&[b"layer-new"]).await;
    assert!(!pins.fetched(&k, None, &new).await, "complete now");
    let p = &pins.list()[0];
    assert!(p.complete && p.previous.is_empty());
    for d in &old.digests {
        assert!(
            !n.cache.is_pinned(d),
            "the old image is unpinned once the new one is complete"
        );
    }
    assert!(n.cache.is_pinned(&new_layer));
}

#[tokio::test]
async fn the_file_adds_and_removes_its_pins_and_unpin_removes_the_apis() {
    let n = node(1 << 20);
    let pins = n.pins();
    pins.file_read(vec![entry("team/a:v1", true), entry("team/b:v1", false)])
        .await;
    {
        let st = pins.lock();
        assert_eq!(st.jobs.len(), 2, "both new lines are to be fetched");
        assert_eq!(st.pins.len(), 1, "one line pins");
        assert!(st.pins[0].source == Source::File && st.pins[0].digests.is_empty());
    }
    let got = n.image(&[b"manifest-a"]).await;
    pins.fetched(&key("team/a:v1"), None, &got).await;
    pins.fetched(&key("team/a:v1"), Some(Source::Api), &got)
        .await;
    assert_eq!(pins.list().len(), 2, "pinned by the file and the API");
    pins.lock().jobs.clear();

    // The same lines again: nothing new to fetch.
    pins.file_read(vec![entry("team/a:v1", true), entry("team/b:v1", false)])
        .await;
    assert!(pins.lock().jobs.is_empty());

    assert_eq!(
        pins.unpin("team/a:v1").await,
        (true, true),
        "the file still pins it"
    );
    assert_eq!(pins.list().len(), 1);
    assert!(n.cache.is_pinned(&got.digests[0]));
    assert_eq!(pins.unpin("team/a:v1").await, (false, true));

    pins.file_read(vec![entry("team/b:v1", false)]).await;
    assert!(pins.list().is_empty(), "a line removed takes its pin along");
    assert!(!n.cache.is_pinned(&got.digests[0]));
    assert!(!pins.wanted(&key("team/a:v1")));
    assert!(pins.wanted(&key("team/b:v1")));
}

#[tokio::test]
async fn pins_over_the_cap_are_said_and_kept() {
    let n = node(16);
    let pins = n.pins();
    let a = n.image(&[b"0123456789"]).await;
    pins.fetched(&key("team/a:v1"), Some(Source::Api), &a).await;
    assert!(!pins.over_cap());
    // b did not fit beside a: its prefetch counted it, the cache has none.
    let b = Got {
        top: Digest::of(b"abcdefghij"),
        digests: vec![Digest::of(b"abcdefghij")],
        bytes: 10,
    };
    assert!(pins.fetched(&key("team/b:v1"), Some(Source::Api), &b).await);
    assert!(
        pins.over_cap(),
        "10 held and 10 more wanted are more than 16"
    );
    assert_eq!(
        n.metrics
            .pins_over_cap
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    n.image(&[b"zzzzzzz"]).await;
    assert!(
        n.cache.get(&a.digests[0], true).await.is_some(),
        "the pin is kept"
    );
    assert!(
        n.cache.get(&Digest::of(b"zzzzzzz"), true).await.is_none(),
        "what does not fit beside the pins is not kept"
    );
    pins.unpin("team/b:v1").await;
    assert!(!pins.over_cap());
    assert_eq!(
        n.metrics
            .pins_over_cap
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn failures_back_off_to_a_bound() {
    assert_eq!(backoff(0), POLL);
    assert_eq!(backoff(1), POLL * 2);
    assert_eq!(backoff(40), MAX_BACKOFF);
}

/// Puts an image of its ref's bytes in the cache; fails for refs of `bad`.
struct Fake {
    cache: Arc<Cache>,
    runs: Mutex<Vec<Key>>,
}

impl Engine for Fake {
    fn run<'a>(&'a self, key: &'a Key) -> futures_util::future::BoxFuture<'a, Result<Got, String>> {
        Box::pin(async move {
            self.runs.lock().unwrap().push(key.clone());
            if key.reference.starts_with("team/bad") {
                return Err("no such image".into());
            }
            let parts = [
                format!("{}-manifest", key.reference),
                format!("{}-layer", key.reference),
            ];
            let mut digests = Vec::new();
            for p in &parts {
                let d = Digest::of(p.as_bytes());
                let b = Bytes::copy_from_slice(p.as_bytes());
                self.cache.put_manifest(d.clone(), "t".into(), b).await;
                digests.push(d);
            }
            Ok(Got {
                top: digests[0].clone(),
                digests,
                bytes: parts.iter().map(|p| p.len() as u64).sum(),
            })
        })
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited in vain until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_worker_follows_the_file_and_retries_what_failed() {
    let n = node(1 << 20);
    let list = n.dir.parent().unwrap().join("prefetch.list");
    std::fs::write(
        &list,
        "team/a:v1 linux/amd64 pin\nteam/bad:v1 linux/amd64\n",
    )
    .unwrap();
    let c = Arc::clone(&n.cache);
    let pins = Arc::new(Pins::open(&n.dir, c, Some(list.clone()), Duration::ZERO));
    let fake = Arc::new(Fake {
        cache: Arc::clone(&n.cache),
        runs: Mutex::default(),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    pins.start(fake.clone(), stop.clone());
    until("a is pinned whole", || {
        pins.list()
            .first()
            .is_some_and(|p| p.complete && pins.offline_ready(p))
    })
    .await;
    until("bad was tried", || {
        fake.runs
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.reference == "team/bad:v1")
    })
    .await;
    let retry = pins.lock().jobs.get(&key("team/bad:v1")).copied();
    let retry = retry.expect("a failed prefetch is tried again");
    assert_eq!(retry.failures, 1);
    assert!(retry.due > Instant::now() + POLL / 2, "after a backoff");

    std::fs::write(&list, "team/b:v1 linux/amd64 pin\n").unwrap();
    until("b replaced a", || {
        let l = pins.list();
        l.len() == 1 && l[0].reference == "team/b:v1" && l[0].complete
    })
    .await;
    assert!(!n.cache.is_pinned(&Digest::of(b"team/a:v1-layer")));
    assert!(n.cache.is_pinned(&Digest::of(b"team/b:v1-layer")));
    assert!(
        !pins.wanted(&key("team/bad:v1")),
        "a line removed is no longer retried"
    );
    stop.cancel();
}
