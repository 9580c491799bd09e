//! Who may see cached content. The cache is keyed by digest alone, so the
//! question is always about one (credential, repository, digest): a cached
//! blob or manifest goes to a client only when
//!
//! - the upstream lets anonymous clients in altogether (learned from an
//!   anonymous `GET /v2/` answering 200, asked by the proxy itself at start
//!   and whenever the last answer is older than `--auth-ttl`), or
//! - the upstream said, within `--auth-ttl`, that this credential may read
//!   this digest in this repository: it served it (a fill, a manifest, a tag
//!   `HEAD`), answered a `HEAD` probe for it, or served a manifest of this
//!   repository that references it (config, layers, child manifests).
//!
//! While the upstream is unreachable, a (credential, repository, digest) seen
//! allowed before is still served; with an open upstream, everyone is.
//!
//! Credentials are never kept: every remembered answer is keyed by an
//! HMAC-SHA256 of (credential, repository, digest) under a random key. With
//! `--remember-allowed` the key lives in `<cache-dir>/auth.key` (0600) and the
//! answers in `<cache-dir>/allowed.json` (0600), so that they survive a
//! restart; without it the key is made anew in memory by every process.
//! Whether the upstream is open is kept in `<cache-dir>/open.json`, so that a
//! restart while the upstream is down still knows.
//!
//! Expiry is decided on [`tokio::time::Instant`], so that tests can advance
//! the clock past `--auth-ttl`.

mod files;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::config::AuthConfig;
use crate::digest::Digest;
use files::{create_private, load_or_create_key, random_key};
// Also for `crate::fuzzing`, which checks the key grammar.
pub(crate) use files::{hex, parse_key};

/// Most remembered answers; the oldest go first. An entry is about 80 bytes.
const MAX_ENTRIES: usize = 32 * 1024;

/// How long after an unanswered `/v2/` the proxy waits before asking again.
const ASK_OPEN_AGAIN: Duration = Duration::from_secs(5);

/// A client's credential: a hash of its `Authorization` header, or `None`
/// for an anonymous client. Held in memory only, for one request.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Credential(Option<[u8; 32]>);

impl Credential {
    /// Every `Authorization` header counts (all of them are relayed).
    pub fn of(h: &HeaderMap) -> Credential {
        Credential::hash(h).unwrap_or(Credential(None))
    }

    fn hash(h: &HeaderMap) -> Option<Credential> {
        let mut values = h.get_all(header::AUTHORIZATION).iter().peekable();
        values.peek()?;
        let mut hash = Sha256::new();
        for v in values {
            hash.update(v.as_bytes());
            hash.update(b"\n");
        }
        Some(Credential(Some(hash.finalize().into())))
    }

    pub fn is_anonymous(&self) -> bool {
        self.0.is_none()
    }
}

/// Why cached content may go to a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The upstream lets anyone in.
    Open,
    /// The upstream said yes to this credential, repository and digest; the
    /// yes stands until then.
    Fresh(Instant),
    /// The upstream is unreachable and said yes before.
    Offline,
}

/// What the cache may do for a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed(Grant),
    /// Ask the upstream. `seen`: the upstream said yes to this exact
    /// (credential, repository, digest) before, so it may be served while
    /// the upstream is unreachable. `known`: it said yes to this credential
    /// for something, so a failure to ask is the upstream's, not a refusal.
    Ask {
        seen: bool,
        known: bool,
    },
}

/// The one owner of what the upstream said about who may read: its yeses,
/// whether it is open, and when each answer goes stale.
pub struct Auth {
    ttl: Duration,
    key: [u8; 32],
    /// The cache dir, where `open.json` is kept.
    dir: PathBuf,
    /// `--remember-allowed`: where answers are kept, and for how long.
    remember: Option<(PathBuf, Duration)>,
    state: Mutex<State>,
    /// Wakes the task that asks whether the upstream is open (see
    /// [`Auth::contacted`]).
    due: tokio::sync::Notify,
}

