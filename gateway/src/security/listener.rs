//! The listeners of a gateway (its HTTP API and its Raft port): [`SecureListener`] accepts
//! connections within [`Limits`] and completes their TLS handshakes (when configured) on
//! their own tasks; [`serve`] runs a router on it. Re-exported by [`super::tls`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Bounds on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections (handshaking or established) on the listener.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_per_peer: usize,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's head once the connection waits for one: an
    /// idle keep-alive connection, or a slow client trickling its headers, is closed after
    /// it ([`serve`]). Node-to-node clients close idle connections after 60 s themselves.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            // Peers pool up to 64 idle connections each (network.rs); leave room for bursts.
            max_per_peer: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The peer of an accepted connection; handlers get it with
/// `axum::extract::ConnectInfo<Remote>` when served by [`serve`].
#[derive(Debug, Clone)]
pub struct Remote {
    pub addr: SocketAddr,
    /// The verified client certificate (leaf), with client-certificate TLS.
    pub client_cert: Option<CertificateDer<'static>>,
}

impl Connected<IncomingStream<'_, SecureListener>> for Remote {
    fn connect_info(stream: IncomingStream<'_, SecureListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A connection slot counted against [`Limits`]; freed when the connection is dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

#[derive(Default)]
struct Counts {
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

impl Counts {
    fn take(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut per = self.per_peer.lock().expect("connection counts");
        let n = per.entry(ip).or_default();
        if *n >= limits.max_per_peer || self.total.load(Ordering::Relaxed) >= limits.max_connections
        {
            if *n == 0 {
                per.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self.counts.per_peer.lock().expect("connection counts");
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection: plain TCP or TLS, holding its slot.
pub struct ServerIo {
    stream: Stream,
    _slot: Slot,
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// A TCP listener that hands `axum::serve` only connections that finished their TLS handshake
/// (or plain ones, without TLS), within [`Limits`].
pub struct SecureListener {
    ready: tokio::sync::mpsc::Receiver<(ServerIo, Remote)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
    limits: Limits,
}

impl Drop for SecureListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl SecureListener {
    /// Starts accepting on `listener`; `tls` = `None` serves plain text.
    pub fn new(listener: TcpListener, tls: Option<Arc<ServerConfig>>, limits: Limits) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        // A small queue: when the server is slow to take connections, accepting slows down too.
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tls.map(TlsAcceptor::from);
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, limits, tx));
        SecureListener {
            ready,
            local,
            accept_task,
            limits,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    limits: Limits,
    tx: tokio::sync::mpsc::Sender<(ServerIo, Remote)>,
) {
    let counts = Arc::new(Counts::default());
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = counts.take(addr.ip(), &limits) else {
            tracing::debug!(%addr, "connection refused: listener or peer at its connection cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            let io = ServerIo {
                stream: Stream::Plain(tcp),
                _slot: slot,
            };
            let remote = Remote {
                addr,
                client_cert: None,
            };
            if tx.send((io, remote)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let io = ServerIo {
                stream: Stream::Tls(Box::new(tls)),
                _slot: slot,
            };
            let _ = tx.send((io, Remote { addr, client_cert })).await;
        });
    }
}

impl axum::serve::Listener for SecureListener {
    type Io = ServerIo;
    type Addr = Remote;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (only by a panic): serve nothing more, without spinning.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Remote {
            addr: self.local,
            client_cert: None,
        })
    }
}

/// Serves `router` (HTTP/1.1) on `listener` until `shutdown` resolves, then lets open
/// requests finish. Handlers may extract `ConnectInfo<Remote>`. A connection that does not
/// send a complete request head within [`Limits::idle_timeout`] of waiting for one (idle
/// keep-alive, or headers trickled slowly) is closed; bodies are bounded by the routes'
/// limits and the callers' own timeouts.
pub async fn serve(
    mut listener: SecureListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let idle = listener.limits.idle_timeout;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender; `recv` ends once they are all gone.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, remote) = tokio::select! {
            c = listener.ready.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(remote.clone()));
            let mut router = router.clone();
            tower_service::Service::call(&mut router, req)
        });
        let mut stop = stop_rx.clone();
        let open = open_tx.clone();
        tokio::spawn(async move {
            let _open = open;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(idle);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection: {e}");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}
