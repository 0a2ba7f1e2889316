//! Request paths made canonical before routing, so that a route's match and its policy
//! (authentication, scopes, rate limits) see the path as the upstream will read it.
//!
//! Without it `/%61dmin`, `/public/../admin` or `//admin` would miss an `/admin` route,
//! fall to a broader one with a weaker policy, and reach an upstream that decodes,
//! resolves or merges them into `/admin` (Go's ServeMux, NGINX, Tomcat do). As Envoy's
//! `normalize_path` and `merge_slashes`, and NGINX's own handling: escapes of unreserved
//! characters are decoded (RFC 3986 §6.2.2.2) and other escapes' hex digits upper-cased
//! (§6.2.2.1), dot segments are removed after that (§5.2.4, so `%2e%2e` is one), and runs
//! of slashes become one. What cannot be made canonical without guessing how the upstream
//! reads it is refused: an encoded `/` or `\`, a backslash, a `;` (path parameters, which
//! Tomcat and Spring drop from a segment before matching, so `/admin;x/users` is
//! `/admin/users` and `/x/..;/admin` is `/admin` to them; refused by Spring Security's
//! firewall too), an encoded control character, a broken escape. The canonical path is
//! what goes upstream. The query is left alone.

use std::borrow::Cow;

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error(
        "the path has an encoded slash or backslash (%2F, %5C), which the gateway cannot route as the upstream would read it"
    )]
    EncodedSeparator,
    #[error("the path has a backslash")]
    Backslash,
    #[error(
        "the path has a ';' (path parameters), which upstreams read in different ways (Tomcat drops them: /admin;x is /admin, /..;/ is /../)"
    )]
    Semicolon,
    #[error("the path has an encoded control character")]
    Control,
    #[error("the path has a % not followed by two hexadecimal digits")]
    BrokenEscape,
}

/// `path` made canonical: borrowed when it already is (the common case: one scan, no
/// allocation). A path not starting with `/` (`*` of `OPTIONS *`) is left as it is.
pub fn canonical(path: &str) -> Result<Cow<'_, str>, PathRefused> {
    if !path.starts_with('/') || !needs_work(path.as_bytes())? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// The request target of `path` with `query`: what a rewritten or canonical path goes
/// upstream as.
pub(crate) fn with_query(
    path: &str,
    query: Option<&str>,
) -> Result<http::uri::PathAndQuery, Box<keel_runtime::Problem>> {
    let target = match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    http::uri::PathAndQuery::try_from(target).map_err(|_| unforwardable())
}

/// A request target that cannot be put back together (400).
pub(crate) fn unforwardable() -> Box<keel_runtime::Problem> {
    Box::new(keel_runtime::Problem::bad_request(
        "the request target cannot be forwarded",
    ))
}

/// Whether anything in `path` is to be decoded, removed or merged.
fn needs_work(path: &[u8]) -> Result<bool, PathRefused> {
    let mut work = false;
    for (at, &byte) in path.iter().enumerate() {
        match byte {
            b'\\' => return Err(PathRefused::Backslash),
            b';' => return Err(PathRefused::Semicolon),
            // An escape is canonical when it must stay one, in upper-case hex.
            b'%' => {
                let kept = match path.get(at + 1..at + 3) {
                    Some(&[high, low]) if is_upper_hex(high) && is_upper_hex(low) => {
                        matches!(escaped(hex(high)? << 4 | hex(low)?), Ok(None))
                    }
                    _ => false,
                };
                work |= !kept;
            }
            b'/' => {
                let rest = &path[at + 1..];
                let segment = rest.split(|&b| b == b'/').next().unwrap_or_default();
                // `//`, and `.` or `..` as a whole segment.
                if matches!(segment, b"" | b"." | b"..") && !rest.is_empty() {
                    work = true;
                }
            }
            _ => {}
        }
    }
    Ok(work)
}

