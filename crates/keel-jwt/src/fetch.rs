//! Fetching the issuer's metadata (to find `jwks_uri`) and its key set.

use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::keys::{VerifyKey, parse_jwks};

/// Metadata and key sets are a few KiB; anything past this is broken or hostile.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Why a refresh failed. Its text goes into logs and
/// [`VerifyError::KeysUnavailable`](crate::VerifyError::KeysUnavailable); it names URLs from
/// configuration and metadata, never anything from a token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// `cause` is the whole chain: reqwest's own text says only that sending failed, its
    /// sources why (refused, timed out, a certificate no trusted CA signed).
    #[error("GET {url}: {cause}")]
    Http { url: String, cause: String },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("GET {url}: response larger than {MAX_BODY_BYTES} bytes")]
    TooLarge { url: String },
    #[error("GET {url}: invalid JSON: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("metadata at {url} names issuer {found:?}, not the configured {expected:?}")]
    IssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error("metadata at {url} has no usable jwks_uri")]
    NoJwksUri { url: String },
    #[error("key set at {url} holds no usable signature key")]
    NoUsableKeys { url: String },
}

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    #[serde(default)]
    jwks_uri: Option<String>,
}

/// Finds `jwks_uri` in the issuer's metadata: OpenID Connect Discovery first, then the
/// RFC 8414 location when that answers 404 (a plain OAuth server). The metadata's `issuer`
/// must be the configured one exactly (RFC 8414 §3.3); otherwise a server could pose as
/// another issuer and have its keys trusted.
pub(crate) async fn discover_jwks_uri(
    http: &reqwest::Client,
    issuer: &str,
) -> Result<String, FetchError> {
    let [oidc, oauth] = metadata_urls(issuer);
    let (url, body) = match get(http, &oidc).await {
        Err(FetchError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
            let body = get(http, &oauth).await?;
            (oauth, body)
        }
        result => (oidc, result?),
    };
    let metadata: Metadata = serde_json::from_slice(&body).map_err(|source| FetchError::Json {
        url: url.clone(),
        source,
    })?;
    if metadata.issuer != issuer {
        return Err(FetchError::IssuerMismatch {
            url,
            expected: issuer.to_owned(),
            found: metadata.issuer,
        });
    }
    match metadata.jwks_uri {
        Some(uri) if Url::parse(&uri).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) => {
            Ok(uri)
        }
        _ => Err(FetchError::NoJwksUri { url }),
    }
}

/// The two metadata locations for an issuer. OpenID Connect Discovery §4 appends to the
/// issuer; RFC 8414 §3.1 inserts the well-known segment between host and path. They are the
/// same for an issuer without a path.
fn metadata_urls(issuer: &str) -> [String; 2] {
    let trimmed = issuer.trim_end_matches('/');
    let oidc = format!("{trimmed}/.well-known/openid-configuration");
    let oauth = match Url::parse(issuer) {
        Ok(url) => {
            let path = url.path().trim_end_matches('/');
            let mut well_known = url.clone();
            well_known.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
            well_known.to_string()
        }
        Err(_) => format!("{trimmed}/.well-known/oauth-authorization-server"),
    };
    [oidc, oauth]
}

/// Fetches and parses a key set; one with no usable key is an error, so that a broken
/// publication does not replace good cached keys.
pub(crate) async fn fetch_jwks(
    http: &reqwest::Client,
    url: &str,
) -> Result<Vec<VerifyKey>, FetchError> {
    let body = get(http, url).await?;
    let keys = parse_jwks(&body).map_err(|source| FetchError::Json {
        url: url.to_owned(),
        source,
    })?;
    if keys.is_empty() {
        return Err(FetchError::NoUsableKeys {
            url: url.to_owned(),
        });
    }
    Ok(keys)
}

async fn get(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, FetchError> {
    let http_error = |error: reqwest::Error| FetchError::Http {
        url: url.to_owned(),
        cause: keel_runtime::http_client::error_chain(&error),
    };
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(http_error)?;
    if response.status() != StatusCode::OK {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: response.status(),
        });
    }
    let too_large = || FetchError::TooLarge {
        url: url.to_owned(),
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_locations() {
        assert_eq!(
            metadata_urls("http://127.0.0.1:8400"),
            [
                "http://127.0.0.1:8400/.well-known/openid-configuration",
                "http://127.0.0.1:8400/.well-known/oauth-authorization-server",
            ]
        );
        assert_eq!(
            metadata_urls("https://auth.example.com/realms/shop/"),
            [
                "https://auth.example.com/realms/shop/.well-known/openid-configuration",
                "https://auth.example.com/.well-known/oauth-authorization-server/realms/shop",
            ]
        );
    }
}
