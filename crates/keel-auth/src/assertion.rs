//! Client authentication with a signed JWT (`private_key_jwt`, RFC 7523 §2.2 and OpenID
//! Connect Core §9): the client signs a short-lived assertion with a key whose public
//! half it registered; each assertion is accepted once.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    UnparsedPublicKey,
};
use serde_json::Value;

use crate::clients::Client;
use crate::server::AppState;

/// RFC 7523 §2.2's `client_assertion_type`.
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Longest assertion accepted, and the longest it may live from now.
const MAX_ASSERTION_BYTES: usize = 8 * 1024;
const MAX_LIFETIME: i64 = 600;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY: i64 = 30;

/// The `iss` of an assertion, read without checking anything: it names the client whose
/// keys then check it.
pub(crate) fn claimed_client(assertion: &str) -> Option<String> {
    let claims = assertion.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// Whether the JWK `key` (of the algorithm `alg` the header names) signed `message`.
fn key_verifies(key: &Value, alg: &str, message: &[u8], signature: &[u8]) -> bool {
    let member = |name: &str| {
        key.get(name)
            .and_then(Value::as_str)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
    };
    match (key.get("kty").and_then(Value::as_str), alg) {
        (Some("RSA"), "RS256") => match (member("n"), member("e")) {
            (Some(n), Some(e)) => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            _ => false,
        },
        (Some("EC"), "ES256") if key.get("crv").and_then(Value::as_str) == Some("P-256") => {
            match (member("x"), member("y")) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    let point = [&[4u8][..], &x, &y].concat();
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                        .verify(message, signature)
                        .is_ok()
                }
                _ => false,
            }
        }
        (Some("OKP"), "EdDSA") if key.get("crv").and_then(Value::as_str) == Some("Ed25519") => {
            member("x").is_some_and(|x| {
                UnparsedPublicKey::new(&ED25519, x)
                    .verify(message, signature)
                    .is_ok()
            })
        }
        _ => false,
    }
}

/// Checks `assertion` for `client`: signed by one of its registered keys, `iss` and
/// `sub` the client, `aud` exactly this server's issuer identifier, unexpired and
/// short-lived, with a `jti` never seen before. The error is the reason, for the audit.
pub(crate) async fn verify(
    state: &AppState,
    client: &Client,
    assertion: &str,
) -> Result<(), &'static str> {
    if assertion.len() > MAX_ASSERTION_BYTES {
        return Err("assertion too large");
    }
    let malformed = "malformed assertion";
    let (input, signature) = assertion.rsplit_once('.').ok_or(malformed)?;
    let (header, claims) = input.split_once('.').ok_or(malformed)?;
    let decode = |part: &str| -> Result<Value, &'static str> {
        let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| malformed)
    };
    let (header, claims) = (decode(header)?, decode(claims)?);
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| malformed)?;
    let alg = header.get("alg").and_then(Value::as_str).ok_or(malformed)?;
    let keys = client
        .jwks
        .as_ref()
        .and_then(|jwks| jwks.get("keys"))
        .and_then(Value::as_array)
        .ok_or("no registered keys")?;
    // By kid when the header names one; otherwise any registered key may have signed.
    let kid = header.get("kid").and_then(Value::as_str);
    let signed = keys
        .iter()
        .filter(|key| kid.is_none() || key.get("kid").and_then(Value::as_str) == kid)
        .any(|key| key_verifies(key, alg, input.as_bytes(), &signature));
    if !signed {
        return Err("assertion not signed by a registered key");
    }
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(&client.client_id) || text("sub") != Some(&client.client_id) {
        return Err("assertion iss and sub must be the client id");
    }
    // Exactly the issuer identifier, a single string: an assertion whose audience is a
    // token endpoint URL (or a list) could have been made for another server that
    // advertises ours, and be replayed here (the audience injection attack that
    // draft-ietf-oauth-rfc7523bis closes).
    let audience_ok = claims.get("aud").and_then(Value::as_str) == Some(state.issuer.as_str());
    if !audience_ok {
        return Err("assertion audience is not this server");
    }
    let now = state.clock.now();
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or("assertion without exp")?;
    if exp.saturating_add(LEEWAY) <= now {
        return Err("assertion expired");
    }
    if exp > now.saturating_add(MAX_LIFETIME) {
        return Err("assertion lives too long");
    }
    if claims
        .get("nbf")
        .and_then(Value::as_i64)
        .is_some_and(|nbf| nbf > now.saturating_add(LEEWAY))
    {
        return Err("assertion not yet valid");
    }
    let jti = text("jti")
        .filter(|jti| !jti.is_empty() && jti.len() <= 256)
        .ok_or("assertion without a usable jti")?;
    let fresh = sqlx::query(
        "INSERT INTO assertion_jtis (client_id, jti, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (client_id, jti) DO NOTHING",
    )
    .bind(&client.client_id)
    .bind(jti)
    .bind(exp.saturating_add(LEEWAY))
    .execute(state.db.pool())
    .await
    .map_err(|_| "assertion replay check failed")?;
    if fresh.rows_affected() == 0 {
        return Err("assertion replayed");
    }
    Ok(())
}

