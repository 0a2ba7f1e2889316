//! The pure half of verification: splitting a compact JWS, reading its header, and checking
//! its claims against the configuration at a given time. No I/O, no keys.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Algorithm, VerifierConfig};
use crate::error::VerifyError;
use crate::principal::Principal;

/// A compact JWS whose header has been read and judged, signature not yet checked.
#[derive(Debug)]
pub(crate) struct UnverifiedToken<'a> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// `BASE64URL(header) '.' BASE64URL(payload)`: what the signature covers.
    pub signing_input: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
}

/// The JOSE header fields this crate reads. Deriving `Deserialize` makes a duplicated
/// member an error instead of "last one wins", so a header cannot say two things.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// Splits and reads a token, rejecting what needs no key to reject: size, shape, `alg`
/// (`none`, symmetric, not allowed) and `typ`. Header parameters that point at keys (`jku`,
/// `jwk`, `x5u`, `x5c`) are ignored: keys come only from the configured issuer.
pub(crate) fn parse<'a>(
    token: &'a str,
    config: &VerifierConfig,
) -> Result<UnverifiedToken<'a>, VerifyError> {
    if token.len() > config.max_token_bytes {
        return Err(VerifyError::TooLarge {
            limit: config.max_token_bytes,
        });
    }
    let mut parts = token.split('.');
    let (Some(encoded_header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed("not three dot-separated parts"));
    };
    if encoded_header.is_empty() || payload.is_empty() {
        return Err(VerifyError::Malformed("empty header or payload"));
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(encoded_header)
        .map_err(|_| VerifyError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_json)
        .map_err(|_| VerifyError::Malformed("header is not a JSON object with an alg"))?;

    let alg = Algorithm::from_name(&header.alg).ok_or(VerifyError::UnsupportedAlgorithm)?;
    if !config.allowed_algorithms.contains(&alg) {
        return Err(VerifyError::UnsupportedAlgorithm);
    }
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: a recipient that does not understand a critical extension must
        // reject the token. This crate understands none.
        return Err(VerifyError::Malformed(
            "unsupported critical header extension",
        ));
    }
    check_type(header.typ.as_deref(), config.require_typ)?;
    if signature.is_empty() {
        return Err(VerifyError::Malformed("no signature"));
    }
    let signing_input = &token[..encoded_header.len() + 1 + payload.len()];
    Ok(UnverifiedToken {
        alg,
        kid: header.kid,
        signing_input,
        payload,
        signature,
    })
}

/// RFC 9068 §4: `typ` must be `at+jwt`; media type names compare case-insensitively, and the
/// `application/` prefix may be left out (RFC 7515 §4.1.9).
fn check_type(typ: Option<&str>, require: bool) -> Result<(), VerifyError> {
    let is = |name: &str, t: &str| {
        t.eq_ignore_ascii_case(name)
            || t.get(..12)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/"))
                && t[12..].eq_ignore_ascii_case(name)
    };
    match typ {
        Some(t) if is("at+jwt", t) => Ok(()),
        None if !require => Ok(()),
        Some(t) if !require && is("jwt", t) => Ok(()),
        _ => Err(VerifyError::WrongType),
    }
}

