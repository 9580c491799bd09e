//! How the proxy finds its upstream: `getaddrinfo` (`system`), or DNS alone
//! through `/etc/resolv.conf` (`dns`).
//!
//! On a node the proxy runs with `hostNetwork`, so its `/etc/hosts` is the
//! node's, where the registry name points back at the proxy itself. DNS-only
//! resolution never reads `/etc/hosts`, so that name reaches the real
//! registry; it also works in a `FROM scratch` image, where a static glibc
//! has no NSS modules to load.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

/// Which resolver `--upstream-resolver` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResolverMode {
    /// `getaddrinfo`: `/etc/hosts`, then DNS, as `/etc/nsswitch.conf` says.
    System,
    /// DNS only, with the name servers, search list and `ndots` of
    /// `/etc/resolv.conf`; `/etc/hosts` is never read.
    Dns,
}

/// A name resolver for hyper's `HttpConnector::new_with_resolver`; cheap to clone.
#[derive(Clone)]
pub enum Resolver {
    System(GaiResolver),
    Dns(Arc<TokioResolver>),
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resolver::System(_) => "Resolver::System",
            Resolver::Dns(_) => "Resolver::Dns",
        })
    }
}

impl Resolver {
    /// The resolver for `mode`; `Dns` reads `/etc/resolv.conf` now, so a
    /// missing or unreadable one is an error at start-up, not at first use.
    pub fn new(mode: ResolverMode) -> io::Result<Self> {
        match mode {
            ResolverMode::System => Ok(Resolver::System(GaiResolver::new())),
            ResolverMode::Dns => {
                let builder = TokioResolver::builder_tokio()
                    .map_err(|e| io::Error::other(format!("reading /etc/resolv.conf: {e}")))?;
                Self::dns_from(builder)
            }
        }
    }

    fn dns_from(
        mut builder: hickory_resolver::ResolverBuilder<
            hickory_resolver::net::runtime::TokioRuntimeProvider,
        >,
    ) -> io::Result<Self> {
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        let resolver = builder
            .build()
            .map_err(|e| io::Error::other(format!("setting up the DNS resolver: {e}")))?;
        Ok(Resolver::Dns(Arc::new(resolver)))
    }

    /// Every address `host` resolves to, with `port`; an IP literal (IPv6 with
    /// or without brackets) is returned as it is, without a lookup.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let name = Name::from_str(bare)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("`{host}`: {e}")))?;
        let addrs = self.lookup(name).await?;
        Ok(addrs.map(|a| SocketAddr::new(a.ip(), port)).collect())
    }

    fn lookup(&self, name: Name) -> ResolveFuture {
        match self {
            Resolver::System(gai) => {
                let mut gai = gai.clone();
                Box::pin(async move {
                    let addrs = tower_service::Service::call(&mut gai, name.clone())
                        .await
                        .map_err(|e| io::Error::new(e.kind(), format!("resolving {name}: {e}")))?;
                    non_empty(&name, addrs.collect())
                })
            }
            Resolver::Dns(dns) => {
                let dns = dns.clone();
                Box::pin(async move {
                    let lookup = dns.lookup_ip(name.as_str()).await.map_err(|e| {
                        // A DNS server that does not answer is a timeout.
                        let kind = match e {
                            hickory_resolver::net::NetError::Timeout => io::ErrorKind::TimedOut,
                            _ => io::ErrorKind::Other,
                        };
                        io::Error::new(kind, format!("resolving {name} through DNS: {e}"))
                    })?;
                    non_empty(
                        &name,
                        lookup.iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                    )
                })
            }
        }
    }
}

fn non_empty(name: &Name, addrs: Vec<SocketAddr>) -> io::Result<std::vec::IntoIter<SocketAddr>> {
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} resolves to no address"),
        ));
    }
    Ok(addrs.into_iter())
}

type ResolveFuture =
    Pin<Box<dyn Future<Output = io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

