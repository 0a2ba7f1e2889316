//! A limit on how long a write to a client may wait for the client to read: a client that
//! asks for a large response and stops reading would otherwise hold its connection, the
//! upstream connection the response streams from and the upstream's work for as long as
//! it likes (NGINX's `send_timeout`). The clock runs only while a write waits, so a client
//! that reads slowly but keeps reading is served to the end.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client connection whose writes fail with [`io::ErrorKind::TimedOut`] once one has
/// waited `limit` for the client without any byte taken.
pub(crate) struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    /// Made at the first write that waits: most connections never need it.
    timer: Option<Pin<Box<Sleep>>>,
    /// The last write waited: the timer runs from when it began to.
    waiting: bool,
}

impl<S> SendTimeout<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            waiting: false,
        }
    }

    /// What a write's outcome means with the clock: progress stops it; a wait starts it, or
    /// fails the write once it has run out.
    fn watch(
        &mut self,
        cx: &mut Context<'_>,
        wrote: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let Poll::Pending = wrote else {
            self.waiting = false;
            return wrote;
        };
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.waiting {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.waiting = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let wrote = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, wrote)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let wrote = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, wrote)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Long against the readers' pace (20 times it), so that a stalled test thread on a
    /// loaded machine cannot pass for a reader that stopped.
    const LIMIT: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_write_the_reader_never_takes_fails_after_the_limit() {
        let (near, _far) = tokio::io::duplex(1024);
        let mut near = SendTimeout::new(near, LIMIT);
        let started = std::time::Instant::now();
        let error = near.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= LIMIT && waited < LIMIT * 10, "{waited:?}");
    }

    #[tokio::test]
    async fn a_reader_that_keeps_reading_gets_everything_however_long_it_takes() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = SendTimeout::new(near, LIMIT);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0; 512];
            loop {
                tokio::time::sleep(LIMIT / 20).await;
                match far.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        // 32 reads of 512 bytes, LIMIT / 20 apart: 1.6 times the limit in all.
        let sent: Vec<u8> = (0..16384u32).map(|i| i as u8).collect();
        near.write_all(&sent).await.unwrap();
        near.shutdown().await.unwrap();
        drop(near);
        assert_eq!(reader.await.unwrap(), sent);
    }
}
