//! The HTTP/1.1 upstream connection pool.
//!
//! Connections are ours, not hyper's ([`crate::h1`]): the request's own task writes the
//! request head and body (headers straight from the forwarding request's map, no copy),
//! reads the response head, and, through [`UpstreamBody`], the response body while it
//! streams to the client. A connection goes back to the pool the moment its response body
//! has been read to the end. Requests with streamed bodies, upgrades and HTTP/2 upstreams
//! use hyper's client.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::balance::Fnv;
use crate::config::UpstreamClientConfig;
use crate::endpoint::{nanos, now_nanos};
use crate::forward::Added;
use crate::h1::{self, ChunkedDecoder, Decoded};
use crate::timer;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// The connection failed while the request was under way.
    Io(io::Error),
    /// The connection ended before it answered.
    Closed,
    /// The upstream's answer is not HTTP/1.1 we accept.
    Malformed(&'static str),
    /// No answer by the attempt's deadline.
    TimedOut,
    /// From hyper's pooled client (streamed bodies, HTTP/2 upstreams, upgrades).
    Pooled(hyper_util::client::legacy::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Pooled(error) => error.is_connect(),
            Self::Io(_) | Self::Closed | Self::Malformed(_) | Self::TimedOut => false,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "cannot connect: {error}"),
            Self::Io(error) => write!(f, "connection failed: {error}"),
            Self::Closed => f.write_str("the connection closed before the response"),
            Self::Malformed(what) => write!(f, "invalid response: {what}"),
            Self::TimedOut => f.write_str("no response in the time allowed"),
            Self::Pooled(error) => write!(f, "{error}"),
        }
    }
}

impl StdError for UpstreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Connect(error) | Self::Io(error) => Some(error),
            Self::Closed | Self::Malformed(_) | Self::TimedOut => None,
            Self::Pooled(error) => Some(error),
        }
    }
}

/// A request whose body is known in full, as the pool writes it.
pub struct UpstreamRequest<'a> {
    pub method: &'a Method,
    /// Origin form: path and query.
    pub target: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    /// Written after `headers`, which hold none of them.
    pub added: &'a Added,
    pub body: &'a Bytes,
}

/// Longest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read buffer growth: enough for a typical head and body in one read.
const READ_CHUNK: usize = 16 * 1024;
/// Bodies up to this go out in the same write as the head.
const COALESCE_BODY: usize = 16 * 1024;

/// One upstream connection, reused across its requests.
struct Conn {
    wire: Wire,
    /// Bounds each exchange on the connection (see [`timer`]).
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    /// Writes the encoded request and reads the response head, by `deadline`.
    async fn exchange(
        &mut self,
        body: &Bytes,
        deadline: Instant,
    ) -> Result<h1::ResponseHead, HeadError> {
        let wire = &mut self.wire;
        let exchange = async {
            wire.write(body).await.map_err(HeadError::Unsent)?;
            wire.read_head().await
        };
        tokio::select! {
            biased;
            head = exchange => head,
            () = timer::expire(self.timer.as_mut(), deadline) => Err(HeadError::TimedOut),
        }
    }
}

/// A connection's socket and buffers.
struct Wire {
    stream: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
}

impl Wire {
    /// Whether an idle connection can take a request: nothing arrived on it meanwhile (a
    /// close, or bytes nobody asked for). `try_read` asks the socket only when the runtime
    /// saw it become readable, and registers no waker.
    fn ready_now(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn reserve(&mut self) {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
    }

    async fn write(&mut self, body: &Bytes) -> io::Result<()> {
        self.stream.write_all(&self.write).await?;
        if body.len() > COALESCE_BODY {
            self.stream.write_all(body).await?;
        }
        Ok(())
    }

    /// Reads up to the final response head (1xx interim responses are skipped).
    async fn read_head(&mut self) -> Result<h1::ResponseHead, HeadError> {
        let mut received = false;
        loop {
            if !self.read.is_empty() {
                received = true;
                match h1::parse_response(&self.read) {
                    Ok(Some(head)) if head.status == 101 => {
                        return Err(HeadError::Malformed("an upgrade nobody asked for"));
                    }
                    Ok(Some(head)) if head.status < 200 => {
                        // Interim (100 Continue, 103 Early Hints): the final head may be
                        // in the buffer already.
                        self.read.advance(head.len);
                        continue;
                    }
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) if self.read.len() > MAX_RESPONSE_HEAD => {
                        return Err(HeadError::Malformed("response head too large"));
                    }
                    Ok(None) => {}
                    Err(_) => return Err(HeadError::Malformed("unparsable response head")),
                }
            }
            self.reserve();
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) => return Err(HeadError::Closed { received }),
                Ok(_) => {}
                Err(error) => return Err(HeadError::Io { error, received }),
            }
        }
    }
}