/// Addresses come back with port 0; `HttpConnector` sets the URL's port.
impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = ResolveFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        self.lookup(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::{rdata::A, RData, Record, RecordType};
    use std::net::Ipv4Addr;

    /// What the test name server answers for every A query.
    const ANSWER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);

    /// A name server on loopback that answers every A query with [`ANSWER`]
    /// and every other query with no records; it serves at most 64 queries.
    async fn name_server() -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..64 {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.response_code = ResponseCode::NoError;
                reply.metadata.recursion_available = true;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                for q in query.queries.iter() {
                    reply.queries.push(q.clone());
                    if q.query_type() == RecordType::A {
                        reply.answers.push(Record::from_rdata(
                            q.name().clone(),
                            60,
                            RData::A(A(ANSWER)),
                        ));
                    }
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), peer).await;
            }
        });
        addr
    }

    async fn dns_resolver_at(server: SocketAddr) -> Resolver {
        let mut conn = ConnectionConfig::udp();
        conn.port = server.port();
        let ns = NameServerConfig::new(server.ip(), true, vec![conn]);
        let config = ResolverConfig::from_name_servers(vec![ns]);
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        );
        builder.options_mut().timeout = std::time::Duration::from_millis(300);
        builder.options_mut().attempts = 1;
        Resolver::dns_from(builder).unwrap()
    }

    #[tokio::test]
    async fn ip_literals_need_no_lookup() {
        for mode in [ResolverMode::System, ResolverMode::Dns] {
            let r = Resolver::new(mode).unwrap();
            assert_eq!(
                r.resolve("127.0.0.2", 80).await.unwrap(),
                vec!["127.0.0.2:80".parse().unwrap()]
            );
            assert_eq!(
                r.resolve("[::1]", 5000).await.unwrap(),
                vec!["[::1]:5000".parse().unwrap()]
            );
            assert_eq!(
                r.resolve("::1", 5000).await.unwrap(),
                vec!["[::1]:5000".parse().unwrap()]
            );
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_in_both_modes() {
        for mode in [ResolverMode::System, ResolverMode::Dns] {
            let addrs = Resolver::new(mode)
                .unwrap()
                .resolve("localhost", 5000)
                .await
                .unwrap();
            assert!(!addrs.is_empty(), "{mode:?} should resolve localhost");
            assert!(
                addrs
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 5000),
                "{mode:?} should give only loopback addresses with our port: {addrs:?}"
            );
        }
    }

    #[tokio::test]
    async fn hypers_connector_connects_through_it() {
        use hyper_util::client::legacy::connect::HttpConnector;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for mode in [ResolverMode::System, ResolverMode::Dns] {
            let mut connector = HttpConnector::new_with_resolver(Resolver::new(mode).unwrap());
            let uri: http::Uri = format!("http://localhost:{port}/").parse().unwrap();
            let connected = tower_service::Service::call(&mut connector, uri);
            let (conn, accepted) = tokio::join!(connected, listener.accept());
            assert!(
                conn.is_ok(),
                "{mode:?}: the connector should reach localhost:{port}"
            );
            assert!(
                accepted.is_ok(),
                "{mode:?}: the listener should see the connection"
            );
        }
    }

    #[test]
    fn a_resolver_built_before_the_runtime_works_inside_it() {
        // main() parses and validates before it starts the runtime.
        let r = Resolver::new(ResolverMode::Dns).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addrs = rt.block_on(r.resolve("localhost", 80)).unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[tokio::test]
    async fn dns_mode_asks_the_name_server_and_never_reads_etc_hosts() {
        let r = dns_resolver_at(name_server().await).await;
        let addrs = r
            .resolve("knative.registry.svc.cluster.local", 80)
            .await
            .unwrap();
        assert_eq!(addrs, vec![SocketAddr::new(ANSWER.into(), 80)]);

        // Every name this machine's /etc/hosts maps must still come from DNS.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let names = hosts
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default())
            .flat_map(|l| l.split_ascii_whitespace().skip(1))
            .filter(|n| {
                !n.contains("localhost") && !n.ends_with('.') && n.parse::<IpAddr>().is_err()
            })
            .take(5)
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for name in names {
            let addrs = r.resolve(&format!("{name}."), 80).await.unwrap();
            assert_eq!(
                addrs,
                vec![SocketAddr::new(ANSWER.into(), 80)],
                "{name} is in /etc/hosts, but DNS mode should answer it from DNS"
            );
        }
    }

    #[tokio::test]
    async fn the_connector_interface_gives_port_zero_addresses() {
        let mut r = dns_resolver_at(name_server().await).await;
        let name = Name::from_str("upstream.example").unwrap();
        let addrs: Vec<_> = tower_service::Service::call(&mut r, name)
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs, vec![SocketAddr::new(ANSWER.into(), 0)]);
    }

    #[tokio::test]
    async fn an_unanswered_lookup_is_an_error_naming_the_host() {
        // A name server that is not there: nothing listens on this port.
        let gone = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let r = dns_resolver_at(gone).await;
        let err = r.resolve("nowhere.example", 80).await.unwrap_err();
        assert!(
            err.to_string().contains("nowhere.example"),
            "the error should name the host: {err}"
        );
    }
}
