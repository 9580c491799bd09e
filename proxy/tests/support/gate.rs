//! A TCP relay in front of the upstream, metering the bytes that come back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TCP relay in front of the upstream that passes requests freely but
/// meters the bytes coming back: a test can hold them at a budget (a stalled
/// uplink) or cut every connection once the budget is spent (a broken one).
pub struct Gate {
    pub addr: SocketAddr,
    state: Arc<GateState>,
}

struct GateState {
    /// Response bytes relayed so far, over all connections.
    passed: AtomicU64,
    /// Response bytes allowed through; `u64::MAX` is open.
    budget: AtomicU64,
    /// When set, connections are closed (not paused) once the budget is spent;
    /// the gate then opens for later connections.
    cut: AtomicBool,
    /// Connections accepted so far.
    conns: AtomicU64,
    /// The connection that reached the budget first (0: none yet); only it
    /// is held, so other requests still reach the upstream.
    held: AtomicU64,
    /// Response bytes per second each connection may pass; 0: unlimited.
    rate: AtomicU64,
}

impl Gate {
    pub async fn start(upstream: SocketAddr) -> Gate {
        Gate::start_buffered(upstream, None).await
    }

    /// [`Gate::start`] with the receive buffer of each connection to the
    /// upstream set to `upstream_rcvbuf` bytes. The kernel grows the buffer
    /// of a paced (slow) reader to megabytes; a small one bounds what of an
    /// answer the gate has not passed yet still arrives once the upstream
    /// is killed (its own send buffer remains).
    pub async fn start_buffered(upstream: SocketAddr, upstream_rcvbuf: Option<u32>) -> Gate {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(GateState {
            passed: AtomicU64::new(0),
            budget: AtomicU64::new(u64::MAX),
            cut: false.into(),
            conns: AtomicU64::new(0),
            held: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = l.accept().await else {
                    return;
                };
                let id = st.conns.fetch_add(1, Ordering::SeqCst) + 1;
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let Ok(up) = connect(upstream, upstream_rcvbuf).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let req = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut dr, &mut uw).await;
                    });
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 << 10];
                    // The budget is checked as bytes go out, not when a read
                    // starts: a pooled connection may already be waiting in
                    // `read` when a test sets the budget.
                    let (started, mut sent) = (tokio::time::Instant::now(), 0u64);
                    'conn: loop {
                        let rate = st.rate.load(Ordering::SeqCst);
                        // Small steps when paced, so the pace is smooth.
                        let step = if rate > 0 {
                            ((rate / 50).max(1024) as usize).min(buf.len())
                        } else {
                            buf.len()
                        };
                        let n = match ur.read(&mut buf[..step]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut off = 0;
                        while off < n {
                            let rate = st.rate.load(Ordering::SeqCst);
                            if rate > 0 {
                                // Pace this connection: no byte before its time.
                                let due =
                                    started + Duration::from_secs_f64(sent as f64 / rate as f64);
                                tokio::time::sleep_until(due).await;
                            }
                            let passed = st.passed.load(Ordering::SeqCst);
                            let budget = st.budget.load(Ordering::SeqCst);
                            let held = st.held.load(Ordering::SeqCst);
                            // Once one connection is held, the others flow.
                            let mine = held == 0 || held == id;
                            if mine && passed >= budget {
                                let _ = st.held.compare_exchange(
                                    0,
                                    id,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                                if st.cut.load(Ordering::SeqCst) {
                                    st.cut.store(false, Ordering::SeqCst);
                                    st.budget.store(u64::MAX, Ordering::SeqCst);
                                    st.held.store(0, Ordering::SeqCst);
                                    break 'conn;
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                continue;
                            }
                            let room = if mine {
                                (budget - passed).min((n - off) as u64) as usize
                            } else {
                                n - off
                            };
                            if mine && passed + room as u64 >= budget {
                                // This connection spends the budget: it is the
                                // one held, claimed before a test can see the
                                // budget spent.
                                let _ = st.held.compare_exchange(
                                    0,
                                    id,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                            }
                            st.passed.fetch_add(room as u64, Ordering::SeqCst);
                            sent += room as u64;
                            if dw.write_all(&buf[off..off + room]).await.is_err() {
                                break 'conn;
                            }
                            off += room;
                        }
                    }
                    req.abort();
                });
            }
        });
        Gate { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets `n` more response bytes through, then holds the connection that
    /// reaches that budget; other connections flow.
    pub fn hold_after(&self, n: u64) {
        self.state.held.store(0, Ordering::SeqCst);
        let p = self.state.passed.load(Ordering::SeqCst);
        self.state.budget.store(p + n, Ordering::SeqCst);
    }

    /// Lets `n` more response bytes through, then closes that connection once.
    pub fn cut_after(&self, n: u64) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.hold_after(n);
    }

    /// Paces every connection, those open and those to come, to
    /// `bytes_per_sec` of response bytes (0: unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.state.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.state.budget.store(u64::MAX, Ordering::SeqCst);
        self.state.held.store(0, Ordering::SeqCst);
    }

    pub fn passed(&self) -> u64 {
        self.state.passed.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> u64 {
        self.state.conns.load(Ordering::SeqCst)
    }
}

/// A connection to `to`, with its receive buffer set first when asked.
async fn connect(to: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<tokio::net::TcpStream> {
    let s = match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    s.connect(to).await
}
