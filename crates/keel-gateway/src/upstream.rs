//! The HTTP/1.1 upstream connection pool.
//!
//! hyper's pooled client runs every upstream connection as a task of its own: a request
//! travels to it through a channel and the response comes back through another, and the
//! pool is keyed by a hashed scheme and authority. Here the request's own task drives the
//! connection: while waiting for the response head, and then, through [`DrivenBody`],
//! while the response body streams to the client. A connection goes back to the pool once
//! its response body has been read to the end. Upgrades and HTTP/2 upstreams still use
//! hyper's client.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::balance::Fnv;
use crate::config::UpstreamClientConfig;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The connection failed while the request was under way (or the request's own body
    /// failed; see the source).
    Http(hyper::Error),
    /// The connection ended before it answered.
    Closed,
    /// From hyper's pooled client (HTTP/2 upstreams, upgrades).
    Pooled(hyper_util::client::legacy::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Pooled(error) => error.is_connect(),
            Self::Http(_) | Self::Closed => false,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "cannot connect: {error}"),
            Self::Http(error) => write!(f, "{error}"),
            Self::Closed => f.write_str("the connection closed before the response"),
            Self::Pooled(error) => write!(f, "{error}"),
        }
    }
}

impl StdError for UpstreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Connect(error) => Some(error),
            Self::Http(error) => Some(error),
            Self::Closed => None,
            Self::Pooled(error) => Some(error),
        }
    }
}

type Driver = Connection<TokioIo<TcpStream>, Body>;

/// One upstream connection: the request handle and the connection future that does the
/// I/O whenever it is polled.
struct Conn {
    sender: SendRequest<Body>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
}

impl Conn {
    /// Polls the connection once; false when it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = self.driver.as_mut()
            && Pin::new(driver).poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// Lets the connection notice what happened while nobody polled it (a close by the
    /// upstream, the end of the last response); true when it can take a request.
    fn ready_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && self.sender.is_ready()
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

// FNV-1a (`balance::Fnv`): the pool's keys are upstream addresses from the configuration
// and the registry, never from clients, so a fast unkeyed hash is safe here (SipHash was a
// measurable share of each request).
type IdleMap = HashMap<Authority, Vec<Idle>, std::hash::BuildHasherDefault<Fnv>>;

struct IdleConns {
    by_host: IdleMap,
    /// When expired connections of every host were last closed.
    swept: Instant,
}

pub struct Http1Pool {
    idle: Mutex<IdleConns>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

impl Http1Pool {
    pub fn new(config: &UpstreamClientConfig) -> Self {
        Self {
            idle: Mutex::new(IdleConns {
                by_host: IdleMap::default(),
                swept: Instant::now(),
            }),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            max_idle_per_host: config.max_idle_per_host,
        }
    }

    /// Sends `request` to `authority` on a pooled connection, or a new one. A request
    /// that a pooled connection turned out unable to take (closed meanwhile) is sent
    /// again on a new connection: it never reached the upstream.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        // On a connection of its own the request goes in origin form with a Host header,
        // as hyper's pooled client writes it.
        if let Some(path) = request.uri().path_and_query().cloned() {
            *request.uri_mut() = Uri::from(path);
        }
        if !request.headers().contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        loop {
            let (mut conn, reused) = match self.checkout(authority) {
                Some(conn) => (conn, true),
                None => (Box::new(self.connect(authority).await?), false),
            };
            let mut sending = std::pin::pin!(conn.sender.try_send_request(request));
            let sent = poll_fn(|cx| {
                // The connection writes the request and reads the response only when polled.
                let alive = conn.drive(cx);
                match sending.as_mut().poll(cx) {
                    Poll::Ready(result) => Poll::Ready(Some(result)),
                    Poll::Pending if alive => Poll::Pending,
                    Poll::Pending => Poll::Ready(None),
                }
            })
            .await;
            match sent {
                Some(Ok(response)) => {
                    let (parts, body) = response.into_parts();
                    let body = DrivenBody {
                        body,
                        conn: Some(conn),
                        pool: Arc::downgrade(self),
                        authority: authority.clone(),
                    };
                    return Ok(Response::from_parts(parts, Body::new(body)));
                }
                Some(Err(mut error)) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(UpstreamError::Http(error.into_error())),
                },
                None => return Err(UpstreamError::Closed),
            }
        }
    }

    fn checkout(&self, authority: &Authority) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.by_host.get_mut(authority)?;
        while let Some(Idle { mut conn, since }) = list.pop() {
            if since.elapsed() < self.idle_timeout && conn.ready_now() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, authority: Authority, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Once per idle timeout, close what expired everywhere, so hosts that left (an
        // instance gone from the registry) do not keep their sockets.
        if idle.swept.elapsed() >= self.idle_timeout {
            idle.swept = Instant::now();
            let timeout = self.idle_timeout;
            idle.by_host.retain(|_, list| {
                list.retain(|idle| idle.since.elapsed() < timeout);
                !list.is_empty()
            });
        }
        let list = idle.by_host.entry(authority).or_default();
        if list.len() >= self.max_idle_per_host {
            list.retain(|idle| idle.since.elapsed() < self.idle_timeout);
        }
        if list.len() < self.max_idle_per_host {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn, UpstreamError> {
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| {
                UpstreamError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                ))
            })?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        Ok(Conn {
            sender,
            driver: Some(driver),
        })
    }
}

/// A response body that drives its connection as it is read, and gives the connection
/// back to the pool once read to the end (or closes it when dropped before).
struct DrivenBody {
    body: Incoming,
    /// Boxed, so handing it to and from the pool moves a pointer, not the connection.
    conn: Option<Box<Conn>>,
    pool: Weak<Http1Pool>,
    authority: Authority,
}

impl http_body::Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(conn) = self.conn.as_mut() {
            conn.drive(cx);
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Only a connection whose response was read to the end can take another request.
        if http_body::Body::is_end_stream(&self.body)
            && conn.ready_now()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(self.authority.clone(), conn);
        }
    }
}
