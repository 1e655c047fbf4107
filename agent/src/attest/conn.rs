//! One accepted connection on the agent's sockets, and what is known of it for as long as it
//! lives: the kernel's word on who connected (SO_PEERCRED, read at accept), when it was
//! accepted, and, once proven, which identity it is served.
//!
//! The gRPC server sees each connection as a [`Conn`]; every request on it carries a clone of
//! its [`ConnInfo`] (tonic's `Connected`), so the identity proven for the first request is
//! shared by every later one on the same connection, and a connection whose caller failed
//! attestation can be closed ([`ConnInfo::close_soon`]) rather than be asked again and again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::net::unix::UCred;
use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::identity::SpiffeId;

/// How long a connection refused as unauthenticated stays open, so that the refusal reaches
/// the caller before the connection closes.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// What is known of one connection; cheap to clone (every request gets a copy).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The connecting process, as the kernel recorded it at `connect` (SO_PEERCRED).
    pub peer_cred: Option<UCred>,
    /// When the agent accepted it (wall clock: compared with a process's start time).
    pub accepted_at: SystemTime,
    /// The identity proven for this connection, once proven.
    attested: Arc<OnceCell<SpiffeId>>,
    close: CancellationToken,
}

/// An accepted Unix socket connection that the agent can close from the request side.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    info: ConnInfo,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Conn {
    /// Wraps a connection just accepted, reading its peer credentials now.
    pub fn accepted(stream: UnixStream) -> Self {
        let close = CancellationToken::new();
        let info = ConnInfo {
            peer_cred: stream.peer_cred().ok(),
            accepted_at: SystemTime::now(),
            attested: Arc::new(OnceCell::new()),
            close: close.clone(),
        };
        Self {
            stream,
            info,
            closed: Box::pin(close.cancelled_owned()),
        }
    }

    /// What requests on this connection will carry.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// Err once the connection was closed by [`ConnInfo::close_soon`].
    fn check_open(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by the agent: the caller failed attestation",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl ConnInfo {
    /// The identity proven for this connection, proving it with `prove` on the first call
    /// (concurrent first calls share one proof). A failed proof is not kept: the next
    /// request tries again, unless the connection was closed.
    pub async fn attested<F, Fut, E>(&self, prove: F) -> Result<SpiffeId, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SpiffeId, E>>,
    {
        self.attested.get_or_try_init(prove).await.cloned()
    }

    /// Closes the connection after a short grace, so the answer now being sent arrives.
    pub fn close_soon(&self) {
        let close = self.close.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            close.cancel();
        });
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_open(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