/// Decodes the (signature-checked) payload and checks its claims at `now`.
pub(crate) fn claims(
    payload: &str,
    config: &VerifierConfig,
    now: SystemTime,
) -> Result<Principal, VerifyError> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| VerifyError::Malformed("payload is not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&json)
        .map_err(|_| VerifyError::Malformed("payload is not a JSON object"))?;

    let issuer = string(&claims, "iss")?.ok_or(VerifyError::Malformed("no iss claim"))?;
    let subject = string(&claims, "sub")?.ok_or(VerifyError::Malformed("no sub claim"))?;
    let audience = audience(&claims)?;
    let exp = numeric_date(&claims, "exp")?.ok_or(VerifyError::Malformed("no exp claim"))?;
    let iat = numeric_date(&claims, "iat")?.ok_or(VerifyError::Malformed("no iat claim"))?;
    let nbf = numeric_date(&claims, "nbf")?;
    let client_id = match string(&claims, "client_id")? {
        Some(id) => Some(id),
        None => string(&claims, "azp")?,
    };
    let token_id = string(&claims, "jti")?;
    let scopes = string(&claims, "scope")?
        .map(|s| {
            s.split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let roles = roles(&claims)?;

    if issuer != config.issuer {
        return Err(VerifyError::WrongIssuer);
    }
    if !audience.iter().any(|a| config.audiences.contains(a)) {
        return Err(VerifyError::WrongAudience);
    }
    let now = seconds_since_epoch(now);
    let leeway = i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX);
    // RFC 7519 §4.1.4: valid only *before* exp.
    if now >= exp.saturating_add(leeway) {
        return Err(VerifyError::Expired);
    }
    // §4.1.5: valid from nbf on. A token issued in the future is as suspect as one not yet
    // valid: the issuer's clock or the token is wrong.
    if nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf) || now.saturating_add(leeway) < iat {
        return Err(VerifyError::NotYetValid);
    }

    Ok(Principal {
        subject,
        client_id,
        scopes,
        roles,
        issuer,
        audience,
        expires_at: u64::try_from(exp)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
            .unwrap_or(UNIX_EPOCH),
        token_id,
        claims,
    })
}

fn seconds_since_epoch(now: SystemTime) -> i64 {
    match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn string(claims: &Map<String, Value>, name: &'static str) -> Result<Option<String>, VerifyError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(VerifyError::Malformed(match name {
            "iss" => "iss is not a string",
            "sub" => "sub is not a string",
            "client_id" => "client_id is not a string",
            "azp" => "azp is not a string",
            "jti" => "jti is not a string",
            "scope" => "scope is not a string",
            _ => "a claim is not a string",
        })),
    }
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional; fractions
/// are dropped, which errs towards rejecting.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<i64>, VerifyError> {
    let bad = || {
        VerifyError::Malformed(match name {
            "exp" => "exp is not a NumericDate",
            "iat" => "iat is not a NumericDate",
            "nbf" => "nbf is not a NumericDate",
            _ => "a claim is not a NumericDate",
        })
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                // Larger than i64 or fractional; `as` saturates, which is what is wanted.
                let f = n.as_f64().filter(|f| f.is_finite()).ok_or_else(bad)?;
                #[allow(clippy::cast_possible_truncation)]
                Ok(Some(f.floor() as i64))
            }
        }
        Some(_) => Err(bad()),
    }
}

/// `aud` is one string or an array of strings (RFC 7519 §4.1.3).
fn audience(claims: &Map<String, Value>) -> Result<Vec<String>, VerifyError> {
    match claims.get("aud") {
        Some(Value::String(a)) => Ok(vec![a.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(a) => Ok(a.clone()),
                _ => Err(VerifyError::Malformed("aud holds a non-string")),
            })
            .collect(),
        None | Some(Value::Null) => Err(VerifyError::Malformed("no aud claim")),
        Some(_) => Err(VerifyError::Malformed("aud is not a string or an array")),
    }
}