/// Writes `request`'s head (and its body, when small) into `out`.
fn encode(out: &mut Vec<u8>, authority: &Authority, request: &UpstreamRequest<'_>) {
    out.clear();
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // What the map holds is noted on the way through, not looked up.
    let fields = out.len();
    let (mut host, mut length) = (false, false);
    for (name, value) in request.headers {
        // The framing is the pool's: the body is whole.
        if *name == header::CONTENT_LENGTH {
            length = true;
        } else if *name != header::TRANSFER_ENCODING {
            host |= *name == header::HOST;
            h1::put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in request.added.fields() {
        h1::put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !host {
        // First, as RFC 9112 §3.2 asks of clients: written after the fields, then
        // turned to the front of them.
        let end = out.len();
        h1::put_header(out, b"host", authority.as_str().as_bytes());
        let line = out.len() - end;
        out[fields..].rotate_right(line);
    }
    let sized_method = !matches!(
        *request.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !request.body.is_empty() || sized_method || length {
        h1::put_content_length(out, request.body.len() as u64);
    }
    out.extend_from_slice(b"\r\n");
    if request.body.len() <= COALESCE_BODY {
        out.extend_from_slice(request.body);
    }
}

enum HeadError {
    /// Writing the request failed.
    Unsent(io::Error),
    Closed {
        received: bool,
    },
    Io {
        error: io::Error,
        received: bool,
    },
    Malformed(&'static str),
    TimedOut,
}

struct Idle {
    conn: Box<Conn>,
    /// When it went idle, in [`now_nanos`].
    since: u64,
}

// FNV-1a (`balance::Fnv`): the pool's keys are upstream addresses from the configuration
// and the registry, never from clients, so a fast unkeyed hash is safe here (SipHash was a
// measurable share of each request). Keyed by the authority's text, compared bytewise:
// `Authority`'s own comparison ignores case, at twice the cost.
type IdleMap = HashMap<Box<str>, Vec<Idle>, std::hash::BuildHasherDefault<Fnv>>;

struct IdleConns {
    by_host: IdleMap,
    /// When expired connections of every host were last closed.
    swept: u64,
}

pub struct Http1Pool {
    idle: Mutex<IdleConns>,
    connect_timeout: Duration,
    /// In nanoseconds, as the idle times are kept.
    idle_timeout: u64,
    max_idle_per_host: usize,
}

impl Http1Pool {
    pub fn new(config: &UpstreamClientConfig) -> Self {
        Self {
            idle: Mutex::new(IdleConns {
                by_host: IdleMap::default(),
                swept: now_nanos(),
            }),
            connect_timeout: config.connect_timeout,
            idle_timeout: nanos(config.idle_timeout),
            max_idle_per_host: config.max_idle_per_host,
        }
    }

    /// Sends `request` to `authority` on a pooled connection, or a new one. A request a
    /// pooled connection turned out unable to take (closed meanwhile) goes again on a new
    /// connection: when writing it failed, or, for idempotent methods, when the connection
    /// closed without a byte of answer (RFC 9112 §9.3.1).
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        request: UpstreamRequest<'_>,
        now: u64,
        deadline: Instant,
    ) -> Result<Response<Body>, UpstreamError> {
        let idempotent = crate::retry::is_idempotent(request.method);
        loop {
            let (mut conn, reused) = match self.checkout(authority, now) {
                Some(conn) => (conn, true),
                None => (Box::new(self.connect(authority, deadline).await?), false),
            };
            encode(&mut conn.wire.write, authority, &request);
            let head = match conn.exchange(request.body, deadline).await {
                Ok(head) => head,
                Err(HeadError::Unsent(_)) if reused => continue,
                Err(HeadError::Unsent(error)) => return Err(UpstreamError::Io(error)),
                Err(
                    HeadError::Closed { received: false }
                    | HeadError::Io {
                        received: false, ..
                    },
                ) if reused && idempotent => {
                    continue;
                }
                Err(HeadError::Closed { .. }) => return Err(UpstreamError::Closed),
                Err(HeadError::Io { error, .. }) => return Err(UpstreamError::Io(error)),
                Err(HeadError::Malformed(what)) => return Err(UpstreamError::Malformed(what)),
                Err(HeadError::TimedOut) => return Err(UpstreamError::TimedOut),
            };
            let head_request = *request.method == Method::HEAD;
            return self.response(authority, conn, &head, head_request);
        }
    }

    /// The response to hand on: its head, and its body: the bytes, when the whole body is
    /// read already (`conn` then goes back to the pool here), or a body that reads the
    /// rest from `conn`.
    fn response(
        self: &Arc<Self>,
        authority: &Authority,
        mut conn: Box<Conn>,
        head: &h1::ResponseHead,
        head_request: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        let bytes = conn.wire.read.split_to(head.len).freeze();
        let status = StatusCode::from_u16(head.status)
            .map_err(|_| UpstreamError::Malformed("invalid status code"))?;
        // RFC 9112 §6.3: how the body ends.
        let h1::Framing {
            content_length: length,
            chunked,
            close,
            ..
        } = h1::framing(&bytes, &head.headers).map_err(|h1::BadLength| {
            UpstreamError::Malformed("invalid or conflicting content-length")
        })?;
        // Room for the request id, CORS and rate-limit headers.
        let headers = h1::header_map(h1::take_map(), &bytes, &head.headers, 6)
            .map_err(|_| UpstreamError::Malformed("invalid header field"))?;
        // A message framed both ways may be an attempt at smuggling: read it as chunked
        // (RFC 9112 §6.3) and close the connection after it.
        let mut reusable =
            head.minor_version == 1 && !(chunked.is_some() && length.is_some()) && !close;
        let no_body =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = match (no_body, chunked, length) {
            (true, _, _) | (false, None, Some(0)) => None,
            (false, Some(true), _) => Some(Framing::Chunked(ChunkedDecoder::default())),
            (false, Some(false), _) | (false, None, None) => {
                reusable = false;
                Some(Framing::Close)
            }
            (false, None, Some(length)) => Some(Framing::Length(length)),
        };
        let mut response = Response::new(Body::empty());
        *response.status_mut() = status;
        *response.version_mut() = Version::HTTP_11;
        *response.headers_mut() = headers;
        match framing {
            None => {
                if reusable && conn.wire.read.is_empty() {
                    self.put(authority.clone(), conn);
                }
            }
            // The whole body is here already (nearly every small answer): the connection
            // goes back to the pool now, and the body is plain bytes.
            Some(Framing::Length(length)) if conn.wire.read.len() as u64 >= length => {
                // Not over `conn.wire.read.len()`, so it fits in usize.
                let body = conn.wire.read.split_to(length as usize).freeze();
                if reusable && conn.wire.read.is_empty() {
                    self.put(authority.clone(), conn);
                }
                *response.body_mut() = Body::from(body);
            }
            Some(framing) => {
                *response.body_mut() = Body::new(UpstreamBody {
                    conn: Some(conn),
                    framing,
                    reusable,
                    pool: Arc::downgrade(self),
                    authority: authority.clone(),
                });
            }
        }
        Ok(response)
    }

    /// An idle connection to `authority` that is still open, as of `now` (of [`now_nanos`]).
    fn checkout(&self, authority: &Authority, now: u64) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.by_host.get_mut(authority.as_str())?;
        while let Some(Idle { mut conn, since }) = list.pop() {
            if now.saturating_sub(since) < self.idle_timeout && conn.wire.ready_now() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for reuse, idle from now.
    fn put(&self, authority: Authority, conn: Box<Conn>) {
        let now = now_nanos();
        let fresh = |idle: &Idle| now.saturating_sub(idle.since) < self.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Once per idle timeout, close what expired everywhere, so hosts that left (an
        // instance gone from the registry) do not keep their sockets.
        if now.saturating_sub(idle.swept) >= self.idle_timeout {
            idle.swept = now;
            idle.by_host.retain(|_, list| {
                list.retain(fresh);
                !list.is_empty()
            });
        }
        // Looked up by reference first: an owned key costs an allocation.
        let list = match idle.by_host.get_mut(authority.as_str()) {
            Some(list) => list,
            None => idle.by_host.entry(authority.as_str().into()).or_default(),
        };
        if list.len() >= self.max_idle_per_host {
            list.retain(fresh);
        }
        if list.len() < self.max_idle_per_host {
            list.push(Idle { conn, since: now });
        }
    }

    /// A new connection to `authority`, within the connect timeout and by `deadline`
    /// (the attempt's, which then also bounds the connection's first exchange).
    async fn connect(
        &self,
        authority: &Authority,
        deadline: Instant,
    ) -> Result<Conn, UpstreamError> {
        let address = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        let own = Instant::now() + self.connect_timeout;
        let stream = tokio::time::timeout_at(own.min(deadline).into(), TcpStream::connect(address))
            .await
            .map_err(|_| {
                if deadline < own {
                    UpstreamError::TimedOut
                } else {
                    UpstreamError::Connect(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", self.connect_timeout),
                    ))
                }
            })?
            .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            wire: Wire {
                stream,
                read: BytesMut::with_capacity(READ_CHUNK),
                write: Vec::with_capacity(1024),
            },
            timer: Box::pin(tokio::time::sleep_until(deadline.into())),
        })
    }
}

/// How a response body ends.
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// At the connection's end (which is then not reused).
    Close,
}

/// A response body read from its connection as the client takes it; the connection goes
/// back to the pool once the body has been read to the end, and is closed when the body is
/// dropped before.
struct UpstreamBody {
    /// `None` once the body has ended.
    conn: Option<Box<Conn>>,
    framing: Framing,
    reusable: bool,
    pool: Weak<Http1Pool>,
    authority: Authority,
}

impl UpstreamBody {
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes after the response's end are a broken upstream: the connection goes.
        if self.reusable
            && conn.wire.read.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(self.authority.clone(), conn);
        }
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Length(left) => {
                    if !conn.wire.read.is_empty() {
                        let take = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.wire.read.len());
                        let data = conn.wire.read.split_to(take).freeze();
                        *left -= take as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.wire.read) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(error) => return this.fail(error.into()),
                },
                Framing::Close => {
                    if !conn.wire.read.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(conn.wire.read.split().freeze()))));
                    }
                }
            }
            conn.wire.reserve();
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.wire.stream),
                cx,
                &mut conn.wire.read
            )) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection inside the response body",
                    ));
                }
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.framing) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Framing::Length(left)) => SizeHint::with_exact(*left),
            (Some(_), _) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(headers: &HeaderMap) -> String {
        let mut out = Vec::new();
        let request = UpstreamRequest {
            method: &Method::GET,
            target: &PathAndQuery::from_static("/a?b=1"),
            headers,
            added: &Added::default(),
            body: &Bytes::new(),
        };
        encode(&mut out, &Authority::from_static("upstream:8080"), &request);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn host_is_the_first_field_and_named_once() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", http::HeaderValue::from_static("abc"));
        headers.insert(
            "x-forwarded-host",
            http::HeaderValue::from_static("api.example"),
        );
        assert_eq!(
            encoded(&headers),
            "GET /a?b=1 HTTP/1.1\r\nhost: upstream:8080\r\nx-request-id: abc\r\n\
             x-forwarded-host: api.example\r\n\r\n"
        );

        // A host the route set is the one sent.
        headers.insert(header::HOST, http::HeaderValue::from_static("set.by.route"));
        let text = encoded(&headers);
        assert_eq!(text.matches("\nhost:").count(), 1, "{text}");
        assert!(text.contains("\r\nhost: set.by.route\r\n"), "{text}");
    }
}
