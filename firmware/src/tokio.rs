//! The host adapter (feature `tokio`): [`TcpTransport`] runs the client over tokio's TCP, the
//! way `cairn sim`, the tests and any Linux program use it; [`TokioConnection`] is the
//! connection over any tokio byte stream (TCP, or an in-memory `duplex` pipe in tests); and
//! [`read_frame`] reads frames
//! off any tokio stream through the protocol's [`FrameReassembler`] (for host-side peers such
//! as test gateways).
//!
//! The client is `!Send` with `NoopRawMutex`: drive [`Client::run`](crate::Client::run) on a
//! tokio `current_thread` runtime inside a `LocalSet`, one task per device, with this crate's
//! `std` feature for the embassy-time driver.
//!
//! ```no_run
//! use cairn_firmware::tokio::TcpTransport;
//! use cairn_firmware::{BootNonce, Client, Config, GatewayAddr, OverflowPolicy, Value};
//! use embassy_sync::blocking_mutex::raw::NoopRawMutex;
//!
//! let gateways: &'static [GatewayAddr] =
//!     Box::leak(Box::new([GatewayAddr::new([127, 0, 0, 1], 4003)]));
//! let config: &'static Config<'static> =
//!     Box::leak(Box::new(Config::new(1, [7; 32], 1, BootNonce::from_rng([9; 12]), gateways)));
//! let client: &'static Client<NoopRawMutex, 4096> =
//!     Box::leak(Box::new(Client::new(OverflowPolicy::RejectNewest)));
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! tokio::task::LocalSet::new().block_on(&rt, async {
//!     tokio::task::spawn_local(async { client.run(&mut TcpTransport::new(), config).await });
//!     client.push(1, &[Value::F32(21.5)]).expect("room in the outbox");
//!     while client.status().acked_through < 1 {
//!         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!     }
//! });
//! # Ok::<(), std::io::Error>(())
//! ```

extern crate std;

use std::io;

use ::tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ::tokio::net::TcpStream;
use cairn_protocol::{FrameError, FrameReassembler, GatewayAddr};

use crate::transport::{Connection, Transport, TransportError};

/// Opens tokio TCP connections (with `TCP_NODELAY`, so pipelined frames leave at once).
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpTransport;

impl TcpTransport {
    /// A transport; it holds no state, every connection is its own socket.
    pub const fn new() -> Self {
        TcpTransport
    }
}

/// A [`Connection`] over a tokio byte stream: a `TcpStream` from [`TcpTransport`], or any
/// other stream a test transport hands out.
#[derive(Debug)]
pub struct TokioConnection<S = TcpStream>(S);

impl<S> TokioConnection<S> {
    /// Wraps an established stream.
    pub const fn new(stream: S) -> Self {
        TokioConnection(stream)
    }

    /// The stream.
    pub fn into_inner(self) -> S {
        self.0
    }
}

impl Transport for TcpTransport {
    type Connection<'a> = TokioConnection;

    async fn connect(&mut self, addr: GatewayAddr) -> Result<TokioConnection, TransportError> {
        let stream = TcpStream::connect(core::net::SocketAddrV4::from(addr))
            .await
            .map_err(|_| TransportError::ConnectFailed)?;
        stream
            .set_nodelay(true)
            .map_err(|_| TransportError::Other)?;
        Ok(TokioConnection(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection for TokioConnection<S> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        // tokio's reads (TCP, duplex) are cancel-safe, as the seam requires.
        self.0.read(buf).await.map_err(|_| TransportError::Reset)
    }
    async fn write(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        self.0.write(buf).await.map_err(|_| TransportError::Reset)
    }
    async fn flush(&mut self) -> Result<(), TransportError> {
        self.0.flush().await.map_err(|_| TransportError::Reset)
    }
    async fn close(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// Reads until `frames` holds a whole frame and returns it; `Ok(None)` when the stream ended
/// between frames. A bad header is an [`io::ErrorKind::InvalidData`] error carrying the
/// [`FrameError`], a stream that ends inside a frame [`io::ErrorKind::UnexpectedEof`].
/// Cancel-safe if the stream's read is (tokio's are): bytes read stay in `frames`.
pub async fn read_frame<'f, R: AsyncRead + Unpin, const N: usize>(
    stream: &mut R,
    frames: &'f mut FrameReassembler<N>,
) -> io::Result<Option<&'f mut [u8]>> {
    let invalid = |e: FrameError| io::Error::new(io::ErrorKind::InvalidData, e);
    while !frames.frame_ready().map_err(invalid)? {
        let n = stream.read(frames.read_buf()).await?;
        if n == 0 {
            return match frames.finish() {
                Ok(()) => Ok(None),
                Err(FrameError::Truncated) => Err(io::ErrorKind::UnexpectedEof.into()),
                Err(e) => Err(invalid(e)),
            };
        }
        frames.commit(n);
    }
    frames.next_frame().map_err(invalid)
}
