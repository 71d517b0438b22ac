//! A loopback TCP proxy in front of a Redis server, to cut one instance off from Redis while
//! the others still reach it (a network partition of one process), and to heal it again.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// A proxy to `127.0.0.1:{target}` on an ephemeral loopback port; it stops with the value.
#[derive(Debug)]
pub struct Proxy {
    address: SocketAddr,
    /// The port connections are forwarded to (read as each connection opens).
    target: Arc<AtomicU16>,
    cut: Arc<AtomicBool>,
    /// Bumped on each cut: every open connection watches it and closes.
    generation: watch::Sender<u64>,
    /// Connections being forwarded now.
    open: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to the Redis server on `target` (must run inside a Tokio runtime).
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU16::new(target));
        let forwarding_to = Arc::clone(&target);
        let (generation, watcher) = watch::channel(0u64);
        let refusing = Arc::clone(&cut);
        let open = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&open);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if refusing.load(Ordering::Acquire) {
                    drop(client); // cut off: the client sees its connection closed at once
                    continue;
                }
                counted.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(forward(
                    client,
                    forwarding_to.load(Ordering::Acquire),
                    watcher.clone(),
                    Arc::clone(&refusing),
                    Arc::clone(&counted),
                ));
            }
        });
        Self {
            address,
            target,
            cut,
            generation,
            open,
            accept,
        }
    }

    /// The proxy's loopback port.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Closes every open connection and refuses new ones until [`Proxy::heal`]; returns once
    /// every connection is closed, so nothing sent afterwards gets through.
    pub async fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
        while self.open.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Forwards the connections opened from now on to the server on `port` (a failover to
    /// another server at the same address); cut first to move the open ones too.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::Release);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn forward(
    mut client: TcpStream,
    target: u16,
    mut cut: watch::Receiver<u64>,
    refusing: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
) {
    if let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", target)).await {
        cut.mark_unchanged();
        // A cut made while this connection was being opened closes it too.
        if refusing.load(Ordering::Acquire) {
            open.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = cut.changed() => {}
        }
    }
    // Both sockets are closed when this returns.
    drop(client);
    open.fetch_sub(1, Ordering::AcqRel);
}
