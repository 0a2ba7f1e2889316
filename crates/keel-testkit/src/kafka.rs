//! A Kafka broker of one test's own (tansu, in memory), behind a fault proxy.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::FaultProxy;

/// The fetch wait Kafka clients in tests use (`KafkaOptions::fetch_wait`): tansu holds
/// every fetch for up to that long even when records are waiting, which would otherwise
/// add the default's 100 ms to each hop.
pub const KAFKA_FETCH_WAIT: Duration = Duration::from_millis(10);

/// A tansu broker for one test, reachable only through [`ProxiedKafka::proxy`]: it
/// advertises the proxy's address, so every connection a Kafka client makes (not only the
/// bootstrap one) crosses the proxy, and cutting the proxy cuts them all. Killed when
/// dropped; it keeps nothing on disk.
pub struct ProxiedKafka {
    pub proxy: FaultProxy,
    broker: Child,
}

impl ProxiedKafka {
    pub async fn start() -> Self {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a free port for tansu");
            listener.local_addr().expect("its address").port()
        };
        let broker_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = FaultProxy::start(broker_addr).await;
        let broker = Command::new(tansu())
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://{broker_addr}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{}", proxy.addr()))
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(broker_addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {broker_addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { proxy, broker }
    }

    /// The bootstrap address clients are given: the proxy's.
    pub fn brokers(&self) -> String {
        self.proxy.addr().to_string()
    }
}

impl Drop for ProxiedKafka {
    fn drop(&mut self) {
        let _ = self.broker.kill();
        let _ = self.broker.wait();
    }
}

/// `tansu` from PATH, else where `cargo install` puts it.
fn tansu() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
            PathBuf::from,
        );
        cargo_home.join("bin").join("tansu")
    })
}
