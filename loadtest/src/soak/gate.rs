//! A TCP gate between regproxy and the upstream that the soak can cut: every
//! connection through it is dropped at once, and new ones are refused (taken
//! and closed) for a while.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Gate {
    /// `host:port` to give regproxy as its upstream.
    pub addr: String,
    /// Bumped on every cut; the `Instant` is until when new connections are refused.
    cut: Arc<watch::Sender<(u64, Instant)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(upstream: String) -> anyhow::Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (tx, _) = watch::channel((0u64, Instant::now()));
        let cut = Arc::new(tx);
        let c = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (generation, refuse_until) = *c.borrow();
                if Instant::now() < refuse_until {
                    drop(client);
                    continue;
                }
                let mut rx = c.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|(g, _)| *g != generation) => {}
                    }
                    // Dropped with unread data, both ends see a reset.
                });
            }
        });
        Ok(Gate { addr, cut, task })
    }

    /// Cuts every connection through the gate; refuses new ones for `down`.
    pub fn cut(&self, down: Duration) {
        self.cut
            .send_modify(|(g, until)| (*g, *until) = (*g + 1, Instant::now() + down));
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
