//! The sockets under the listeners: bound to be shared with a successor,
//! and the process's limit of open files.

use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `addr` with `SO_REUSEPORT`, so that a successor started with the
/// same address binds it too while this process still serves, and the
/// kernel spreads new connections over both until this one closes its
/// listener (see [`Server::run`]).
///
/// The price: any process of the same user (root, on a node) in the node's
/// network namespace may now bind the address too and take a share of its
/// connections, where it got `EADDRINUSE` before. Such a process can change
/// `/etc/hosts` or add a DNAT rule as well; blobs it serves fail their
/// digest, tags do not (see the README's known limits).
pub(super) fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The kernel's queue of connections not yet accepted (capped by
/// `net.core.somaxconn`): past `--max-connections`, API clients wait here.
const LISTEN_BACKLOG: u32 = 1024;

/// Whether the kernel moves connections queued on a closing listener to
/// another of its `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, Linux
/// 5.14 and later) instead of resetting them. `None` when it cannot tell.
pub fn migrates_queued_connections() -> Option<bool> {
    let v = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").ok()?;
    Some(v.trim() != "0")
}

/// Raises the soft limit of open files to the hard one: each connection, fill,
/// upstream connection and mapped cache file takes a descriptor, and container runtimes often
/// start processes with a soft limit of 1024. Warns when even the hard limit
/// is below `want`.
pub(super) fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!(error = %e, "cannot raise the open files limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    if now.is_some_and(|n| n < want) {
        tracing::warn!(
            limit = now,
            want,
            "the open files limit is low for --max-connections on two listeners and \
             the cache's mapped files; connections past it fail to be accepted"
        );
    }
}
