//! HTTP/1.1 on the wire, for the gateway's own client connections ([`crate::h1_server`])
//! and upstream connections ([`crate::upstream`]): heads parsed with `httparse` into
//! `http` types without copying the header bytes, chunked bodies decoded, heads written.
//!
//! Why not hyper here: a proxy's data path is the product. hyper's general machinery (a
//! dispatcher per connection, channels between the pooled client and its connection
//! tasks) cost about 30k of the 42k instructions the gateway spent per request; NGINX's
//! whole request costs less than that. hyper still serves everything this path hands
//! over: HTTP/2, upgrades, HTTP/1.0, chunked and large request bodies.

use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a header's name and value sit in the head's bytes. Offsets are `u32` (the parsers
/// refuse a buffer longer than `u32::MAX`; the header size limits keep heads far below
/// it), and the smaller index makes the parsed head cheaper to move (it is moved several
/// times per request).
#[derive(Debug, Clone)]
pub(crate) struct HeaderIndex {
    name: Range<u32>,
    value: Range<u32>,
}

/// Header positions: most heads have fewer than 16 fields, kept inline.
pub(crate) type HeaderIndices = SmallVec<[HeaderIndex; 16]>;

/// Header slots on the stack for limits up to this; beyond it a vector per head.
const STACK_HEADERS: usize = 128;

/// A request head parsed out of a read buffer.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// Bytes of the request line and headers, blank line included.
    pub(crate) len: usize,
    pub(crate) method: Range<usize>,
    pub(crate) target: Range<usize>,
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub(crate) minor_version: u8,
    pub(crate) headers: HeaderIndices,
}

/// A response head parsed out of a read buffer.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) minor_version: u8,
    pub(crate) headers: HeaderIndices,
}

fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    // `part` borrows from `buf` (httparse hands out subslices), except perhaps an empty
    // value, which may point anywhere.
    if part.is_empty() {
        return 0..0;
    }
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

/// `range` as a [`HeaderIndex`] keeps it. Fits: the parsers refuse longer buffers
/// (`fits_u32`).
fn narrow(range: Range<usize>) -> Range<u32> {
    let at = |offset: usize| u32::try_from(offset).unwrap_or(u32::MAX);
    at(range.start)..at(range.end)
}

/// Whether every offset into `buf` fits a [`HeaderIndex`]; a longer buffer is refused as
/// too large.
fn fits_u32(buf: &[u8]) -> Result<(), httparse::Error> {
    u32::try_from(buf.len())
        .map(drop)
        .map_err(|_| httparse::Error::TooManyHeaders)
}

/// `range` of `buf` as `usize` bounds.
fn span(range: &Range<u32>) -> Range<usize> {
    range.start as usize..range.end as usize
}

fn indices(buf: &[u8], headers: &[httparse::Header<'_>]) -> HeaderIndices {
    headers
        .iter()
        .map(|h| HeaderIndex {
            name: narrow(range_in(buf, h.name.as_bytes())),
            value: narrow(range_in(buf, h.value)),
        })
        .collect()
}

/// Parses a request head; `Ok(None)` until the buffer holds all of it.
pub(crate) fn parse_request(
    buf: &[u8],
    max_headers: usize,
) -> Result<Option<RequestHead>, httparse::Error> {
    fits_u32(buf)?;
    fn parse<'b>(
        buf: &'b [u8],
        slots: &mut [MaybeUninit<httparse::Header<'b>>],
    ) -> Result<Option<RequestHead>, httparse::Error> {
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(buf, slots)? {
            httparse::Status::Partial => Ok(None),
            httparse::Status::Complete(len) => Ok(Some(RequestHead {
                len,
                method: request.method.map_or(0..0, |m| range_in(buf, m.as_bytes())),
                target: request.path.map_or(0..0, |p| range_in(buf, p.as_bytes())),
                minor_version: request.version.unwrap_or_default(),
                headers: indices(buf, request.headers),
            })),
        }
    }
    if max_headers <= STACK_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        parse(buf, &mut slots[..max_headers])
    } else {
        let mut slots = Vec::with_capacity(max_headers);
        slots.resize_with(max_headers, MaybeUninit::uninit);
        parse(buf, &mut slots)
    }
}

