//! [`Transport`] over embassy-net 0.9 TCP sockets (feature `embassy-net`).
//!
//! The transport owns the socket buffers, so one `TcpTransport` serves the client's single
//! connection at a time without `'static` buffers of its own: put the transport in the task
//! that runs [`crate::Client::run`].
//!
//! ```text
//! let mut transport = TcpTransport::<1024, 1536>::new(stack);
//! CLIENT.run(&mut transport, &config).await
//! ```
//!
//! Buffer sizes: the receive side only ever holds small gateway frames (Ack, Pong: under
//! 64 bytes each), so 256-1024 bytes suffice; the send side holds whole batch frames (up to
//! `MAX_FRAME` = 1024 bytes) until the gateway's TCP acknowledges them, so give it at least
//! one frame, better one and a half, for throughput.

use cairn_protocol::GatewayAddr;
use embassy_net::tcp::{ConnectError, TcpSocket};
use embassy_net::{IpAddress, IpEndpoint, Ipv4Address, Stack};

use crate::transport::{Connection, Transport, TransportError};

/// TCP transport with `RX`/`TX` bytes of socket buffer.
pub struct TcpTransport<'d, const RX: usize = 512, const TX: usize = 1536> {
    stack: Stack<'d>,
    rx: [u8; RX],
    tx: [u8; TX],
    keep_alive: Option<embassy_time::Duration>,
}

impl<'d, const RX: usize, const TX: usize> TcpTransport<'d, RX, TX> {
    /// A transport on `stack`. The stack's runner must be running; while it has no address
    /// (DHCP pending, link down) connecting fails and the client backs off.
    pub fn new(stack: Stack<'d>) -> Self {
        Self {
            stack,
            rx: [0; RX],
            tx: [0; TX],
            keep_alive: None,
        }
    }

    /// TCP keep-alive interval for new connections (default off: the client pings itself).
    pub fn set_keep_alive(&mut self, interval: Option<embassy_time::Duration>) {
        self.keep_alive = interval;
    }
}

/// One TCP connection of a [`TcpTransport`].
pub struct TcpConnection<'a> {
    socket: TcpSocket<'a>,
}

impl<const RX: usize, const TX: usize> Transport for TcpTransport<'_, RX, TX> {
    type Connection<'a>
        = TcpConnection<'a>
    where
        Self: 'a;

    async fn connect(&mut self, addr: GatewayAddr) -> Result<TcpConnection<'_>, TransportError> {
        let mut socket = TcpSocket::new(self.stack, &mut self.rx, &mut self.tx);
        socket.set_keep_alive(self.keep_alive);
        // Frames are written whole: Nagle would only hold a Ping back behind an unacked batch.
        socket.set_nagle_enabled(false);
        let [a, b, c, d] = addr.ip;
        let endpoint = IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)), addr.port);
        match socket.connect(endpoint).await {
            Ok(()) => Ok(TcpConnection { socket }),
            Err(ConnectError::ConnectionReset | ConnectError::TimedOut) => {
                Err(TransportError::ConnectFailed)
            }
            Err(ConnectError::NoRoute | ConnectError::InvalidState) => Err(TransportError::Other),
        }
    }
}

impl Connection for TcpConnection<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        // embassy-net's read consumes bytes only when it completes: cancel-safe.
        self.socket
            .read(buf)
            .await
            .map_err(|_| TransportError::Reset)
    }

    async fn write(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        match self.socket.write(buf).await {
            Ok(0) => Err(TransportError::Reset),
            Ok(n) => Ok(n),
            Err(_) => Err(TransportError::Reset),
        }
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.socket.flush().await.map_err(|_| TransportError::Reset)
    }

    async fn close(&mut self) {
        self.socket.close();
        let _ = self.socket.flush().await;
    }
}
