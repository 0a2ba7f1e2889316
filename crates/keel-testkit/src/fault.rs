//! A fault-injecting TCP proxy (Toxiproxy-style) to put between code under test and a
//! shared backing service, so a test can cut the link without touching the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const PASS: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

/// Forwards every connection to `upstream`, until told to fail: [`FaultProxy::cut`]
/// (connections closed, new ones refused) or [`FaultProxy::blackhole`] (connections stay
/// open and nothing comes back: the peer that never answers, which only timeouts catch).
pub struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Bumped on every change of mode; live connections watch it.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let mode = Arc::new(AtomicU8::new(PASS));
        let (generation, _) = watch::channel(0);
        let task = tokio::spawn({
            let mode = Arc::clone(&mode);
            let generation = generation.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let changed = generation.subscribe();
                    tokio::spawn(relay(client, upstream, Arc::clone(&mode), changed));
                }
            }
        });
        Self {
            addr,
            mode,
            generation,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and closes new ones at once.
    pub fn cut(&self) {
        self.set(CUT);
    }

    /// Stops every byte both ways, on open connections and new ones, while keeping them
    /// open.
    pub fn blackhole(&self) {
        self.set(BLACKHOLE);
    }

    /// Lets connections through again (connections cut or blackholed stay closed).
    pub fn restore(&self) {
        self.set(PASS);
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Carries one connection until the mode changes away from passing; a blackholed
/// connection is then held, silent, until the next change.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    mode: Arc<AtomicU8>,
    mut changed: watch::Receiver<u64>,
) {
    if mode.load(Ordering::SeqCst) == PASS {
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            _ = changed.changed() => {}
        }
    }
    if mode.load(Ordering::SeqCst) == BLACKHOLE {
        let _ = changed.changed().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(CUT);
    }
}