/// Parses a response head (up to [`STACK_HEADERS`] fields); `Ok(None)` until the buffer
/// holds all of it.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, httparse::Error> {
    fits_u32(buf)?;
    let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    )? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) => Ok(Some(ResponseHead {
            len,
            status: response.code.unwrap_or_default(),
            minor_version: response.version.unwrap_or_default(),
            headers: indices(buf, response.headers),
        })),
    }
}

/// A header field that `http` refuses (httparse is more lenient about a few bytes).
#[derive(Debug)]
pub(crate) struct InvalidHeader;

/// Most emptied header maps kept per thread, and the most fields one may hold.
const SPARE_MAPS: usize = 64;
const SPARE_FIELDS: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header map, one given back ([`give_map`]) when there is one: a message's map
/// then costs no allocation and free of its own.
pub(crate) fn take_map() -> HeaderMap {
    SPARE.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Empties `map` and keeps it for [`take_map`], unless it is large (it would stay
/// allocated) or enough are kept.
pub(crate) fn give_map(mut map: HeaderMap) {
    // A map's length never exceeds its capacity.
    if map.capacity() == 0 || map.capacity() > SPARE_FIELDS {
        return;
    }
    map.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_MAPS {
            spare.push(map);
        }
    });
}

/// The header map of a head (without `Transfer-Encoding`), its values sharing the head's
/// bytes, filled into `map` (empty; a recycled one keeps its allocation) with room for
/// `extra` more fields (a map that grows reallocates and rehashes: once 10 % of a request's
/// cost).
pub(crate) fn header_map(
    mut map: HeaderMap,
    head: &Bytes,
    indices: &[HeaderIndex],
    extra: usize,
) -> Result<HeaderMap, InvalidHeader> {
    debug_assert!(map.is_empty(), "a recycled map must come empty");
    map.reserve(indices.len() + extra);
    for index in indices {
        let name = HeaderName::from_bytes(index.name(head)).map_err(|_| InvalidHeader)?;
        // Framing is per hop: whoever writes the message on sets its own.
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(span(&index.value)))
            .map_err(|_| InvalidHeader)?;
        map.append(name, value);
    }
    Ok(map)
}

impl HeaderIndex {
    pub(crate) fn name<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[span(&self.name)]
    }

    pub(crate) fn value<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[span(&self.value)]
    }
}

/// Whether a comma-separated header value (`Connection`, `Transfer-Encoding`) lists
/// `token`, in any case.
pub(crate) fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only (no sign, no spaces inside), at most u64.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// What a head's fields say about how its message is framed and what it asks of the
/// connection, read off the raw fields in one pass (requests and responses alike).
#[derive(Debug, Default)]
pub(crate) struct Framing {
    /// `Content-Length`, every copy agreeing.
    pub(crate) content_length: Option<u64>,
    /// With `Transfer-Encoding`: whether the last coding of the last field is chunked.
    pub(crate) chunked: Option<bool>,
    /// `Connection: close`.
    pub(crate) close: bool,
    /// `Connection: upgrade`, `Upgrade` or `Expect`: more than a plain exchange.
    pub(crate) special: bool,
}

/// A `Content-Length` that is not a plain number, or copies that disagree (a smuggling
/// attempt as often as a mistake).
#[derive(Debug, PartialEq)]
pub(crate) struct BadLength;

