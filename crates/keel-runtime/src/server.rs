//! The startup contract every Keel server follows after `build(config)`: report the bound
//! address, then run until the shutdown signal. `keel up`, the component subcommands and
//! the test kit start any server through it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use crate::shutdown::Shutdown;

pub trait Server: Send + 'static {
    /// The component's name (`registry`, `gateway`, …).
    fn name(&self) -> &str;

    /// The address actually bound (port 0 resolved).
    fn local_addr(&self) -> SocketAddr;

    /// Where clients reach it: `http://` and the bound address, or `https://` for a
    /// server with TLS.
    fn url(&self) -> String {
        format!("http://{}", self.local_addr())
    }

    /// Serves until `shutdown` fires, then drains.
    fn run(self, shutdown: Shutdown) -> impl Future<Output = io::Result<()>> + Send;
}
