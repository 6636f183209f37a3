//! A fault-injection TCP proxy on loopback, placed between a client and a real server (Redis, a Redlock
//! node, PostgreSQL): it passes bytes through, delays them, freezes them (holds every byte in both
//! directions, connections stay open — a hung server as the client sees it), or cuts every open
//! connection (new ones are still accepted), or hangs every open connection for good while new ones
//! pass (a peer that vanished without a reset: what a client meets on a connection that outlived its
//! server's restart behind a stateful middlebox).
//!
//! ```ignore
//! let proxy = FaultProxy::start(redis.port()).await;
//! let lock = RedisDistributedLock::new(&proxy.redis_url()).await?;
//! proxy.freeze();   // the server "hangs": requests go out, no answer comes back
//! proxy.pass();     // the held bytes flow again, in order
//! proxy.cut();      // every open connection is reset
//! proxy.hang_open(); // every open connection hangs forever; new ones pass
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the proxy does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward at once.
    Pass,
    /// Forward each chunk after this delay (in order).
    Delay(Duration),
    /// Hold every byte until the mode changes.
    Freeze,
    /// Let requests through but hold every answer (server to client) until the mode changes: the
    /// server acts, the client does not hear of it.
    FreezeAnswers,
}

/// A TCP proxy from a free loopback port to `127.0.0.1:{upstream}`. Stops (and drops every connection)
/// on `Drop`.
pub struct FaultProxy {
    port: u16,
    mode: Arc<watch::Sender<ProxyMode>>,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    hang: Arc<std::sync::Mutex<CancellationToken>>,
    forwarded: Arc<AtomicU64>,
    accept: JoinHandle<()>,
    stop: CancellationToken,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("mode", &*self.mode.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy in [`ProxyMode::Pass`] to the server on loopback port `upstream`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on 127.0.0.1");
        let port = listener.local_addr().expect("proxy address").port();
        let mode = Arc::new(watch::channel(ProxyMode::Pass).0);
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let hang = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&mode),
            Arc::clone(&cut),
            Arc::clone(&hang),
            Arc::clone(&forwarded),
            stop.clone(),
        ));
        FaultProxy {
            port,
            mode,
            cut,
            hang,
            forwarded,
            accept,
            stop,
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Forwards at once (and releases what a freeze held).
    pub fn pass(&self) {
        self.mode.send_replace(ProxyMode::Pass);
    }

    /// Delays every chunk by `delay`.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_replace(ProxyMode::Delay(delay));
    }

    /// Holds every byte, both ways, until [`pass`](Self::pass) or [`delay`](Self::delay).
    pub fn freeze(&self) {
        self.mode.send_replace(ProxyMode::Freeze);
    }

    /// Passes requests but holds every answer until [`pass`](Self::pass).
    pub fn freeze_answers(&self) {
        self.mode.send_replace(ProxyMode::FreezeAnswers);
    }

    /// Resets every open connection; later connections are accepted as usual.
    pub fn cut(&self) {
        let mut current = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        current.cancel();
        *current = CancellationToken::new();
    }

    /// Hangs every connection open now, for good: nothing more passes either way and the sockets stay
    /// open (no reset, no close) until [`cut`](Self::cut) or drop. Connections made later pass.
    pub fn hang_open(&self) {
        let mut current = self.hang.lock().unwrap_or_else(|p| p.into_inner());
        current.cancel();
        *current = CancellationToken::new();
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<ProxyMode>>,
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    hang: Arc<std::sync::Mutex<CancellationToken>>,
    forwarded: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        let connection_cut = cut.lock().unwrap_or_else(|p| p.into_inner()).child_token();
        let connection_hang = hang.lock().unwrap_or_else(|p| p.into_inner()).child_token();
        let (mode, forwarded) = (mode.subscribe(), Arc::clone(&forwarded));
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return; // the server is down: the client sees the connection close
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(
                client_read,
                server_write,
                mode.clone(),
                Arc::clone(&forwarded),
                connection_hang.clone(),
                false,
            );
            let down = pump(
                server_read,
                client_write,
                mode,
                forwarded,
                connection_hang,
                true,
            );
            tokio::select! {
                _ = connection_cut.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
            // Dropping both halves closes both sockets.
        });
    }
}

/// Copies `from` to `to`, chunk by chunk, obeying the mode for every chunk; `answers` is the server to
/// client direction.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    forwarded: Arc<AtomicU64>,
    hang: CancellationToken,
    answers: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            () = hang.cancelled() => return std::future::pending().await,
            read = from.read(&mut buffer) => read,
        };
        let read = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => read,
        };
        if hang.is_cancelled() {
            return std::future::pending().await;
        }
        loop {
            let current = *mode.borrow_and_update();
            match current {
                ProxyMode::Pass => break,
                ProxyMode::FreezeAnswers if !answers => break,
                ProxyMode::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                ProxyMode::Freeze | ProxyMode::FreezeAnswers => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
        forwarded.fetch_add(read as u64, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        stream.write_all(b"ping").await.ok()?;
        let mut answer = [0u8; 4];
        tokio::time::timeout(within, stream.read_exact(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(answer.to_vec())
    }

    #[tokio::test]
    async fn passes_delays_freezes_and_cuts() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert_eq!(
            round_trip(&mut stream, Duration::from_secs(2)).await,
            Some(b"ping".to_vec())
        );

        proxy.delay(Duration::from_millis(150));
        let started = std::time::Instant::now();
        assert!(
            round_trip(&mut stream, Duration::from_secs(2))
                .await
                .is_some()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "both ways delayed"
        );

        proxy.freeze();
        assert_eq!(
            round_trip(&mut stream, Duration::from_millis(300)).await,
            None,
            "a frozen proxy answers nothing"
        );
        proxy.pass();
        let mut held = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut held))
            .await
            .expect("the held bytes arrive after the thaw")
            .unwrap();
        assert_eq!(&held, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a cut connection is closed");
        let mut again = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert!(
            round_trip(&mut again, Duration::from_secs(2))
                .await
                .is_some()
        );
        assert!(proxy.forwarded_bytes() >= 16);

        proxy.hang_open();
        assert_eq!(
            round_trip(&mut again, Duration::from_millis(300)).await,
            None,
            "an open connection hangs"
        );
        let mut fresh = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        assert!(
            round_trip(&mut fresh, Duration::from_secs(2))
                .await
                .is_some(),
            "a new connection passes"
        );
    }
}