pub(crate) fn framing(buf: &[u8], fields: &[HeaderIndex]) -> Result<Framing, BadLength> {
    let mut framing = Framing::default();
    for field in fields {
        let (name, value) = (field.name(buf), field.value(buf));
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value).ok_or(BadLength)?;
            if framing.content_length.is_some_and(|before| before != n) {
                return Err(BadLength);
            }
            framing.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.chunked = Some(
                value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked")),
            );
        } else if name.eq_ignore_ascii_case(b"connection") {
            framing.close |= lists_token(value, b"close");
            framing.special |= lists_token(value, b"upgrade");
        } else if name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"expect") {
            framing.special = true;
        }
    }
    Ok(framing)
}

/// Appends `name: value\r\n`.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `content-length: n\r\n`.
pub(crate) fn put_content_length(out: &mut Vec<u8>, length: u64) {
    put_header(
        out,
        b"content-length",
        itoa::Buffer::new().format(length).as_bytes(),
    );
}

/// Appends the head of one chunk of `len` bytes.
pub(crate) fn put_chunk_size(out: &mut Vec<u8>, len: usize) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{len:x}\r\n");
}

/// The current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once a
/// second per thread.
pub(crate) fn put_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        put_header(out, b"date", text.as_bytes());
    });
}

// === impl ChunkedDecoder ===

/// What the decoder made of the buffer.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The buffer ends inside a chunk's framing: read more.
    NeedMore,
    /// The last chunk, with the trailers when there were any.
    End(Option<HeaderMap>),
}

/// Why a chunked body is malformed.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub(crate) struct ChunkError(&'static str);

impl From<ChunkError> for io::Error {
    fn from(error: ChunkError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// Decodes a `Transfer-Encoding: chunked` body (RFC 9112 §7.1) from a read buffer, handing
/// out the data without copying it.
#[derive(Debug, Default)]
pub(crate) enum ChunkedDecoder {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

impl ChunkedDecoder {
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self {
                Self::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            Self::Trailers
                        } else {
                            Self::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {
                        return Ok(Decoded::NeedMore);
                    }
                    Ok(httparse::Status::Partial) => {
                        return Err(ChunkError("chunk size line too long"));
                    }
                    Err(_) => return Err(ChunkError("invalid chunk size")),
                },
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= take as u64;
                    if *left == 0 {
                        *self = Self::DataEnd;
                    }
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers => return self.trailers(buf),
                Self::Done => return Ok(Decoded::End(None)),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            *self = Self::Done;
            return Ok(Decoded::End(None));
        }
        let mut fields = [httparse::EMPTY_HEADER; 32];
        match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete((used, fields))) => {
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| ChunkError("invalid trailer name"))?;
                    let value = HeaderValue::from_bytes(field.value)
                        .map_err(|_| ChunkError("invalid trailer value"))?;
                    trailers.append(name, value);
                }
                buf.advance(used);
                *self = Self::Done;
                Ok(Decoded::End(Some(trailers)))
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => Ok(Decoded::NeedMore),
            Ok(httparse::Status::Partial) => Err(ChunkError("trailers too large")),
            Err(_) => Err(ChunkError("invalid trailers")),
        }
    }
}

// === impl Rewind ===

