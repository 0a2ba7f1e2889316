//! Extractors whose rejections are problem+json, so a malformed body or query gets the same
//! error shape as every other failure.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// `axum::Json` with a problem+json rejection (400, or 413 for an oversized body).
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    body_problem(rejection.status(), rejection.body_text())
}

/// A request body axum refused (its status and text), as a problem: 413 for an oversized
/// one, 400 for anything else.
pub fn body_problem(status: http::StatusCode, text: String) -> Problem {
    if status == http::StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(status, "payload-too-large", "Payload too large").with_detail(text)
    } else {
        // Unsupported media type and syntax errors are all a bad request from the client.
        Problem::bad_request(text)
    }
}

/// `axum::extract::Query` with a problem+json rejection.
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|rejection: QueryRejection| Problem::bad_request(rejection.body_text()))
    }
}

/// `axum::extract::Path` with a problem+json rejection (a segment that is not valid
/// percent-encoded UTF-8, say).
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| Problem::bad_request(rejection.body_text()))
    }
}

/// The request's `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header), when it
/// has one: a Structured Field string (`"…"`) or, as many clients send it, a bare token;
/// 1 to 255 visible ASCII characters either way. Anything else is a 400 problem.
pub struct IdempotencyKey(pub Option<String>);

/// The longest key taken.
const MAX_IDEMPOTENCY_KEY: usize = 255;

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        value
            .to_str()
            .ok()
            .and_then(idempotency_key)
            .map(|key| Self(Some(key)))
            .ok_or_else(|| {
                Problem::bad_request(
                    "an Idempotency-Key is a string of 1 to 255 visible ASCII characters",
                )
            })
    }
}

fn idempotency_key(text: &str) -> Option<String> {
    let text = text.trim_matches(' ');
    let key = match text.strip_prefix('"') {
        // RFC 8941 sf-string: `\"` and `\\` are the only escapes; nothing may follow the
        // closing quote (parameters are not taken).
        Some(rest) => {
            let mut key = String::new();
            let mut chars = rest.chars();
            loop {
                match chars.next()? {
                    '\\' => match chars.next()? {
                        escaped @ ('"' | '\\') => key.push(escaped),
                        _ => return None,
                    },
                    '"' => break,
                    c => key.push(c),
                }
            }
            if chars.next().is_some() {
                return None;
            }
            key
        }
        None => text.to_owned(),
    };
    let visible = key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    ((1..=MAX_IDEMPOTENCY_KEY).contains(&key.len()) && visible).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::{body_problem, idempotency_key};

    #[test]
    fn refused_bodies_are_413_when_too_large_else_400() {
        let large = body_problem(http::StatusCode::PAYLOAD_TOO_LARGE, "length limit".into());
        assert_eq!(large.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        let bad = body_problem(http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "no type".into());
        assert_eq!(bad.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn idempotency_keys_are_structured_strings_or_bare_tokens() {
        assert_eq!(
            idempotency_key(r#""8e03978e-40d5""#).as_deref(),
            Some("8e03978e-40d5")
        );
        assert_eq!(
            idempotency_key("8e03978e-40d5").as_deref(),
            Some("8e03978e-40d5")
        );
        assert_eq!(idempotency_key(r#""a\"b\\c""#).as_deref(), Some(r#"a"b\c"#));
        for bad in [
            r#""""#,
            "",
            r#""open"#,
            r#""a";p=1"#,
            r#""a\x""#,
            "tab\there",
            &"k".repeat(256),
        ] {
            assert_eq!(idempotency_key(bad), None, "{bad:?}");
        }
    }
}
