//! Who may see cached content. A cached blob or manifest is served only to a
//! client the upstream would serve it to: either the upstream lets anonymous
//! clients in altogether (learned from an anonymous `/v2/` answering 200), or
//! this client's credential was accepted by the upstream for this repository
//! within the last `--auth-ttl`. Credentials are kept only as a SHA-256 of the
//! `Authorization` header, in memory, and never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use sha2::{Digest as _, Sha256};

/// Most remembered (credential, repository) pairs; the oldest go first.
const MAX_ENTRIES: usize = 16 * 1024;

/// The key of a client's credential: a hash of its `Authorization` header,
/// or `None` for an anonymous client.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Credential(Option<[u8; 32]>);

impl Credential {
    pub fn of(h: &HeaderMap) -> Credential {
        Credential(
            h.get(header::AUTHORIZATION)
                .map(|v| Sha256::digest(v.as_bytes()).into()),
        )
    }

    pub fn is_anonymous(&self) -> bool {
        self.0.is_none()
    }
}

pub struct Auth {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Until when the upstream is known to let anonymous clients in.
    open_until: Option<Instant>,
    /// Until when a credential may read a repository.
    allowed: HashMap<(Credential, String), Instant>,
}

/// What the cache may do for a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Serve from the node.
    Allowed,
    /// Ask the upstream first; `stale` says whether this credential was
    /// allowed before (so it may be served when the upstream is unreachable).
    Ask { stale: bool },
}

impl Auth {
    pub fn new(ttl: Duration) -> Auth {
        Auth {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn check(&self, cred: &Credential, repo: &str) -> Verdict {
        let now = Instant::now();
        let st = self.lock();
        if st.open_until.is_some_and(|t| t > now) {
            return Verdict::Allowed;
        }
        match st.allowed.get(&(cred.clone(), repo.to_owned())) {
            Some(t) if *t > now => Verdict::Allowed,
            Some(_) => Verdict::Ask { stale: true },
            None => Verdict::Ask { stale: false },
        }
    }

    /// The upstream answered an anonymous `/v2/` with 200: it has no auth.
    pub fn upstream_open(&self, open: bool) {
        self.lock().open_until = open.then(|| Instant::now() + self.ttl);
    }

    /// The upstream served `repo` to `cred`.
    pub fn allow(&self, cred: &Credential, repo: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.allowed.len() >= MAX_ENTRIES {
            st.allowed.retain(|_, t| *t > now);
            if st.allowed.len() >= MAX_ENTRIES {
                if let Some(oldest) = st
                    .allowed
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
                {
                    st.allowed.remove(&oldest);
                }
            }
        }
        st.allowed
            .insert((cred.clone(), repo.to_owned()), now + self.ttl);
    }

    /// The upstream refused `repo` to `cred`.
    pub fn deny(&self, cred: &Credential, repo: &str) {
        self.lock().allowed.remove(&(cred.clone(), repo.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cred(v: Option<&'static str>) -> Credential {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        Credential::of(&h)
    }

    #[test]
    fn a_yes_is_per_credential_and_repository() {
        let a = Auth::new(Duration::from_secs(60));
        let alice = cred(Some("Basic YWxpY2U6cHc="));
        let mallory = cred(Some("Basic bWFsbG9yeTp4"));
        assert_eq!(a.check(&alice, "team/app"), Verdict::Ask { stale: false });
        a.allow(&alice, "team/app");
        assert_eq!(a.check(&alice, "team/app"), Verdict::Allowed);
        assert_eq!(
            a.check(&alice, "team/other"),
            Verdict::Ask { stale: false },
            "never across repositories"
        );
        assert_eq!(
            a.check(&mallory, "team/app"),
            Verdict::Ask { stale: false },
            "never across credentials"
        );
        assert_eq!(
            a.check(&cred(None), "team/app"),
            Verdict::Ask { stale: false },
            "never to anonymous clients"
        );
        a.deny(&alice, "team/app");
        assert_eq!(a.check(&alice, "team/app"), Verdict::Ask { stale: false });
    }

    #[test]
    fn yeses_expire_and_an_open_upstream_allows_everyone() {
        let a = Auth::new(Duration::ZERO);
        let alice = cred(Some("Bearer t"));
        a.allow(&alice, "r");
        assert_eq!(
            a.check(&alice, "r"),
            Verdict::Ask { stale: true },
            "an expired yes is asked again"
        );
        let a = Auth::new(Duration::from_secs(60));
        a.upstream_open(true);
        assert_eq!(a.check(&cred(None), "r"), Verdict::Allowed);
        a.upstream_open(false);
        assert_eq!(a.check(&cred(None), "r"), Verdict::Ask { stale: false });
    }
}