/// A connection whose first bytes were already read: they are read again first. Hands a
/// connection to hyper after the head that told us to.
pub(crate) struct Rewind<S> {
    read: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(read: Bytes, inner: S) -> Self {
        Self { read, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_back_map_comes_back_empty_and_a_large_one_is_not_kept() {
        // This test's thread has its own spares.
        let mut map = HeaderMap::new();
        map.insert("x-secret", http::HeaderValue::from_static("one exchange"));
        give_map(map);
        let again = take_map();
        assert!(again.is_empty());
        assert!(again.capacity() > 0, "the allocation is kept");
        assert!(take_map().capacity() == 0, "only one was given back");

        let mut large = HeaderMap::with_capacity(SPARE_FIELDS * 2);
        large.insert("x-big", http::HeaderValue::from_static("1"));
        give_map(large);
        assert_eq!(take_map().capacity(), 0, "a large map is freed, not kept");
    }

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End(trailers) => return Ok((body, trailers)),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return Err(ChunkError("input ended"));
                    }
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, trailers) = decode_all(input, step).unwrap();
            assert_eq!(body, b"hello, world");
            let trailers = trailers.unwrap();
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-b"], "2");
        }
        let (body, trailers) = decode_all(b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!((body.as_slice(), trailers), (&b"abc"[..], None));
    }

    #[test]
    fn malformed_chunks_are_errors_not_panics() {
        for input in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"5\r\nhello\r\n0\r\nbad header\r\n\r\n",
        ] {
            assert!(decode_all(input, 1).is_err(), "{input:?}");
        }
        let long = [b"1".repeat(10), b";".to_vec(), b"x".repeat(8000)].concat();
        assert!(decode_all(&long, 100).is_err());
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(parse_content_length(b"18446744073709551615"), None);
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1 2",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn heads_parse_into_shared_header_values() {
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\n\r\nrest";
        let head = parse_request(raw, 100).unwrap().unwrap();
        assert_eq!(head.len, raw.len() - 4);
        assert_eq!(&raw[head.method.clone()], b"GET");
        assert_eq!(&raw[head.target.clone()], b"/a?b=1");
        assert_eq!(head.minor_version, 1);
        let bytes = Bytes::copy_from_slice(&raw[..head.len]);
        let map = header_map(HeaderMap::new(), &bytes, &head.headers, 0).unwrap();
        assert_eq!(map["host"], "x");
        assert_eq!(map.get_all("x-two").iter().count(), 2);
        // A recycled map: emptied, refilled from a head with more fields than are kept
        // inline.
        let mut recycled = map;
        recycled.clear();
        let fields: String = (0..20).map(|n| format!("X-{n}: v{n}\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        let head = parse_request(raw.as_bytes(), 100).unwrap().unwrap();
        let bytes = Bytes::copy_from_slice(raw.as_bytes());
        let map = header_map(recycled, &bytes, &head.headers, 0).unwrap();
        assert_eq!(map.len(), 20);
        assert!(map.get("host").is_none());
        assert_eq!(map["x-19"], "v19");
        assert!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n", 100)
                .unwrap()
                .is_none()
        );
        let many: String = (0..5).map(|n| format!("X-{n}: v\r\n")).collect();
        let too_many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_request(too_many.as_bytes(), 4).unwrap_err(),
            httparse::Error::TooManyHeaders
        );
        assert!(parse_request(too_many.as_bytes(), 200).unwrap().is_some());
        let response = parse_response(b"HTTP/1.1 204 No Content\r\nA: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                response.status,
                response.minor_version,
                response.headers.len()
            ),
            (204, 1, 1)
        );
    }

    #[test]
    fn framing_is_read_off_the_fields() {
        let of = |raw: &str| {
            let head = parse_request(raw.as_bytes(), 100).unwrap().unwrap();
            framing(raw.as_bytes(), &head.headers)
        };
        let plain =
            of("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-length: 5\r\n\r\n").unwrap();
        assert_eq!(
            (
                plain.content_length,
                plain.chunked,
                plain.close,
                plain.special
            ),
            (Some(5), None, false, false)
        );
        let chunked =
            of("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!((chunked.chunked, chunked.close), (Some(true), true));
        assert_eq!(
            of("GET / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
                .unwrap()
                .chunked,
            Some(false)
        );
        assert!(
            of("GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n")
                .unwrap()
                .special
        );
        assert!(
            of("PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
                .unwrap()
                .special
        );
        assert_eq!(
            of("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").unwrap_err(),
            BadLength
        );
        assert_eq!(
            of("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").unwrap_err(),
            BadLength
        );
    }

    #[test]
    fn connection_tokens_are_found_in_lists() {
        assert!(lists_token(b"keep-alive, Upgrade", b"upgrade"));
        assert!(lists_token(b"close", b"close"));
        assert!(!lists_token(b"closed", b"close"));
    }
}
