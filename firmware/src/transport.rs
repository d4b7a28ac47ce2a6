//! The transport seam: how the client reaches a gateway. Kept as narrow as
//! `embassy-net-driver`: one way to open a byte stream, and read/write/close on it.
//!
//! The client never needs more than one connection at a time, never calls two methods of one
//! connection concurrently, and bounds every call with its own timeout (dropping the future
//! when it expires). An implementation therefore needs no timers of its own.
//!
//! Implementations in this crate: `embassy_net::TcpTransport` (feature `embassy-net`) on
//! devices and `tokio::TcpTransport` (feature `tokio`) on the host (`cairn sim`, tests).

use cairn_protocol::GatewayAddr;

/// Why a transport call failed. Every variant makes the client drop the connection, count a
/// retry and back off; the variants only serve logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TransportError {
    /// The gateway refused or did not answer the connection attempt.
    ConnectFailed,
    /// The peer reset the connection or it broke.
    Reset,
    /// Any other failure of the underlying stack (no route, no buffers, ...).
    Other,
}

impl core::fmt::Display for TransportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TransportError::ConnectFailed => "connect failed",
            TransportError::Reset => "connection reset",
            TransportError::Other => "transport error",
        })
    }
}

impl core::error::Error for TransportError {}

/// Opens byte-stream connections to gateways.
///
/// # Contract
/// - [`connect`](Transport::connect) resolves once the stream is established (TCP handshake
///   done) or has failed. The client wraps it in its connect timeout and may drop the future at
///   any point; a dropped attempt must leave the transport usable for the next one.
/// - At most one connection is alive at a time: the client drops the previous one before
///   calling `connect` again, which is why a connection may borrow the transport (its socket
///   buffers, for example).
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// One established connection.
    type Connection<'a>: Connection
    where
        Self: 'a;

    /// Open a stream to `addr`.
    async fn connect(&mut self, addr: GatewayAddr) -> Result<Self::Connection<'_>, TransportError>;
}

/// An established, ordered, reliable byte stream (TCP or equivalent).
///
/// # Contract
/// - [`read`](Connection::read) waits until at least one byte is available, then copies as
///   many as fit into `buf` and returns the count. `Ok(0)` means the peer closed its side
///   (end of stream); `buf` is never empty. **Read must be cancel-safe**: the client races it
///   against timers and its own wake-ups and drops the future when another branch wins; a
///   dropped read must not have consumed any byte (embassy-net's and tokio's reads are).
/// - [`write`](Connection::write) waits until at least one byte can be queued, queues as many
///   as fit and returns the count (never 0 for a non-empty `buf` unless the stream is broken,
///   which is an error instead). It need not be cancel-safe: if the client drops a write it
///   drops the connection too.
/// - Bytes queued by `write` must go out without further calls (the stack sends them on its
///   own, as embassy-net and tokio do), so the client can pipeline frames.
/// - [`flush`](Connection::flush) waits until the queued bytes were sent (embassy-net: and
///   acknowledged by the peer's TCP). The client calls it only before `close`.
/// - [`close`](Connection::close) starts a graceful close (FIN). The client bounds it with a
///   timeout and drops the connection afterwards; dropping without `close` must abort the
///   connection without blocking.
/// - Errors are final for the connection: the client never calls it again after one.
#[allow(async_fn_in_trait)]
pub trait Connection {
    /// Read available bytes into `buf`; `Ok(0)` is end of stream.
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Queue bytes from `buf`; returns how many were taken.
    async fn write(&mut self, buf: &[u8]) -> Result<usize, TransportError>;
    /// Wait until queued bytes are on their way.
    async fn flush(&mut self) -> Result<(), TransportError>;
    /// Graceful close.
    async fn close(&mut self);
}

/// Write all of `buf` (helper over [`Connection::write`]).
pub(crate) async fn write_all<C: Connection>(
    conn: &mut C,
    mut buf: &[u8],
) -> Result<(), TransportError> {
    while !buf.is_empty() {
        match conn.write(buf).await? {
            0 => return Err(TransportError::Reset),
            n => buf = &buf[n..],
        }
    }
    Ok(())
}