/// Whether `jwks` is a JWK Set of 1 to 10 public keys this module can verify with (RSA of
/// 2048 to 8192 bits, EC P-256, OKP Ed25519, their members of the right sizes; no private
/// members), at most 16 KiB in all. Checked at registration, so that a key that could never
/// verify is refused then, not found out at every assertion.
pub(crate) fn valid_jwks(jwks: &Value) -> bool {
    let Some(keys) = jwks.get("keys").and_then(Value::as_array) else {
        return false;
    };
    (1..=10).contains(&keys.len())
        && jwks.to_string().len() <= 16 * 1024
        && keys.iter().all(valid_public_jwk)
}

fn valid_public_jwk(key: &Value) -> bool {
    let member = |name: &str| {
        key.get(name)
            .and_then(Value::as_str)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
    };
    let size = |name: &str| member(name).map(|bytes| bytes.len());
    let crv = key.get("crv").and_then(Value::as_str);
    let private = ["d", "p", "q", "dp", "dq", "qi"]
        .iter()
        .any(|member| key.get(*member).is_some());
    !private
        && match key.get("kty").and_then(Value::as_str) {
            // What ring verifies with (RFC 7518 §6.3.1: the shortest encodings): an odd
            // modulus of 2048 to 8192 bits, an odd exponent from 3 to 2^33 - 1.
            Some("RSA") => {
                let minimal_odd = |bytes: &[u8]| {
                    bytes.first().is_some_and(|first| *first != 0)
                        && bytes.last().is_some_and(|last| last % 2 == 1)
                };
                let exponent = |e: &[u8]| {
                    e.len() <= 5
                        && (3..1 << 33)
                            .contains(&e.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
                };
                member("n").is_some_and(|n| (256..=1024).contains(&n.len()) && minimal_odd(&n))
                    && member("e").is_some_and(|e| minimal_odd(&e) && exponent(&e))
            }
            Some("EC") => crv == Some("P-256") && size("x") == Some(32) && size("y") == Some(32),
            Some("OKP") => crv == Some("Ed25519") && size("x") == Some(32),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(len: usize) -> String {
        URL_SAFE_NO_PAD.encode(vec![7u8; len])
    }

    #[test]
    fn registered_keys_must_be_usable_public_keys() {
        let rsa = json!({"kty": "RSA", "n": b64(256), "e": "AQAB"});
        let modulus = |first: u8, len: usize, last: u8| {
            let mut n = vec![7u8; len];
            n[0] = first;
            n[len - 1] = last;
            URL_SAFE_NO_PAD.encode(n)
        };
        let ec = json!({"kty": "EC", "crv": "P-256", "x": b64(32), "y": b64(32)});
        let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(32)});
        assert!(valid_jwks(&json!({"keys": [rsa, ec, ed]})));
        let refused = [
            json!({"kty": "RSA", "n": b64(128), "e": "AQAB"}),
            json!({"kty": "RSA", "n": "not base64!", "e": "AQAB"}),
            json!({"kty": "RSA", "n": b64(256)}),
            json!({"kty": "RSA", "n": modulus(0, 257, 7), "e": "AQAB"}),
            json!({"kty": "RSA", "n": modulus(7, 256, 8), "e": "AQAB"}),
            json!({"kty": "RSA", "n": b64(256), "e": "AAEAAQ"}),
            json!({"kty": "RSA", "n": b64(256), "e": "AQ"}),
            json!({"kty": "RSA", "n": b64(256), "e": "AQAA"}),
            json!({"kty": "RSA", "n": b64(256), "e": "AgAAAAE"}),
            json!({"kty": "EC", "crv": "P-384", "x": b64(48), "y": b64(48)}),
            json!({"kty": "EC", "crv": "P-256", "x": b64(31), "y": b64(32)}),
            json!({"kty": "OKP", "crv": "X25519", "x": b64(32)}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64(32), "d": b64(32)}),
            json!({"kty": "oct", "k": b64(32)}),
        ];
        for key in refused {
            assert!(!valid_jwks(&json!({"keys": [key]})), "{key}");
        }
        assert!(!valid_jwks(&json!({"keys": []})));
        assert!(!valid_jwks(&json!({"keys": vec![ed.clone(); 11]})));
        let padded =
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64(32), "note": "x".repeat(17_000)});
        assert!(!valid_jwks(&json!({"keys": [padded]})));
        assert!(!valid_jwks(&json!([ed])));
    }
}