/// Decodes escapes of unreserved characters and upper-cases the others' hex digits.
fn decode_unreserved(path: &str) -> Result<String, PathRefused> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut at = 0;
    while let Some(offset) = bytes[at..].iter().position(|&b| b == b'%') {
        let escape = at + offset;
        out.push_str(&path[at..escape]);
        let (high, low) = match (bytes.get(escape + 1), bytes.get(escape + 2)) {
            (Some(&high), Some(&low)) => (hex(high)?, hex(low)?),
            _ => return Err(PathRefused::BrokenEscape),
        };
        match escaped(high << 4 | low)? {
            Some(decoded) => out.push(decoded),
            None => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(high)]));
                out.push(char::from(HEX[usize::from(low)]));
            }
        }
        at = escape + 3;
    }
    out.push_str(&path[at..]);
    Ok(out)
}

/// What an escape of `value` becomes: the character when it is unreserved, `None` when
/// it stays an escape.
fn escaped(value: u8) -> Result<Option<char>, PathRefused> {
    match value {
        b'/' | b'\\' => Err(PathRefused::EncodedSeparator),
        0..0x20 | 0x7f => Err(PathRefused::Control),
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
            Ok(Some(char::from(value)))
        }
        _ => Ok(None),
    }
}

fn is_upper_hex(digit: u8) -> bool {
    matches!(digit, b'0'..=b'9' | b'A'..=b'F')
}

fn hex(digit: u8) -> Result<u8, PathRefused> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        b'A'..=b'F' => Ok(digit - b'A' + 10),
        _ => Err(PathRefused::BrokenEscape),
    }
}

/// `path` (starting with `/`) without `.` and `..` segments or empty ones; `..` at the
/// root stays at the root (RFC 3986 §5.2.4). A path that ended in a directory (`/`, `.`,
/// `..`) still does.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut directory = false;
    for segment in path[1..].split('/') {
        directory = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if directory || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(path: &str) -> String {
        match canonical(path) {
            Ok(Cow::Owned(path)) => path,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn canonical_paths_are_borrowed_as_they_are() {
        for path in [
            "/",
            "/orders",
            "/orders/1/",
            "/a/.b/..c/...",
            "/caf%C3%A9",
            "*",
        ] {
            assert!(
                matches!(canonical(path), Ok(Cow::Borrowed(same)) if same == path),
                "{path}"
            );
        }
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded_and_others_upper_cased() {
        assert_eq!(owned("/%61dmin/users"), "/admin/users");
        assert_eq!(owned("/%7Euser/%2d%5F"), "/~user/-_");
        assert_eq!(owned("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(owned("/a%20b%3f"), "/a%20b%3F");
    }

    #[test]
    fn dot_segments_go_and_slashes_merge_after_decoding() {
        assert_eq!(owned("/public/../admin/users"), "/admin/users");
        assert_eq!(owned("/public/%2e%2e/admin"), "/admin");
        assert_eq!(owned("/a/%2E/b"), "/a/b");
        assert_eq!(owned("//admin//users"), "/admin/users");
        assert_eq!(owned("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(owned("/a/b/.."), "/a/");
        assert_eq!(owned("/a/."), "/a/");
        assert_eq!(owned("/a//"), "/a/");
        assert_eq!(owned("/.."), "/");
        assert_eq!(owned("//"), "/");
    }

    #[test]
    fn what_cannot_be_made_canonical_is_refused() {
        for (path, refused) in [
            ("/a%2Fb", PathRefused::EncodedSeparator),
            ("/a%2fb", PathRefused::EncodedSeparator),
            ("/a%5cb", PathRefused::EncodedSeparator),
            ("/a\\b", PathRefused::Backslash),
            ("/admin;x/users", PathRefused::Semicolon),
            ("/public/..;/admin", PathRefused::Semicolon),
            ("/a%00b", PathRefused::Control),
            ("/a%0A", PathRefused::Control),
            ("/a%7f", PathRefused::Control),
            ("/a%zz", PathRefused::BrokenEscape),
            ("/a%4", PathRefused::BrokenEscape),
            ("/a%", PathRefused::BrokenEscape),
            ("/%c3%", PathRefused::BrokenEscape),
        ] {
            assert_eq!(canonical(path), Err(refused), "{path}");
        }
    }
}
