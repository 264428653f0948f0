//! The client socket during start-up reads ahead: one `recv` takes a whole
//! startup packet or password message instead of one for the length word
//! and one for the body. Large reads (the relay's) bypass the buffer, and
//! the buffer is freed whenever it runs empty, so an idle session keeps
//! none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads smaller than this fill the read-ahead buffer first.
const READ_AHEAD_BYTES: usize = 4096;

pub struct Prefetched<S> {
    inner: S,
    ahead: BytesMut,
}

impl<S> Prefetched<S> {
    pub fn new(inner: S) -> Self {
        Prefetched {
            inner,
            ahead: BytesMut::new(),
        }
    }

    /// Bytes received but not yet read: before a TLS upgrade, bytes the
    /// client sent in clear text ahead of the server's answer.
    pub fn has_buffered(&self) -> bool {
        !self.ahead.is_empty()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The socket, dropping the read-ahead; check [`Self::has_buffered`]
    /// first when its bytes matter.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefetched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            if out.remaining() >= READ_AHEAD_BYTES {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.ahead.reserve(READ_AHEAD_BYTES);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.ahead
            ))?;
            if n == 0 {
                this.ahead = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
        let n = this.ahead.len().min(out.remaining());
        out.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        if this.ahead.is_empty() {
            this.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefetched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn small_reads_come_from_one_read_ahead_and_large_ones_bypass_it() {
        let (mut far, near) = duplex(64 * 1024);
        let mut p = Prefetched::new(near);
        far.write_all(b"\0\0\0\x08abcdREST")
            .await
            .expect("duplex i/o");
        assert_eq!(p.read_i32().await.expect("duplex i/o"), 8);
        // The whole write was taken at once: the rest waits in the buffer.
        assert!(p.has_buffered());
        let mut body = [0u8; 4];
        p.read_exact(&mut body).await.expect("duplex i/o");
        assert_eq!(&body, b"abcd");
        let mut big = vec![0u8; READ_AHEAD_BYTES * 2];
        let n = p.read(&mut big).await.expect("duplex i/o");
        assert_eq!(&big[..n], b"REST");
        assert!(!p.has_buffered());
        assert_eq!(p.ahead.capacity(), 0, "an empty read-ahead is freed");

        far.write_all(&vec![7u8; READ_AHEAD_BYTES * 2])
            .await
            .expect("duplex i/o");
        let n = p.read(&mut big).await.expect("duplex i/o");
        assert_eq!(n, READ_AHEAD_BYTES * 2);
        assert_eq!(p.ahead.capacity(), 0, "a large read never fills the buffer");

        drop(far);
        assert_eq!(p.read(&mut body).await.expect("duplex i/o"), 0);
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut far, near) = duplex(1024);
        let mut p = Prefetched::new(near);
        p.write_all(b"N").await.expect("duplex i/o");
        let mut got = [0u8; 1];
        far.read_exact(&mut got).await.expect("duplex i/o");
        assert_eq!(&got, b"N");
    }
}
