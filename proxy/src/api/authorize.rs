//! Authorization on the request side: before cached content goes out, the
//! upstream is asked (or was asked recently) whether this client may read
//! it; and, in the background, whether the upstream lets anyone in. What the
//! upstream answered is [`crate::auth`]'s to keep.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use super::{unknown, App};
use crate::auth::{Credential, Grant, Verdict};
use crate::digest::Digest;
use crate::error::{Error, Origin};
use crate::headers::API_VERSION;

impl App {
    /// Makes sure the upstream would let this client read `d` in repository
    /// `name` before cached content goes out, and says under which grant.
    /// A recent yes for this (credential, repository, digest), or an upstream
    /// that lets anyone in, costs nothing; otherwise one `HEAD` of `d` in
    /// `name` with the client's credentials (never its `Range`). While the
    /// upstream is unreachable, what it said yes to before is served; a
    /// credential it never accepted gets 401, as the upstream would give.
    pub(super) async fn authorize(
        &self,
        parts: &Parts,
        name: &str,
        d: &Digest,
        manifest: bool,
    ) -> Result<Grant, Error> {
        let cred = Credential::of(&parts.headers);
        let (seen, known) = match self.auth.check(&cred, name, d) {
            // A manifest vouches for what it references until its own yes
            // ends: asked again when half spent, so its layers stay allowed
            // for the rest of a pull.
            Verdict::Allowed(Grant::Fresh(t)) if manifest && self.auth.half_spent(t) => {
                (true, true)
            }
            Verdict::Allowed(g) => return Ok(g),
            Verdict::Ask { seen, known } => (seen, known),
        };
        self.upstream_contacted();
        self.metrics.auth_checks.fetch_add(1, Relaxed);
        let kind = if manifest { "manifests" } else { "blobs" };
        let probe = format!("/v2/{name}/{kind}/{d}");
        let mut headers = parts.headers.clone();
        headers.remove(header::RANGE);
        let unavailable = match self
            .upstream
            .send(Method::HEAD, &probe, &headers, &[])
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(self.auth.allow(&cred, name, d)),
            // The cache is keyed by digest alone: content cached from one
            // repository is not served through another that does not hold it.
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                self.auth.deny(&cred, name, Some(d));
                return Err(unknown(manifest, d));
            }
            Ok(r) if matches!(r.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(self.denied(parts, &cred, name, Some(d), &r));
            }
            // A client can shape its own request into an error; the upstream
            // counts as down only if it fails the proxy's own request too.
            Ok(r)
                if (r.status().is_server_error()
                    || r.status() == StatusCode::TOO_MANY_REQUESTS)
                    && self.upstream_down().await =>
            {
                Error::status("authorization check", r.status())
            }
            Ok(r) => return Err(Error::status("authorization check", r.status())),
            Err(e) if e.origin() == Origin::Upstream => e,
            Err(e) => return Err(e),
        };
        if seen {
            tracing::info!(repo = name, digest = %d, error = %unavailable, "upstream unavailable; serving what it allowed before");
            return Ok(Grant::Offline);
        }
        if known {
            // A credential the upstream accepted, but never for this digest
            // in this repository: the node has nothing it may give.
            tracing::info!(repo = name, digest = %d, error = %unavailable, "upstream unavailable; not seen allowed before");
            return Err(unknown(manifest, d));
        }
        // Never accepted by the upstream: refused as the upstream would.
        self.metrics.auth_denied.fetch_add(1, Relaxed);
        Err(Error::Denied {
            status: StatusCode::UNAUTHORIZED,
            challenge: self
                .auth
                .challenge()
                .map(|c| self.rewrite_challenge(parts, &c)),
        })
    }

    /// The upstream refused `d` in `name` to this client: forget its yes
    /// and relay the refusal with the upstream's challenge.
    pub(super) fn denied<B>(
        &self,
        parts: &Parts,
        cred: &Credential,
        name: &str,
        d: Option<&Digest>,
        r: &Response<B>,
    ) -> Error {
        self.auth.deny(cred, name, d);
        self.metrics.auth_denied.fetch_add(1, Relaxed);
        Error::Denied {
            status: r.status(),
            challenge: r
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| self.rewrite_challenge(parts, v)),
        }
    }

    /// Asks the upstream, anonymously, whether it lets anyone in: a 200 from
    /// a registry (it says `Docker-Distribution-API-Version`) is open, any
    /// other answer is not; no answer, or a 5xx, changes nothing. Kept in
    /// `open.json` (see [`crate::auth::Auth::learned_open`]), so that a
    /// restart while the upstream is down still knows. Only the proxy's own
    /// request counts: a client shapes its own.
    async fn learn_open(&self) {
        self.auth.asking_open();
        let r = match self.own_ping().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "upstream unreachable; keeping what is known of its auth");
                return;
            }
        };
        let status = r.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return;
        }
        let open = status == StatusCode::OK && r.headers().contains_key(API_VERSION);
        let challenge = r.headers().get(header::WWW_AUTHENTICATE).cloned();
        if self.auth.learned_open(open, challenge).await {
            tracing::info!(
                open,
                "learned whether the upstream lets anonymous clients in"
            );
        }
    }

    /// The proxy's own anonymous `GET /v2/`: no header of any client's.
    async fn own_ping(&self) -> Result<Response<Incoming>, Error> {
        self.upstream
            .send(Method::GET, "/v2/", &HeaderMap::new(), &[])
            .await
    }

    /// Whether the upstream fails the proxy's own anonymous `/v2/` (no
    /// answer, or a 5xx or 429): it is down, not just refusing a client.
    async fn upstream_down(&self) -> bool {
        match self.own_ping().await {
            Ok(r) => r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS,
            Err(e) => e.origin() == Origin::Upstream,
        }
    }

    /// The proxy is about to talk to the upstream: if what it knows of the
    /// upstream's auth is older than `--auth-ttl`, ask again (in the
    /// background, one request at a time: see [`App::watch_openness`]).
    pub(super) fn upstream_contacted(&self) {
        self.auth.contacted();
    }

    /// Learns whether the upstream is open at start, and again whenever the
    /// answer is stale and the proxy talks to the upstream. Runs until the
    /// process ends.
    pub async fn watch_openness(self: Arc<Self>) {
        loop {
            if self.auth.open_due() {
                self.learn_open().await;
            }
            self.auth.until_due().await;
        }
    }

    /// Serves a manifest to a client under `grant`: what it references is
    /// in the same repository, so the client may read it under that grant.
    pub(super) fn vouch(&self, parts: &Parts, name: &str, grant: Grant, manifest: &[u8]) {
        let cred = Credential::of(&parts.headers);
        self.auth.allow_referenced(&cred, name, grant, manifest);
    }
}
