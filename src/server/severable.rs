//! Connections the server can cut: at the end of a shutdown, and at `max_connection_age` +
//! `max_connection_age_grace`.
//!
//! A graceful shutdown tells every connection to go away and waits until each has: tonic has no
//! deadline for that. A connection that never finishes would hold the process forever, and
//! ordinary clients hold one: gRPC client-side health checking keeps a `Health/Watch` stream
//! open on every channel, reflection streams stay open, and a watcher that stopped reading
//! cannot even be sent the UNAVAILABLE that ends its stream. Once the connections have had
//! their chance to close, reads and writes of every one still open fail, hyper drops it, and
//! the shutdown completes.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::server::Connected;

use crate::cancelled::Cancelled;

/// An accepted connection whose reads and writes fail once `cut` is cancelled.
pub(super) struct Severable<IO> {
    io: IO,
    /// Polled on every read and write, so cheaply (see [`Cancelled`]); its waker registration is
    /// what wakes an idle connection to notice the cut.
    cut: Cancelled,
    severed: bool,
    /// Tells whoever waits to cut this connection (its `max_connection_age` timer) that it is
    /// gone, by being dropped with it.
    _closed: Option<DropGuard>,
}

impl<IO> Severable<IO> {
    /// `io`, cut when `cut` is cancelled.
    pub(super) fn new(io: IO, cut: CancellationToken) -> Self {
        Self {
            io,
            cut: Cancelled::new(cut),
            severed: false,
            _closed: None,
        }
    }

    /// `io`, cut when `cut` is cancelled, with `closed` cancelled once the connection is dropped.
    pub(super) fn with_closed(io: IO, cut: CancellationToken, closed: CancellationToken) -> Self {
        Self {
            _closed: Some(closed.drop_guard()),
            ..Self::new(io, cut)
        }
    }

    /// Whether the connection has been cut, noting a cut that just happened (and, when not,
    /// registering to be woken by one).
    fn is_severed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.severed && Pin::new(&mut self.cut).poll(cx).is_ready() {
            self.severed = true;
        }
        self.severed
    }
}

fn severed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the server closed the connection (shutting down, or at max_connection_age)",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Severable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Severable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_severed(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Severable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn an_idle_read_fails_once_cut_and_writes_fail_after() {
        let (near, mut far) = duplex(64);
        let cut = CancellationToken::new();
        let mut conn = Severable::new(near, cut.clone());
        conn.write_all(b"before").await.expect("writes until cut");
        let mut got = [0; 6];
        far.read_exact(&mut got).await.expect("far end reads");

        let reader = tokio::spawn(async move {
            let mut buf = [0; 8];
            let read = conn.read(&mut buf).await;
            (conn, read)
        });
        tokio::task::yield_now().await;
        cut.cancel();
        let (mut conn, read) = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the idle read wakes up")
            .expect("reader task");
        assert_eq!(
            read.expect_err("cut").kind(),
            io::ErrorKind::ConnectionAborted
        );
        assert!(conn.write_all(b"after").await.is_err(), "writes fail too");
        drop(far);
    }
}
