//! Who the peers are, and which of them to ask: the `--peers` list, or
//! the addresses of its DNS name; each peer live while it answers its
//! probe, and not asked while banned.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::PeerList;
use crate::resolve::Resolver;

/// One known peer.
#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// Its last probe (or request) got an answer.
    live: bool,
    /// Not asked before this instant: it sent bad bytes.
    banned_until: Option<Instant>,
}

pub(super) struct Members {
    list: PeerList,
    me: SocketAddr,
    resolver: Resolver,
    /// Every known peer but this node.
    known: Mutex<HashMap<SocketAddr, State>>,
}

impl Members {
    pub(super) fn new(list: PeerList, me: SocketAddr, resolver: Resolver) -> Members {
        let members = Members {
            list,
            me,
            resolver,
            known: Mutex::new(HashMap::new()),
        };
        if let PeerList::Static(addrs) = &members.list {
            members.set_known(addrs.clone());
        }
        members
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, State>> {
        self.known.lock().expect("never poisoned")
    }

    /// Resolves a `dns:` name again. A failed lookup keeps the peers known
    /// so far: a DNS hiccup is no reason to fetch everything upstream.
    pub(super) async fn refresh(&self) {
        let PeerList::Dns { name, port } = &self.list else {
            return;
        };
        match self.resolver.resolve(name, *port).await {
            Ok(addrs) => self.set_known(addrs),
            Err(e) => {
                tracing::warn!(name, error = %e, "cannot resolve the peers' name; keeping the peers known")
            }
        }
    }

    /// The peers are now `addrs` (this node left out): new ones start
    /// not live until their first probe, and a ban outlives a
    /// reappearance.
    fn set_known(&self, addrs: Vec<SocketAddr>) {
        let mut known = self.lock();
        let next: HashMap<SocketAddr, State> = addrs
            .into_iter()
            .filter(|a| *a != self.me)
            .map(|a| (a, known.get(&a).copied().unwrap_or_default()))
            .collect();
        let (before, after) = (known.len(), next.len());
        let joined = next.keys().filter(|a| !known.contains_key(a)).count();
        let left = known.keys().filter(|a| !next.contains_key(a)).count();
        if joined + left > 0 {
            tracing::info!(before, after, joined, left, "peers changed");
        }
        *known = next;
    }

    pub(super) fn known(&self) -> Vec<SocketAddr> {
        self.lock().keys().copied().collect()
    }

    /// Records whether `peer` answered.
    pub(super) fn probed(&self, peer: SocketAddr, ok: bool) {
        if let Some(s) = self.lock().get_mut(&peer) {
            if s.live != ok {
                tracing::info!(%peer, live = ok, "peer state changed");
            }
            s.live = ok;
        }
    }

    /// Bans `peer` for `how_long`; whether it was not banned already.
    pub(super) fn ban(&self, peer: SocketAddr, how_long: Duration) -> bool {
        let now = Instant::now();
        let mut known = self.lock();
        let Some(s) = known.get_mut(&peer) else {
            return false;
        };
        let was = s.banned_until.is_some_and(|t| t > now);
        s.banned_until = Some(now + how_long);
        !was
    }

    /// The peers to ask now: live and not banned.
    pub(super) fn live(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, s)| s.live && s.banned_until.is_none_or(|t| t <= now))
            .map(|(a, _)| *a)
            .collect()
    }

    /// Whether `peer` is asked now.
    pub(super) fn is_live(&self, peer: SocketAddr) -> bool {
        let now = Instant::now();
        self.lock()
            .get(&peer)
            .is_some_and(|s| s.live && s.banned_until.is_none_or(|t| t <= now))
    }

    /// How many peers are known, and how many of them are asked.
    pub(super) fn counts(&self) -> (u64, u64) {
        let known = self.lock().len() as u64;
        (known, self.live().len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::ResolverMode;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn live_means_answered_and_not_banned() {
        let list = PeerList::Static(vec![addr("127.0.0.11:1"), addr("127.0.0.12:1")]);
        let m = Members::new(
            list,
            addr("127.0.0.11:1"),
            Resolver::new(ResolverMode::System).unwrap(),
        );
        assert_eq!(
            m.known(),
            vec![addr("127.0.0.12:1")],
            "this node is no peer"
        );
        assert_eq!(m.counts(), (1, 0), "not live before a probe");
        m.probed(addr("127.0.0.12:1"), true);
        assert_eq!(m.live(), vec![addr("127.0.0.12:1")]);
        assert!(m.ban(addr("127.0.0.12:1"), Duration::from_millis(50)));
        assert!(
            !m.ban(addr("127.0.0.12:1"), Duration::from_millis(50)),
            "banned already"
        );
        assert_eq!(m.counts(), (1, 0));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(m.counts(), (1, 1), "the ban ends");
        m.probed(addr("127.0.0.99:1"), true);
        assert_eq!(m.counts(), (1, 1), "unknown peers are not added by a probe");
    }

    #[tokio::test]
    async fn a_new_list_keeps_what_is_known_of_the_peers_still_in_it() {
        let m = Members::new(
            PeerList::Static(vec![]),
            addr("127.0.0.11:1"),
            Resolver::new(ResolverMode::System).unwrap(),
        );
        m.set_known(vec![addr("127.0.0.12:1"), addr("127.0.0.13:1")]);
        m.probed(addr("127.0.0.12:1"), true);
        m.ban(addr("127.0.0.13:1"), Duration::from_secs(60));
        m.probed(addr("127.0.0.13:1"), true);
        m.set_known(vec![addr("127.0.0.13:1"), addr("127.0.0.11:1")]);
        assert_eq!(m.known(), vec![addr("127.0.0.13:1")]);
        assert_eq!(m.counts(), (1, 0), "the ban outlives the change");
    }
}
