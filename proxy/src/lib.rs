//! regproxy: a pull-through caching registry proxy that runs on every node.
//!
//! `main` builds one validated [`config::Config`] and hands each part its
//! piece. A request flows `server` → `api` → (`cache` | `upstream`); each
//! piece of state has one owner behind a small API.
//!
//! The request path:
//! - [`server`]: binds the listeners, accept loops with their limits, the
//!   admin endpoints (`/metrics`, `/healthz`, `/readyz`), and shutdown on
//!   SIGTERM that drains connections, then the cache's tracked fills.
//! - [`api`]: the OCI routes. `App` holds the owners below; `api/authorize`
//!   asks the upstream before cached content goes out, `api/manifest`
//!   revalidates a tag under its single-flight, `api/relay` passes the rest.
//! - [`sendfile`]: the socket under every client connection; the bytes of
//!   cache hits (slices of registered memory maps) leave by `sendfile(2)`.
//! - [`error`]: typed errors with their origin (client, upstream, this
//!   node), and the one place where they become OCI error responses.
//!
//! The owners of state:
//! - [`cache`]: content-addressed blobs on disk, a byte-weighted LRU index,
//!   and single-flight fills (tracked tasks, one span per digest) that every
//!   reader follows as the bytes land in a `cache/growing` file, verified
//!   before commit.
//! - [`tags`]: tag → digest with a TTL, persisted in `state.json`.
//! - [`auth`]: the upstream's yes per credential, repository and digest, and
//!   whether it lets anyone in (`open.json`), each with its stale rule.
//! - [`upstream`]: the HTTP(S) client to the real registry, its timeouts,
//!   redirects and retry policy.
//! - [`metrics`]: counters in the Prometheus text format.
//! - [`lock`]: one primary process per cache dir, an exclusive `flock`; a
//!   successor on the same address serves beside it and takes over.
//! - [`instance`]: this process's id among those sharing a cache dir.
//! - [`budget`]: `--upstream-rate`, a token bucket over the bytes taken
//!   from the upstream, with lanes: manifests first, then fills a client
//!   waits on, then prefetches.
//! - [`peers`]: the other nodes' proxies (`--peers`): one owner per digest
//!   by rendezvous hashing, asked on a miss before the upstream; who is
//!   live, and who is banned for bad bytes. `api/peer` serves them.
//! - [`pins`]: pinned images (`pins.json`), never evicted; the prefetch
//!   file re-read by content, and the revalidation of pinned tags.
//!
//! Foundations: [`config`] (flags, each also an env var), [`units`] (sizes
//! and durations, loadtest's too), [`digest`] (digests, names, references,
//! parsed strictly), [`headers`], [`body`] (the response body type),
//! [`resolve`] (upstream name resolution that never reads the node's
//! `/etc/hosts`). Node set-up: [`hosts`] (`regproxy hosts ...`: the
//! `/etc/hosts` line and containerd's `hosts.toml` with its fallback
//! server); [`node`] (with `--registry-name`, `serve` keeps that node path
//! in place and checks it every `--reconcile-interval`, for `/readyz` and
//! `regproxy_node_path_ok`; `regproxy doctor` runs the checks once;
//! `regproxy sysctl` sets the handover sysctl).
//!
//! The admin API (`server/admin_api`, on `--admin-listen`, with
//! `--admin-token-file`) and its commands, [`ctl`]: `prefetch`, `pin`,
//! `unpin`, `cache ls|rm|verify`, `rate`.
//! [`prefetch`] fetches an image into the cache in process, as a client
//! would pull it (only the node's platform of an index), for
//! `POST /admin/prefetch` and the pins.
//!
//! [`fuzzing`] holds the fuzz targets' bodies (`fuzz/`, `scripts/fuzz.sh`).
#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod body;
pub mod budget;
pub mod cache;
pub mod config;
pub mod ctl;
pub mod digest;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod hosts;
pub mod instance;
pub mod lock;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod pins;
pub mod prefetch;
pub mod resolve;
pub mod sendfile;
pub mod server;
pub mod tags;
pub mod units;
pub mod upstream;
