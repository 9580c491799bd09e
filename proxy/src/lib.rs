//! regproxy: a pull-through caching registry proxy that runs on every node.
//!
//! A request flows `server` → `api` → (`cache` | `upstream`):
//!
//! - [`config`]: the command line (clap), every flag also an env var.
//! - [`units`]: the one grammar of sizes (`20GiB`) and durations (`30s`), loadtest's too.
//! - [`server`]: binds the listeners, the accept loop, the admin endpoints
//!   (`/metrics`, `/healthz`, `/readyz`) and graceful shutdown on SIGTERM.
//! - [`api`]: the OCI distribution routes, what is served from the cache and
//!   what is relayed.
//! - [`cache`]: the content-addressed store on disk, its byte-weighted LRU
//!   index, and single-flight fills that every reader follows while the bytes
//!   arrive, verified against the digest before commit.
//! - [`lock`]: one process per cache dir, an exclusive `flock` held while serving.
//! - [`tags`]: tag → digest with a TTL, persisted, served stale when the
//!   upstream is down.
//! - [`auth`]: who may read cached content: the upstream's yes, remembered
//!   per credential, repository and digest (as keyed hashes), and whether
//!   the upstream lets anyone in.
//! - [`upstream`]: the HTTP(S) client to the real registry, timeouts, redirects.
//! - [`digest`]: digests, repository names and references, parsed strictly.
//! - [`error`]: typed errors with their origin (client, upstream, this node),
//!   and the one place where they become OCI error responses.
//! - [`headers`]: the registry API's header names.
//! - [`body`]: the response body type.
//! - [`metrics`]: counters in the Prometheus text format.
//! - [`resolve`]: upstream name resolution, `getaddrinfo` or DNS only (never
//!   the node's `/etc/hosts`, where the registry name points back at us).
//! - [`hosts`]: node set-up, `regproxy hosts ...`: the `/etc/hosts` line and
//!   containerd's `hosts.toml`, written and removed in place.
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod digest;
pub mod error;
pub mod headers;
pub mod hosts;
pub mod lock;
pub mod metrics;
pub mod resolve;
pub mod server;
pub mod tags;
pub mod units;
pub mod upstream;
