//! Client connections on HTTP/1.1, served without hyper for what nearly all traffic is:
//! keep-alive requests with no body or a small one of known length. The head is parsed in
//! place ([`crate::h1`]), the gateway handles the request, and the response goes out with
//! its head and first data in one write.
//!
//! Anything else hands the connection to hyper, its bytes read so far included
//! ([`Ended::Handoff`]), for the rest of the connection: the HTTP/2 preface, HTTP/1.0,
//! upgrades, `Expect`, `Transfer-Encoding`, `CONNECT`, and bodies over
//! [`MAX_READ_BODY`]. Requests are handled one at a time, pipelined ones in order.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header;
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use keel_runtime::Problem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::h1::{self, Rewind};
use crate::listener::{ConnState, Mode, redirect_to_https, too_fast};
use crate::proxy::{Arrival, SOURCE, Stamp};
use crate::timer;

/// Request bodies up to this are read whole before the request is handled (the retry
/// buffer keeps them anyway); larger ones stream through hyper.
pub(crate) const MAX_READ_BODY: u64 = 64 * 1024;
/// Response bodies are written in the same buffer as the head up to this much.
const COALESCE: usize = 16 * 1024;
/// How much is read at a time.
const READ_CHUNK: usize = 8 * 1024;

/// How serving a connection ended.
pub(crate) enum Ended<S> {
    Closed,
    /// The rest is hyper's: the connection, with what was read of it.
    Handoff(Rewind<S>),
}

/// Why a head cannot be served; answered, then the connection closes.
enum Refusal {
    TooLarge,
    Malformed,
}

/// What the head said about the rest of the request.
struct Shape {
    length: u64,
    close: bool,
}

/// Serves requests on `io` until the client closes, an error, a timeout, `stop`, or
/// something for hyper.
pub(crate) async fn serve<S>(
    mut io: S,
    state: &ConnState,
    stop: Pin<&mut (impl Future<Output = ()> + ?Sized)>,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &state.limits;
    let mut stop = stop;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    // The head (and a small body) must arrive within the header timeout, which also
    // bounds idle keep-alive.
    let mut sleep = pin!(tokio::time::sleep(limits.header_read_timeout));
    loop {
        let now = Instant::now();
        let deadline = now + limits.header_read_timeout;
        let mut waited = false;
        let head = loop {
            if !buf.is_empty() {
                match h1::parse_request(&buf, limits.max_headers) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() >= limits.max_header_bytes => {
                        return refuse(io, &mut out, Refusal::TooLarge).await;
                    }
                    Ok(None) => {}
                    Err(_) if buf.starts_with(b"PRI * HTTP/2") => {
                        return Ended::Handoff(Rewind::new(buf.freeze(), io));
                    }
                    Err(httparse::Error::TooManyHeaders) => {
                        return refuse(io, &mut out, Refusal::TooLarge).await;
                    }
                    Err(_) => return refuse(io, &mut out, Refusal::Malformed).await,
                }
            }
            reserve(&mut buf, READ_CHUNK);
            let read = tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => read,
                () = timer::expire(sleep.as_mut(), deadline) => return Ended::Closed,
                () = stop.as_mut(), if buf.is_empty() => return Ended::Closed,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Ended::Closed;
            }
            waited = true;
        };
        // When the head arrived: the clock is read again only if the loop waited for it.
        let received = if waited { Instant::now() } else { now };
        let shape = match shape(&head, &buf) {
            Ok(Some(shape)) => shape,
            Ok(None) => return Ended::Handoff(Rewind::new(buf.freeze(), io)),
            Err(refusal) => return refuse(io, &mut out, refusal).await,
        };
        let head_bytes = buf.split_to(head.len).freeze();
        let body = if shape.length == 0 {
            Body::empty()
        } else {
            // Within MAX_READ_BODY, so it fits in usize.
            let length = shape.length as usize;
            while buf.len() < length {
                let missing = length - buf.len();
                reserve(&mut buf, missing);
                let read = tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => read,
                    () = timer::expire(sleep.as_mut(), deadline) => return Ended::Closed,
                };
                if !matches!(read, Ok(n) if n > 0) {
                    return Ended::Closed;
                }
            }
            Body::from(buf.split_to(length).freeze())
        };
        let Some(request) = request(&head_bytes, &head, body, h1::take_map()) else {
            return refuse(io, &mut out, Refusal::Malformed).await;
        };
        drop(head_bytes);
        let head_method = request.method() == Method::HEAD;
        let (response, stamp) = if state
            .rate
            .as_ref()
            .is_some_and(|rate| !rate.admit(received))
        {
            (too_fast(), None)
        } else {
            match state.mode {
                Mode::RedirectToHttps { port } => (redirect_to_https(&request, port), None),
                Mode::Proxy { .. } => {
                    let arrival = Arrival {
                        client: &state.client,
                        received,
                    };
                    let (response, stamp) = state.gateway.handle(request, arrival).await;
                    (response, Some(stamp))
                }
            }
        };
        let close = shape.close || state.shutdown.is_triggered();
        let how = WriteAs {
            method_head: head_method,
            stamp: stamp.as_ref(),
            close,
        };
        if !matches!(
            write_response(&mut io, &mut out, response, how).await,
            Ok(Open::KeptOpen)
        ) {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

fn reserve(buf: &mut BytesMut, want: usize) {
    if buf.capacity() - buf.len() < want.min(READ_CHUNK) / 2 {
        buf.reserve(want.max(READ_CHUNK));
    }
}

/// The request's framing, or `None` for what goes to hyper.
fn shape(head: &h1::RequestHead, buf: &[u8]) -> Result<Option<Shape>, Refusal> {
    if head.minor_version != 1 || &buf[head.method.clone()] == b"CONNECT" {
        return Ok(None);
    }
    let framing = h1::framing(buf, &head.headers).map_err(|h1::BadLength| Refusal::Malformed)?;
    let length = framing.content_length.unwrap_or(0);
    if framing.special || framing.chunked.is_some() || length > MAX_READ_BODY {
        return Ok(None);
    }
    Ok(Some(Shape {
        length,
        close: framing.close,
    }))
}

/// The request of `head`, its header map filled into `map` (empty).
fn request(
    head_bytes: &Bytes,
    head: &h1::RequestHead,
    body: Body,
    map: HeaderMap,
) -> Option<Request<Body>> {
    let method = Method::from_bytes(&head_bytes[head.method.clone()]).ok()?;
    let uri = Uri::from_maybe_shared(head_bytes.slice(head.target.clone())).ok()?;
    // Room for what the gateway may add to the map: the request id, a trace context (the
    // forwarding and claim headers travel beside it).
    let headers = h1::header_map(map, head_bytes, &head.headers, 2).ok()?;
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// Answers a head that cannot be served, and closes.
async fn refuse<S>(mut io: S, out: &mut Vec<u8>, refusal: Refusal) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let problem = match refusal {
        Refusal::TooLarge => Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request header fields too large",
        )
        .with_detail("the request's headers exceed the gateway's size or count limit"),
        Refusal::Malformed => Problem::bad_request("the request is not valid HTTP/1.1"),
    };
    let response = problem.with_source(SOURCE).into_response();
    let how = WriteAs {
        method_head: false,
        stamp: None,
        close: true,
    };
    let _ = write_response(&mut io, out, response, how).await;
    let _ = io.shutdown().await;
    Ended::Closed
}

