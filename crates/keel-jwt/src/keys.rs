//! A fetched JWK Set turned into verification keys, each pinned to one algorithm.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::Algorithm;

/// RSA keys shorter than this are ignored (NIST SP 800-131A: 2048 bits since 2014).
const MIN_RSA_BITS: usize = 2048;

/// One usable public key. `alg` is the only algorithm it verifies, whatever a token says.
pub(crate) struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// The keys of one successful fetch.
pub(crate) struct KeySet {
    pub keys: Vec<VerifyKey>,
    pub fetched_at: Instant,
    /// Bumped by every successful fetch, so a request that waited for a refresh can tell
    /// whether another one already happened.
    pub generation: u64,
}

/// What a token's `kid` and `alg` find in a key set.
pub(crate) enum Selection<'a> {
    Key(&'a VerifyKey),
    /// A key with that id exists, but not for that algorithm.
    AlgorithmMismatch,
    /// No key with that id: perhaps rotated in since the last fetch.
    UnknownKid,
    /// No `kid`, and more than one key could be meant.
    Ambiguous,
}

impl KeySet {
    /// Finds the key for a token. A token without `kid` is accepted only while the set holds
    /// exactly one key: with more, picking by `alg` alone would mean trying keys in turn.
    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Selection<'_> {
        let candidates: Vec<&VerifyKey> = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None if self.keys.len() == 1 => self.keys.iter().collect(),
            None => return Selection::Ambiguous,
        };
        if candidates.is_empty() {
            return Selection::UnknownKid;
        }
        // Some issuers publish one key twice under the same kid, once per algorithm.
        candidates
            .into_iter()
            .find(|k| k.alg == alg)
            .map_or(Selection::AlgorithmMismatch, Selection::Key)
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<Value>,
}

/// Parses a JWK Set, keeping the keys that can verify signatures and skipping (with a debug
/// line) the rest: encryption keys, symmetric keys, unknown types, weak RSA keys, and keys
/// whose `alg` contradicts their type. One odd key must not make the whole set unusable.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<Vec<VerifyKey>, serde_json::Error> {
    let raw: RawSet = serde_json::from_slice(body)?;
    let mut keys = Vec::with_capacity(raw.keys.len());
    for value in raw.keys {
        let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
        match parse_key(value) {
            Ok(key) => keys.push(key),
            Err(reason) => tracing::debug!(kid, reason, "skipping a JWK"),
        }
    }
    Ok(keys)
}

fn parse_key(value: Value) -> Result<VerifyKey, &'static str> {
    if value.get("use").is_some_and(|u| u != "sig") {
        return Err("not a signature key (use)");
    }
    if let Some(ops) = value.get("key_ops")
        && !ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op == "verify"))
    {
        return Err("not a verification key (key_ops)");
    }
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| "not a valid JWK")?;
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = URL_SAFE_NO_PAD
                .decode(&rsa.n)
                .map_err(|_| "bad RSA modulus")?;
            let bits = modulus.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_BITS {
                return Err("RSA key shorter than 2048 bits");
            }
            // RFC 7518 leaves an RSA key without `alg` open; RS256 is what OpenID Connect
            // requires every provider to support, so it is the one assumed.
            Family::Rsa
        }
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Family::Fixed(Algorithm::ES256),
            EllipticCurve::P384 => Family::Fixed(Algorithm::ES384),
            _ => return Err("unsupported elliptic curve"),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Family::Fixed(Algorithm::EdDSA),
            _ => return Err("unsupported OKP curve"),
        },
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never accepted"),
        _ => return Err("unsupported key type"),
    };
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => Some(key_algorithm(alg).ok_or("unsupported alg")?),
    };
    let alg = match (inferred, declared) {
        (Family::Rsa, None) => Algorithm::RS256,
        (Family::Rsa, Some(alg)) if is_rsa(alg) => alg,
        (Family::Fixed(fixed), None) => fixed,
        (Family::Fixed(fixed), Some(alg)) if alg == fixed => fixed,
        _ => return Err("alg does not fit the key type"),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "unusable key material")?;
    Ok(VerifyKey {
        kid: jwk.common.key_id,
        alg,
        key,
    })
}

#[derive(Clone, Copy)]
enum Family {
    Rsa,
    Fixed(Algorithm),
}

fn is_rsa(alg: Algorithm) -> bool {
    use Algorithm::*;
    matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
}

