//! fsd as a library on its own runtime thread, for tests that need a configuration the binary
//! refuses or a look at the server's counters.

use std::sync::Arc;

use fsd::server::{self, Config, Credentials, Server};
use tokio_util::sync::CancellationToken;

use super::TOKEN;

pub struct InProc {
    pub server: Arc<Server>,
    pub addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub done: std::sync::mpsc::Receiver<()>,
    _rt: std::thread::JoinHandle<()>,
}

/// An fsd serving `root` with the harness's single token.
pub fn start(root: &std::path::Path) -> InProc {
    start_with(Config::new(root.to_path_buf(), Credentials::single(TOKEN)))
}

pub fn start_with(config: Config) -> InProc {
    let server = Server::new(config).unwrap();
    let shutdown = CancellationToken::new();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    let (s, sd) = (server.clone(), shutdown.clone());
    let rt = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            server::run(l, s, sd).await.unwrap();
        });
        let _ = done_tx.send(());
    });
    InProc {
        server,
        addr: addr_rx.recv().unwrap(),
        shutdown,
        done,
        _rt: rt,
    }
}