/// A body's next frame if it is there now; otherwise `None`, and the caller flushes what
/// it has before waiting.
fn frame_now(body: &mut Body) -> Option<Option<Result<Frame<Bytes>, axum::Error>>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

async fn flush<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Whether the connection may carry another request after a response.
enum Open {
    KeptOpen,
    Closing,
}

/// How a response is written besides its own parts.
struct WriteAs<'a> {
    /// It answers a HEAD request: no body.
    method_head: bool,
    /// The gateway's own headers, written after the response's (whose copies are left out).
    stamp: Option<&'a Stamp>,
    /// The connection closes after it.
    close: bool,
}

/// Writes `response`: its head with framing of our own (`content-length` when the body's
/// size is known, chunked otherwise), then the body as it comes. Trailers are not sent
/// on HTTP/1.1. The connection closes after it when `how.close`, or when the response says
/// `connection: close`.
async fn write_response<S>(
    io: &mut S,
    out: &mut Vec<u8>,
    response: Response,
    how: WriteAs<'_>,
) -> io::Result<Open>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut close = how.close;
    let bodiless = how.method_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // `Some(n)`: exactly n bytes follow; `None`: chunks.
    let length = (!bodiless).then(|| body.size_hint().exact());
    // What the map holds is noted on the way through, not looked up.
    let mut date = false;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            close |= h1::lists_token(value.as_bytes(), b"close");
            continue;
        }
        let framing = name == header::TRANSFER_ENCODING
            || (length.is_some() && name == header::CONTENT_LENGTH);
        if !framing && !how.stamp.is_some_and(|stamp| stamp.replaces(name)) {
            date |= name == header::DATE;
            h1::put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(stamp) = how.stamp {
        stamp.write(out);
    }
    match length {
        Some(Some(n)) => h1::put_content_length(out, n),
        Some(None) => h1::put_header(out, b"transfer-encoding", b"chunked"),
        None => {}
    }
    if !date {
        h1::put_date(out);
    }
    let open = if close {
        h1::put_header(out, b"connection", b"close");
        Open::Closing
    } else {
        Open::KeptOpen
    };
    out.extend_from_slice(b"\r\n");
    // Emptied, the map holds a later message's headers.
    h1::give_map(parts.headers);
    let Some(length) = length else {
        flush(io, out).await?;
        io.flush().await?;
        return Ok(open);
    };
    let chunked = length.is_none();
    let mut sent = 0u64;
    loop {
        let frame = match frame_now(&mut body) {
            Some(frame) => frame,
            None => {
                flush(io, out).await?;
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
            Some(Err(_)) => {
                // What came before the failure still goes out; the close tells the client
                // the body is cut short.
                flush(io, out).await?;
                return Err(io::Error::other("the response body failed"));
            }
        };
        sent += data.len() as u64;
        if chunked {
            h1::put_chunk_size(out, data.len());
        }
        if data.len() > COALESCE {
            flush(io, out).await?;
            io.write_all(&data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() > COALESCE {
            flush(io, out).await?;
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    } else if length != Some(sent) {
        // The body was not the size announced: the connection cannot carry another.
        flush(io, out).await?;
        return Err(io::Error::other(
            "the response body was not the size announced",
        ));
    }
    flush(io, out).await?;
    io.flush().await?;
    Ok(open)
}
