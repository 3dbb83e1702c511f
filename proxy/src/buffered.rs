//! The small write buffer Pingora's own listeners put under every client connection,
//! for the connections our accept loop hands over. Without it a response's header and
//! its body leave as separate writes, so a small response costs the client two TCP
//! segments and two wake-ups instead of one. Pingora flushes at the end of each
//! response and of each streamed body chunk, so nothing waits in the buffer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// Bytes held before a write reaches the socket: one Ethernet-sized segment, Pingora's
/// own default (`DEFAULT_L4_WRITE_BUFFER_SIZE`).
pub const WRITE_BUFFER: usize = 1460;

/// A client connection whose small writes are gathered until Pingora flushes.
#[derive(Debug)]
pub struct Buffered {
    io: BufWriter<Stream>,
}

impl Buffered {
    /// Buffers the writes of `stream`.
    pub fn new(stream: Stream) -> Buffered {
        Buffered {
            io: BufWriter::with_capacity(WRITE_BUFFER, stream),
        }
    }

    fn inner(&self) -> &Stream {
        self.io.get_ref()
    }
}

impl AsyncRead for Buffered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // What is still buffered goes out before the connection closes.
        if let Err(e) = self.io.flush().await {
            tracing::debug!(error = %e, "flush before closing failed");
        }
        let inner: &mut dyn pingora::protocols::IO = &mut **self.io.get_mut();
        Shutdown::shutdown(inner).await;
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

impl Ssl for Buffered {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner().get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner().get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner().selected_alpn_proto()
    }
}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner().get_write_pending_time()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.io.get_mut().set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.io.get_mut().set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.io.get_mut().try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Small writes reach the peer only at the flush, in one piece; large ones pass.
    #[tokio::test]
    async fn gathers_small_writes_until_flushed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut all = Vec::new();
            c.read_to_end(&mut all).await.unwrap();
            all
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut b = Buffered::new(stream);
        b.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        b.write_all(b"hello").await.unwrap();
        assert_eq!(b.io.buffer(), b"HTTP/1.1 200 OK\r\n\r\nhello");
        b.flush().await.unwrap();
        assert!(b.io.buffer().is_empty());
        let big = vec![b'x'; WRITE_BUFFER * 2];
        b.write_all(&big).await.unwrap();
        assert!(b.io.buffer().is_empty(), "a large write is not copied");
        Shutdown::shutdown(&mut b).await;
        drop(b);
        let got = client.await.unwrap();
        assert_eq!(&got[..24], b"HTTP/1.1 200 OK\r\n\r\nhello");
        assert_eq!(got.len(), 24 + WRITE_BUFFER * 2);
    }
}
