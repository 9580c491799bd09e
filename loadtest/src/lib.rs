//! The edge-cluster pull workload, and regproxy measured side by side against
//! what users run instead.
//!
//! - [`cli`]: the `seed`, `pull`, `compare` and `soak` subcommands and their flags.
//! - [`synth`]: deterministic synthetic blobs and image sets (what `seed` pushes).
//! - [`registry`]: a small OCI registry client: push, resolve, verified blob GETs.
//! - [`stats`]: latency percentiles.
//! - [`workload`]: the client side of every scenario (N clients pulling at once).
//! - [`procs`]: child processes (upstream, peers, regproxy), their memory, and the
//!   upstream's access log.
//! - [`targets`]: how each target (regproxy, Distribution proxy, nginx, direct) is
//!   configured and started with a fresh cache.
//! - [`netns`]: the bandwidth-limited uplink (network namespace, veth, `tc tbf`).
//! - [`compare`]: the scenarios, run for every target in one run.
//! - [`cluster`]: the `cluster` scenario: N nodes in network namespaces on one
//!   LAN behind one shaped uplink, regproxy with peers on and off, and direct.
//! - [`budget`]: the `budget` scenario: a rollout pull over the shaped uplink
//!   while regproxy prefetches a large image, with and without `--upstream-rate`.
//! - [`soak`]: `loadtest soak`, regproxy under mixed traffic and random
//!   faults for a set time, every completed response checked by an oracle.
//! - [`report`]: the table on stdout, the JSON, the SVG chart, and sizes for
//!   humans (`256.0 MiB`). Sizes and durations on the command line are
//!   `regproxy::units`, one grammar with the proxy.

pub mod budget;
pub mod cli;
pub mod cluster;
pub mod compare;
pub mod netns;
pub mod procs;
pub mod registry;
pub mod report;
pub mod soak;
pub mod stats;
pub mod synth;
pub mod targets;
pub mod workload;
