//! HTTP/2 clients that stop taking a response. Such a client need not stop reading its
//! connection: it only stops granting flow-control window, hyper stops pulling the
//! response body, and no socket write ever waits, so the connection's send timeout
//! ([`crate::send_timeout`]) never starts, while the upstream connection the response
//! streams from is held for as long as the client likes — 256 streams a connection.
//!
//! Each streamed response body on an HTTP/2 connection is watched: the time it has waited
//! to be pulled since it last delivered a frame (or since the response went out) runs
//! against the send timeout, and a connection's one watchdog task drops the upstream body
//! of a stream past it. The stream then ends with an error at hyper's next pull (a reset).
//! Time spent waiting on the upstream does not count.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use keel_runtime::resilience::endpoint::now_nanos;

/// The streams of one connection, and its watchdog's pace.
pub(crate) struct StallWatch {
    limit: Duration,
    streams: Mutex<Vec<Weak<Stream>>>,
}

struct Stream {
    /// The response body, until given up.
    body: Mutex<Option<Body>>,
    /// Since when (in `now_nanos`) it waits to be pulled; 0 while it is being pulled or
    /// waits on the upstream.
    waiting_since: AtomicU64,
}

impl StallWatch {
    /// A watch for one connection; its watchdog runs while the watch lives.
    pub(crate) fn start(limit: Duration) -> Arc<Self> {
        let watch = Arc::new(Self {
            limit,
            streams: Mutex::new(Vec::new()),
        });
        tokio::spawn(Self::watchdog(Arc::downgrade(&watch), limit));
        watch
    }

    async fn watchdog(watch: Weak<Self>, limit: Duration) {
        // A stall is cut between one and 1.25 limits after it began.
        let mut tick = tokio::time::interval((limit / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(watch) = watch.upgrade() else { return };
            watch.sweep(now_nanos());
        }
    }

    /// Gives up the bodies of streams that waited on their client past the limit, and
    /// forgets ended streams.
    fn sweep(&self, now: u64) {
        let limit = u64::try_from(self.limit.as_nanos()).unwrap_or(u64::MAX);
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.retain(|stream| {
            let Some(stream) = stream.upgrade() else {
                return false;
            };
            let since = stream.waiting_since.load(Ordering::Relaxed);
            if since == 0 || now.saturating_sub(since) < limit {
                return true;
            }
            let body = stream
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if body.is_some() {
                metrics::counter!("keel_gateway_client_stalls_total").increment(1);
                tracing::debug!("an HTTP/2 client took nothing of a response for the send timeout");
            }
            false
        });
    }

    /// `body`, watched; a body that has ended already needs no watching.
    pub(crate) fn watch(&self, body: Body) -> Body {
        if http_body::Body::is_end_stream(&body) {
            return body;
        }
        let stream = Arc::new(Stream {
            body: Mutex::new(Some(body)),
            waiting_since: AtomicU64::new(now_nanos()),
        });
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&stream));
        Body::new(Watched(stream))
    }
}

impl Stream {
    /// What `look` says of the body; `None` once given up.
    fn peek<T>(&self, look: impl FnOnce(&Body) -> T) -> Option<T> {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(look)
    }
}

/// A response body the watchdog may give up.
struct Watched(Arc<Stream>);

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let stream = &self.0;
        stream.waiting_since.store(0, Ordering::Relaxed);
        let mut body = stream.body.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(axum::Error::new(
                "the client took nothing of the response for the send timeout",
            ))));
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            stream.waiting_since.store(now_nanos(), Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.peek(http_body::Body::is_end_stream).unwrap_or(false)
    }

    fn size_hint(&self) -> SizeHint {
        self.0.peek(http_body::Body::size_hint).unwrap_or_default()
    }
}