struct State {
    open: bool,
    /// What `open.json` says.
    saved_open: bool,
    /// When `open` was last learned from the upstream in this process.
    open_checked: Option<Instant>,
    /// When the proxy last asked, answered or not: asking again waits a
    /// little, so that an upstream that is down is not asked at every turn.
    open_asked: Option<Instant>,
    /// The upstream's challenge to anonymous clients, for the 401s the node
    /// answers itself while the upstream is unreachable.
    challenge: Option<HeaderValue>,
    allowed: HashMap<[u8; 32], Seen>,
    dirty: bool,
}

#[derive(Clone, Copy)]
struct Seen {
    /// The upstream's yes stands until then.
    fresh_until: Instant,
    /// When it last said yes, in ms since the Unix epoch.
    at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    /// Hex HMAC key → when the upstream last said yes (ms since the epoch).
    allowed: Vec<(String, u64)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Auth {
    /// Loads what `dir` says of whether the upstream is open. With
    /// `--remember-allowed`, answers are loaded from and kept in `dir`;
    /// without it any kept there before are removed. Blocking.
    pub fn open(dir: &Path, config: &AuthConfig) -> std::io::Result<Auth> {
        let (ttl, remember) = (config.ttl, config.remember);
        let open = files::load_open(dir);
        let key_path = dir.join("auth.key");
        let file = dir.join("allowed.json");
        let mut allowed = HashMap::new();
        let key = match remember {
            None => {
                for p in [&key_path, &file] {
                    match std::fs::remove_file(p) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                random_key()?
            }
            Some(keep) => {
                let key = load_or_create_key(&key_path)?;
                let oldest = now_ms().saturating_sub(keep.as_millis() as u64);
                let now = Instant::now();
                if let Ok(b) = std::fs::read(&file) {
                    match serde_json::from_slice::<Persisted>(&b) {
                        Ok(p) => {
                            for (k, at_ms) in p.allowed {
                                if let (Some(k), true) = (parse_key(&k), at_ms >= oldest) {
                                    // A yes from before the restart is good
                                    // for offline use only.
                                    let fresh_until = now;
                                    allowed.insert(k, Seen { fresh_until, at_ms });
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(path = %file.display(), error = %e, "ignoring an unreadable allowed.json")
                        }
                    }
                }
                key
            }
        };
        Ok(Auth {
            ttl,
            key,
            dir: dir.to_owned(),
            remember: remember.map(|d| (file, d)),
            due: tokio::sync::Notify::new(),
            state: Mutex::new(State {
                open,
                saved_open: open,
                open_checked: None,
                open_asked: None,
                challenge: None,
                allowed,
                dirty: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, cred: &Credential, scope: Option<(&str, &Digest)>) -> [u8; 32] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        match &cred.0 {
            Some(c) => {
                m.update(b"C");
                m.update(c);
            }
            None => m.update(b"A"),
        }
        if let Some((repo, d)) = scope {
            m.update(b"\0");
            m.update(repo.as_bytes());
            m.update(b"\0");
            m.update(d.to_string().as_bytes());
        }
        m.finalize().into_bytes().into()
    }

    /// May `cred` read `d` in `repo` from the node?
    pub fn check(&self, cred: &Credential, repo: &str, d: &Digest) -> Verdict {
        let now = Instant::now();
        let k = self.key(cred, Some((repo, d)));
        let kc = self.key(cred, None);
        let st = self.lock();
        if st.open && st.open_checked.is_some_and(|t| now < t + self.ttl) {
            return Verdict::Allowed(Grant::Open);
        }
        match st.allowed.get(&k) {
            Some(s) if s.fresh_until > now => Verdict::Allowed(Grant::Fresh(s.fresh_until)),
            seen => Verdict::Ask {
                seen: seen.is_some() || st.open,
                known: st.allowed.contains_key(&kc),
            },
        }
    }

    /// Whether it is time to ask the upstream again whether it is open:
    /// the last answer is stale, and the last try is not too recent.
    pub fn open_due(&self) -> bool {
        let st = self.lock();
        let now = Instant::now();
        let stale = st.open_checked.is_none_or(|t| now >= t + self.ttl);
        stale
            && st
                .open_asked
                .is_none_or(|t| now >= t + ASK_OPEN_AGAIN.min(self.ttl))
    }

    /// The proxy is about to talk to the upstream: if what it knows of the
    /// upstream's auth is stale, wake whoever waits in [`Auth::until_due`].
    pub fn contacted(&self) {
        if self.open_due() {
            self.due.notify_one();
        }
    }

    /// Waits for [`Auth::contacted`] to find the answer stale.
    pub async fn until_due(&self) {
        self.due.notified().await;
    }

    /// The proxy is asking the upstream whether it is open.
    pub fn asking_open(&self) {
        self.lock().open_asked = Some(Instant::now());
    }

    /// Whether a yes that stands until `until` has less than half its time
    /// left: worth asking again while the upstream can answer.
    pub fn half_spent(&self, until: Instant) -> bool {
        until.saturating_duration_since(Instant::now()) < self.ttl / 2
    }

    /// The proxy's own anonymous `/v2/` was answered: open (a registry's 200)
    /// or not, with the upstream's `challenge` if it gave one. Kept in
    /// `open.json` when it differs from the file. Returns whether that
    /// changed what was known.
    pub async fn learned_open(&self, open: bool, challenge: Option<HeaderValue>) -> bool {
        let (changed, unsaved) = {
            let mut st = self.lock();
            st.open_checked = Some(Instant::now());
            if challenge.is_some() {
                st.challenge = challenge;
            }
            let changed = std::mem::replace(&mut st.open, open) != open;
            (changed, st.saved_open != open)
        };
        if unsaved {
            let dir = self.dir.clone();
            match tokio::task::spawn_blocking(move || files::save_open(&dir, open)).await {
                Ok(Ok(())) => self.lock().saved_open = open,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not save whether the upstream is open")
                }
                Err(e) => tracing::warn!(error = %e, "could not save whether the upstream is open"),
            }
        }
        changed
    }

    /// The upstream's last challenge to anonymous clients.
    pub fn challenge(&self) -> Option<HeaderValue> {
        self.lock().challenge.clone()
    }

    /// The upstream accepted `cred` (for anything at all).
    pub fn allow_credential(&self, cred: &Credential) {
        let k = self.key(cred, None);
        self.insert(k, Instant::now() + self.ttl);
    }

    /// The upstream served `d` in `repo` to `cred`.
    pub fn allow(&self, cred: &Credential, repo: &str, d: &Digest) -> Grant {
        let until = Instant::now() + self.ttl;
        self.allow_credential(cred);
        self.insert(self.key(cred, Some((repo, d))), until);
        Grant::Fresh(until)
    }

    /// A manifest of `repo` went to `cred` under `grant`: what it references
    /// is in `repo` too, and may be read under the same grant.
    pub fn allow_referenced(&self, cred: &Credential, repo: &str, grant: Grant, manifest: &[u8]) {
        let until = match grant {
            Grant::Fresh(t) => t,
            // The upstream said nothing now: what it refused stays refused,
            // and what it allowed before needs no new entry.
            Grant::Open | Grant::Offline => return,
        };
        for d in referenced(manifest) {
            self.insert(self.key(cred, Some((repo, &d))), until);
        }
    }

    fn insert(&self, k: [u8; 32], fresh_until: Instant) {
        let at_ms = now_ms();
        let mut st = self.lock();
        if st.allowed.len() >= MAX_ENTRIES && !st.allowed.contains_key(&k) {
            // Drop the oldest eighth at once, so that this stays cheap.
            let mut ages: Vec<(u64, [u8; 32])> =
                st.allowed.iter().map(|(k, s)| (s.at_ms, *k)).collect();
            let cut = MAX_ENTRIES / 8;
            ages.select_nth_unstable(cut);
            for (_, old) in &ages[..cut] {
                st.allowed.remove(old);
            }
        }
        let e = st.allowed.entry(k).or_insert(Seen { fresh_until, at_ms });
        e.fresh_until = e.fresh_until.max(fresh_until);
        e.at_ms = at_ms;
        st.dirty = true;
    }

    /// The upstream refused `d` in `repo` to `cred`: forget any yes for it,
    /// offline use included.
    pub fn deny(&self, cred: &Credential, repo: &str, d: Option<&Digest>) {
        if let Some(d) = d {
            let k = self.key(cred, Some((repo, d)));
            let mut st = self.lock();
            if st.allowed.remove(&k).is_some() {
                st.dirty = true;
            }
        }
    }

    /// Writes the remembered answers (with `--remember-allowed`) if they
    /// changed: atomically, 0600. Blocking; called now and then and at exit.
    pub fn save(&self) -> std::io::Result<()> {
        let Some((path, keep)) = &self.remember else {
            return Ok(());
        };
        let p = {
            let mut st = self.lock();
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            let oldest = now_ms().saturating_sub(keep.as_millis() as u64);
            Persisted {
                allowed: st
                    .allowed
                    .iter()
                    .filter(|(_, s)| s.at_ms >= oldest)
                    .map(|(k, s)| (hex(k), s.at_ms))
                    .collect(),
            }
        };
        let tmp = match crate::instance::temp_for(path) {
            Ok(tmp) => tmp,
            Err(e) => {
                self.lock().dirty = true;
                return Err(e);
            }
        };
        let written = create_private(&tmp).and_then(|mut f| {
            f.write_all(&serde_json::to_vec(&p)?)?;
            f.sync_data()?;
            std::fs::rename(&tmp, path)
        });
        if written.is_err() {
            // A full disk: the last file stays, and no temp file is left.
            // The changes are still to be written: the next save (or the
            // one at exit) tries again, so a refusal learned now is not
            // forgotten by a restart.
            let _ = std::fs::remove_file(&tmp);
            self.lock().dirty = true;
        }
        written
    }
}

/// Most descriptors of one manifest that vouch for their digests: a pull
/// needs far fewer, and one manifest must not crowd out everyone's answers.
const MAX_REFERENCED: usize = 1024;

/// The digests a manifest references and that the upstream checked were in
/// the manifest's repository when it accepted the push: an image manifest's
/// config and layers, an index's manifests. Distribution checks each of them;
/// it does not check a descriptor with `urls` (a foreign layer lives
/// elsewhere), so those vouch for nothing, and neither do non-distributable
/// media types.
pub fn referenced(manifest: &[u8]) -> Vec<Digest> {
    #[derive(Deserialize)]
    struct Descriptor {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        #[serde(default)]
        urls: Vec<String>,
    }
    #[derive(Deserialize)]
    struct Manifest {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return Vec::new();
    };
    m.config
        .into_iter()
        .chain(m.layers)
        .chain(m.manifests)
        .filter(|d| {
            d.urls.is_empty()
                && !d.media_type.contains("foreign")
                && !d.media_type.contains("nondistributable")
        })
        .filter_map(|d| Digest::parse(&d.digest).ok())
        .take(MAX_REFERENCED)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(v: Option<&'static str>) -> Credential {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        Credential::of(&h)
    }

    fn d(s: &[u8]) -> Digest {
        Digest::of(s)
    }

    fn config(ttl: Duration, remember: Option<Duration>) -> AuthConfig {
        AuthConfig { ttl, remember }
    }

    fn auth(ttl: u64) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let a = Auth::open(dir.path(), &config(Duration::from_secs(ttl), None)).unwrap();
        (dir, a)
    }

    #[test]
    fn a_yes_is_per_credential_repository_and_digest() {
        let (_dir, a) = auth(60);
        let alice = cred(Some("Basic YWxpY2U6cHc="));
        let mallory = cred(Some("Basic bWFsbG9yeTp4"));
        let (x, y) = (d(b"x"), d(b"y"));
        let ask = Verdict::Ask {
            seen: false,
            known: false,
        };
        assert_eq!(a.check(&alice, "team/app", &x), ask);
        let g = a.allow(&alice, "team/app", &x);
        assert_eq!(a.check(&alice, "team/app", &x), Verdict::Allowed(g));
        assert_eq!(
            a.check(&alice, "team/app", &y),
            Verdict::Ask {
                seen: false,
                known: true
            },
            "never across digests"
        );
        assert!(
            matches!(
                a.check(&alice, "team/other", &x),
                Verdict::Ask { seen: false, .. }
            ),
            "never across repositories"
        );
        assert_eq!(
            a.check(&mallory, "team/app", &x),
            ask,
            "never across credentials"
        );
        assert_eq!(
            a.check(&cred(None), "team/app", &x),
            ask,
            "never to anonymous clients"
        );
        a.deny(&alice, "team/app", Some(&x));
        assert!(
            matches!(
                a.check(&alice, "team/app", &x),
                Verdict::Ask { seen: false, .. }
            ),
            "a refusal forgets the yes, offline use included"
        );
    }

    #[test]
    fn a_manifest_vouches_for_what_it_references() {
        let (_dir, a) = auth(60);
        let alice = cred(Some("Bearer t"));
        let (cfg, layer) = (d(b"cfg"), d(b"layer"));
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{cfg}"}},"layers":[{{"digest":"{layer}"}}]}}"#
        );
        assert_eq!(referenced(m.as_bytes()), vec![cfg.clone(), layer.clone()]);
        let g = a.allow(&alice, "r", &Digest::of(m.as_bytes()));
        a.allow_referenced(&alice, "r", g, m.as_bytes());
        assert_eq!(a.check(&alice, "r", &layer), Verdict::Allowed(g));
        assert!(
            matches!(a.check(&alice, "other", &layer), Verdict::Ask { .. }),
            "only in the manifest's own repository"
        );
        let index = format!(r#"{{"manifests":[{{"digest":"{cfg}"}}],"subject":null}}"#);
        assert_eq!(referenced(index.as_bytes()), vec![cfg.clone()]);
        let foreign = format!(
            r#"{{"layers":[{{"digest":"{layer}","urls":["https://e.example/x"]}},
                {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{cfg}"}}],
               "blobs":[{{"digest":"{layer}"}}]}}"#
        );
        assert!(
            referenced(foreign.as_bytes()).is_empty(),
            "a foreign layer, one with urls, or an artifact's blobs were never checked by the upstream to be in the repository"
        );
        assert!(referenced(b"not json").is_empty());
    }

    #[tokio::test]
    async fn yeses_expire_to_offline_use_and_an_open_upstream_allows_everyone() {
        let (_dir, a) = auth(0);
        let alice = cred(Some("Bearer t"));
        let x = d(b"x");
        a.allow(&alice, "r", &x);
        assert_eq!(
            a.check(&alice, "r", &x),
            Verdict::Ask {
                seen: true,
                known: true
            },
            "an expired yes is asked again, and still good offline"
        );
        let (_dir, a) = auth(60);
        assert!(a.open_due(), "at start the upstream is asked");
        a.asking_open();
        assert!(!a.open_due(), "not again right after an unanswered try");
        a.learned_open(true, None).await;
        assert!(!a.open_due());
        assert_eq!(a.check(&cred(None), "r", &x), Verdict::Allowed(Grant::Open));
        a.learned_open(false, Some(HeaderValue::from_static("Basic realm=\"r\"")))
            .await;
        assert!(matches!(
            a.check(&cred(None), "r", &x),
            Verdict::Ask { seen: false, .. }
        ));
        assert_eq!(a.challenge().unwrap(), "Basic realm=\"r\"");
    }

    #[tokio::test(start_paused = true)]
    async fn a_yes_is_reused_until_auth_ttl_and_asked_again_from_then() {
        let ttl = Duration::from_secs(60);
        let (_dir, a) = auth(ttl.as_secs());
        let alice = cred(Some("Bearer t"));
        let x = d(b"x");
        let g = a.allow(&alice, "r", &x);
        tokio::time::advance(ttl / 2 - Duration::from_millis(1)).await;
        let Verdict::Allowed(Grant::Fresh(until)) = a.check(&alice, "r", &x) else {
            panic!("a yes is reused within --auth-ttl");
        };
        assert!(!a.half_spent(until), "not yet half spent");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(a.half_spent(until), "half spent: a manifest asks again");
        tokio::time::advance(ttl / 2 - Duration::from_millis(2)).await;
        assert_eq!(
            a.check(&alice, "r", &x),
            Verdict::Allowed(g),
            "a yes is reused just before --auth-ttl"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            a.check(&alice, "r", &x),
            Verdict::Ask {
                seen: true,
                known: true
            },
            "at --auth-ttl the upstream is asked again; the yes stays good offline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn whether_the_upstream_is_open_goes_stale_after_auth_ttl() {
        let ttl = Duration::from_secs(60);
        let (dir, a) = auth(ttl.as_secs());
        let x = d(b"x");
        let anon = cred(None);
        a.asking_open();
        tokio::time::advance(ASK_OPEN_AGAIN - Duration::from_millis(1)).await;
        assert!(!a.open_due(), "an unanswered ask waits before the next");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(a.open_due(), "and is asked again after ASK_OPEN_AGAIN");
        a.asking_open();
        a.learned_open(true, None).await;
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert!(!a.open_due());
        assert_eq!(a.check(&anon, "r", &x), Verdict::Allowed(Grant::Open));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(a.open_due(), "at --auth-ttl the upstream is asked again");
        assert_eq!(
            a.check(&anon, "r", &x),
            Verdict::Ask {
                seen: true,
                known: false
            },
            "a stale open answer no longer lets everyone in unasked, \
             but lets everything be served while the upstream is down"
        );
        let again = Auth::open(dir.path(), &config(ttl, None)).unwrap();
        assert!(
            matches!(again.check(&anon, "r", &x), Verdict::Ask { seen: true, .. }),
            "open.json tells a restarted proxy that the upstream was open"
        );
        a.learned_open(false, None).await;
        let again = Auth::open(dir.path(), &config(ttl, None)).unwrap();
        assert!(
            matches!(
                again.check(&anon, "r", &x),
                Verdict::Ask { seen: false, .. }
            ),
            "and that it no longer is"
        );
    }

    #[test]
    fn an_upgrade_keeps_the_open_answer_of_state_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("state.json"),
            r#"{"upstream_open":true,"tags":[]}"#,
        )
        .unwrap();
        let cfg = config(Duration::from_secs(60), None);
        let a = Auth::open(dir.path(), &cfg).unwrap();
        let anon = cred(None);
        assert!(matches!(
            a.check(&anon, "r", &d(b"x")),
            Verdict::Ask { seen: true, .. }
        ));
        std::fs::remove_file(dir.path().join("state.json")).unwrap();
        let a = Auth::open(dir.path(), &cfg).unwrap();
        assert!(
            matches!(
                a.check(&anon, "r", &d(b"x")),
                Verdict::Ask { seen: true, .. }
            ),
            "the answer moved to open.json at once"
        );
    }

    #[test]
    fn remembered_answers_survive_a_restart_as_keyed_hashes_only() {
        let dir = tempfile::tempdir().unwrap();
        let keep = Some(Duration::from_secs(3600));
        let secret = "Basic YWxpY2U6cGFzc3dvcmQ=";
        let alice = cred(Some(secret));
        let x = d(b"x");
        let a = Auth::open(dir.path(), &config(Duration::from_secs(60), keep)).unwrap();
        a.allow(&alice, "team/app", &x);
        a.save().unwrap();
        drop(a);
        use std::os::unix::fs::PermissionsExt;
        for f in ["auth.key", "allowed.json"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f} is readable by its owner only");
        }
        let text = std::fs::read_to_string(dir.path().join("allowed.json")).unwrap();
        let plain_hash: String = Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            !text.contains("YWxp") && !text.contains(&plain_hash) && !text.contains("team/app"),
            "neither the credential, its plain hash nor the repository is written: {text}"
        );

        let a = Auth::open(dir.path(), &config(Duration::from_secs(60), keep)).unwrap();
        assert_eq!(
            a.check(&alice, "team/app", &x),
            Verdict::Ask {
                seen: true,
                known: true
            },
            "after a restart the yes is good for offline use"
        );
        assert!(matches!(
            a.check(&cred(Some("Basic d3Jvbmc=")), "team/app", &x),
            Verdict::Ask {
                seen: false,
                known: false
            }
        ));
        drop(a);

        let a = Auth::open(dir.path(), &config(Duration::from_secs(60), None)).unwrap();
        assert!(matches!(
            a.check(&alice, "team/app", &x),
            Verdict::Ask { seen: false, .. }
        ));
        assert!(
            !dir.path().join("allowed.json").exists() && !dir.path().join("auth.key").exists(),
            "without --remember-allowed nothing is kept on disk"
        );
    }
}