fn roles(claims: &Map<String, Value>) -> Result<BTreeSet<String>, VerifyError> {
    match claims.get("roles") {
        None | Some(Value::Null) => Ok(BTreeSet::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(r) => Ok(r.clone()),
                _ => Err(VerifyError::Malformed("roles holds a non-string")),
            })
            .collect(),
        Some(_) => Err(VerifyError::Malformed("roles is not an array")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn config() -> VerifierConfig {
        VerifierConfig::new("http://issuer", ["api", "other"])
    }

    fn b64(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    fn token(header: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&json!({})))
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn claims_at(claims: Value, now: u64) -> Result<Principal, VerifyError> {
        super::claims(&b64(&claims), &config(), at(now))
    }

    fn valid_claims() -> Value {
        json!({
            "iss": "http://issuer", "sub": "alice", "aud": "api",
            "exp": NOW + 60, "iat": NOW, "jti": "j1", "client_id": "web",
            "scope": "a b  c", "roles": ["admin"],
        })
    }

    fn with(changes: Value) -> Value {
        let mut claims = valid_claims();
        for (k, v) in changes.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    }

    #[test]
    fn header_checks() {
        let text = token(json!({"alg": "RS256", "typ": "at+jwt", "kid": "k"}));
        let ok = parse(&text, &config()).unwrap();
        assert_eq!((ok.alg, ok.kid.as_deref()), (Algorithm::RS256, Some("k")));

        let cases = [
            (
                json!({"alg": "none", "typ": "at+jwt"}),
                "UnsupportedAlgorithm",
            ),
            (
                json!({"alg": "HS256", "typ": "at+jwt"}),
                "UnsupportedAlgorithm",
            ),
            (
                json!({"alg": "rs256", "typ": "at+jwt"}),
                "UnsupportedAlgorithm",
            ),
            (
                json!({"alg": "RS512", "typ": "at+jwt"}),
                "UnsupportedAlgorithm",
            ),
            (json!({"typ": "at+jwt"}), "Malformed"),
            (
                json!({"alg": "RS256", "typ": "at+jwt", "crit": ["exp"]}),
                "Malformed",
            ),
            (json!({"alg": "RS256"}), "WrongType"),
            (json!({"alg": "RS256", "typ": "JWT"}), "WrongType"),
            (json!({"alg": "RS256", "typ": "dpop+jwt"}), "WrongType"),
        ];
        for (header, expected) in cases {
            let error = parse(&token(header.clone()), &config()).unwrap_err();
            assert!(
                format!("{error:?}").starts_with(expected),
                "{header}: {error:?}"
            );
        }
    }

    #[test]
    fn duplicate_header_members_are_malformed() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"at+jwt","alg":"none"}"#);
        let error = parse(&format!("{header}.e30.c2ln"), &config()).unwrap_err();
        assert!(matches!(error, VerifyError::Malformed(_)), "{error:?}");
    }

    #[test]
    fn shape_checks() {
        let mut config = config();
        config.max_token_bytes = 64;
        assert!(matches!(
            parse(&"a".repeat(65), &config),
            Err(VerifyError::TooLarge { limit: 64 })
        ));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            ".e30.c2ln",
            "!!.e30.c2ln",
            "e30.e30.c2ln",
        ] {
            assert!(
                matches!(parse(bad, &config), Err(VerifyError::Malformed(_))),
                "{bad}"
            );
        }
        let unsigned = format!("{}.e30.", b64(&json!({"alg": "RS256", "typ": "at+jwt"})));
        assert!(matches!(
            parse(&unsigned, &config),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn type_rules() {
        for typ in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+Jwt",
        ] {
            check_type(Some(typ), true).unwrap();
            check_type(Some(typ), false).unwrap();
        }
        check_type(None, true).unwrap_err();
        check_type(Some("JWT"), true).unwrap_err();
        check_type(None, false).unwrap();
        check_type(Some("JWT"), false).unwrap();
        check_type(Some("application/jwt"), false).unwrap();
        check_type(Some("secevent+jwt"), false).unwrap_err();
        check_type(Some("application/"), false).unwrap_err();
    }

    #[test]
    fn valid_claims_become_a_principal() {
        let principal = claims_at(valid_claims(), NOW).unwrap();
        assert_eq!(principal.subject, "alice");
        assert_eq!(principal.client_id.as_deref(), Some("web"));
        assert_eq!(principal.token_id.as_deref(), Some("j1"));
        assert_eq!(principal.scopes, ["a", "b", "c"].map(String::from).into());
        assert_eq!(principal.roles, ["admin"].map(String::from).into());
        assert_eq!(principal.audience, vec!["api"]);
        assert_eq!(principal.expires_at, at(NOW + 60));
        assert_eq!(principal.claims["client_id"], "web");
    }

    #[test]
    fn azp_stands_in_for_a_missing_client_id() {
        let principal = claims_at(with(json!({"client_id": null, "azp": "spa"})), NOW).unwrap();
        assert_eq!(principal.client_id.as_deref(), Some("spa"));
    }

    #[test]
    fn time_checks_with_leeway() {
        // Default leeway 30 s.
        claims_at(valid_claims(), NOW + 60 + 29).unwrap();
        assert!(matches!(
            claims_at(valid_claims(), NOW + 60 + 30),
            Err(VerifyError::Expired)
        ));
        claims_at(with(json!({"nbf": NOW + 30})), NOW).unwrap();
        assert!(matches!(
            claims_at(with(json!({"nbf": NOW + 31})), NOW),
            Err(VerifyError::NotYetValid)
        ));
        claims_at(with(json!({"iat": NOW + 30})), NOW).unwrap();
        assert!(matches!(
            claims_at(with(json!({"iat": NOW + 31})), NOW),
            Err(VerifyError::NotYetValid)
        ));
        // Fractional dates are allowed.
        claims_at(
            with(json!({"exp": (NOW + 60) as f64 + 0.5, "iat": NOW as f64 - 0.25})),
            NOW,
        )
        .unwrap();
        let mut no_leeway = config();
        no_leeway.leeway = Duration::ZERO;
        let exp = b64(&valid_claims());
        super::claims(&exp, &no_leeway, at(NOW + 59)).unwrap();
        assert!(matches!(
            super::claims(&exp, &no_leeway, at(NOW + 60)),
            Err(VerifyError::Expired)
        ));
    }

    #[test]
    fn issuer_and_audience() {
        assert!(matches!(
            claims_at(with(json!({"iss": "http://issuer/"})), NOW),
            Err(VerifyError::WrongIssuer)
        ));
        assert!(matches!(
            claims_at(with(json!({"aud": "elsewhere"})), NOW),
            Err(VerifyError::WrongAudience)
        ));
        assert!(matches!(
            claims_at(with(json!({"aud": []})), NOW),
            Err(VerifyError::WrongAudience)
        ));
        let principal = claims_at(with(json!({"aud": ["elsewhere", "other"]})), NOW).unwrap();
        assert_eq!(principal.audience, vec!["elsewhere", "other"]);
    }

    #[test]
    fn missing_or_mistyped_claims_are_malformed() {
        for changes in [
            json!({"iss": null}),
            json!({"sub": null}),
            json!({"aud": null}),
            json!({"exp": null}),
            json!({"iat": null}),
            json!({"sub": 5}),
            json!({"exp": "tomorrow"}),
            json!({"aud": ["api", 5]}),
            json!({"aud": {"api": true}}),
            json!({"scope": ["a"]}),
            json!({"roles": "admin"}),
            json!({"roles": [1]}),
            json!({"jti": 7}),
        ] {
            let result = claims_at(with(changes.clone()), NOW);
            assert!(
                matches!(result, Err(VerifyError::Malformed(_))),
                "{changes}: {result:?}"
            );
        }
        for payload in [
            "!!",
            &URL_SAFE_NO_PAD.encode("[1]"),
            &URL_SAFE_NO_PAD.encode("{"),
        ] {
            assert!(matches!(
                super::claims(payload, &config(), at(NOW)),
                Err(VerifyError::Malformed(_))
            ));
        }
    }

    #[test]
    fn huge_dates_do_not_overflow() {
        claims_at(with(json!({"exp": i64::MAX})), NOW).unwrap();
        claims_at(with(json!({"exp": 1e300})), NOW).unwrap();
        assert!(matches!(
            claims_at(with(json!({"exp": -1e300})), NOW),
            Err(VerifyError::Expired)
        ));
        assert!(matches!(
            claims_at(with(json!({"exp": i64::MIN})), NOW),
            Err(VerifyError::Expired)
        ));
    }
}