fn key_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fixture(name: &str) -> Value {
        let text = match name {
            "rsa-1" => include_str!("../tests/keys/rsa-1.jwk.json"),
            "ec-1" => include_str!("../tests/keys/ec-1.jwk.json"),
            "ed-1" => include_str!("../tests/keys/ed-1.jwk.json"),
            _ => unreachable!(),
        };
        serde_json::from_str(text).unwrap()
    }

    fn with(name: &str, changes: Value) -> Value {
        let mut key = fixture(name);
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                key.as_object_mut().unwrap().remove(k);
            } else {
                key[k] = v.clone();
            }
        }
        key
    }

    fn parse(keys: Vec<Value>) -> Vec<(Option<String>, Algorithm)> {
        let body = serde_json::to_vec(&json!({ "keys": keys })).unwrap();
        parse_jwks(&body)
            .unwrap()
            .into_iter()
            .map(|k| (k.kid, k.alg))
            .collect()
    }

    #[test]
    fn keys_are_pinned_to_their_algorithm() {
        let parsed = parse(vec![fixture("rsa-1"), fixture("ec-1"), fixture("ed-1")]);
        assert_eq!(
            parsed,
            vec![
                (Some("rsa-1".into()), Algorithm::RS256),
                (Some("ec-1".into()), Algorithm::ES256),
                (Some("ed-1".into()), Algorithm::EdDSA),
            ]
        );
        // Without alg, the type decides; an RSA key then means RS256.
        let parsed = parse(vec![
            with("rsa-1", json!({"alg": null})),
            with("ec-1", json!({"alg": null})),
            with("ed-1", json!({"alg": null})),
        ]);
        let algs: Vec<_> = parsed.into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            algs,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
        );
        assert_eq!(
            parse(vec![with("rsa-1", json!({"alg": "PS256"}))])[0].1,
            Algorithm::PS256
        );
    }

    #[test]
    fn unusable_keys_are_skipped_not_fatal() {
        let skipped = vec![
            with("rsa-1", json!({"use": "enc"})),
            with("rsa-1", json!({"key_ops": ["encrypt"]})),
            with("rsa-1", json!({"alg": "RSA-OAEP"})),
            with("rsa-1", json!({"alg": "HS256"})),
            with("rsa-1", json!({"alg": "ES256"})),
            with("ec-1", json!({"alg": "RS256"})),
            with("ec-1", json!({"alg": "ES384"})),
            with("ed-1", json!({"alg": "ES256"})),
            with("rsa-1", json!({"n": URL_SAFE_NO_PAD.encode([0xff; 128])})),
            json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256", "kid": "hmac"}),
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}),
            json!({"kty": "weird", "kid": "x"}),
            json!("not an object"),
        ];
        let mut keys = skipped;
        keys.push(with("rsa-1", json!({"key_ops": ["verify"]})));
        assert_eq!(parse(keys), vec![(Some("rsa-1".into()), Algorithm::RS256)]);
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn selection() {
        let body = serde_json::to_vec(&json!({"keys": [
            fixture("rsa-1"),
            with("rsa-1", json!({"alg": "PS256"})),
            fixture("ec-1"),
        ]}))
        .unwrap();
        let set = KeySet {
            keys: parse_jwks(&body).unwrap(),
            fetched_at: Instant::now(),
            generation: 1,
        };
        assert!(
            matches!(set.select(Some("rsa-1"), Algorithm::RS256), Selection::Key(k) if k.alg == Algorithm::RS256)
        );
        assert!(
            matches!(set.select(Some("rsa-1"), Algorithm::PS256), Selection::Key(k) if k.alg == Algorithm::PS256)
        );
        assert!(matches!(
            set.select(Some("rsa-1"), Algorithm::ES256),
            Selection::AlgorithmMismatch
        ));
        assert!(matches!(
            set.select(Some("ec-1"), Algorithm::RS256),
            Selection::AlgorithmMismatch
        ));
        assert!(matches!(
            set.select(Some("nope"), Algorithm::RS256),
            Selection::UnknownKid
        ));
        assert!(matches!(
            set.select(None, Algorithm::RS256),
            Selection::Ambiguous
        ));

        let single = KeySet {
            keys: parse_jwks(&serde_json::to_vec(&json!({"keys": [fixture("ec-1")]})).unwrap())
                .unwrap(),
            fetched_at: Instant::now(),
            generation: 1,
        };
        assert!(matches!(
            single.select(None, Algorithm::ES256),
            Selection::Key(_)
        ));
        assert!(matches!(
            single.select(None, Algorithm::RS256),
            Selection::AlgorithmMismatch
        ));
    }
}
