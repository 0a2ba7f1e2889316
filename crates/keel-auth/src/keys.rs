//! Signing keys: generated here, stored with their private half sealed, published as a
//! JWK Set, and used to sign JWTs (JWS compact serialization, RFC 7515).
//!
//! Signing is ring's (constant-time RSA, ECDSA P-256 and Ed25519). ring cannot generate
//! RSA keys, so the `rsa` crate makes them (and only that: it never signs, being open to
//! timing attacks on private-key operations), handing ring the PKCS#8 document.
//!
//! A key's life: created (published in the key set at once), active from `activates_at`
//! (signs), retired at `retires_at` (stops signing, still published), gone from the set at
//! `expires_at`, once every token it signed has expired. The first key of an algorithm
//! signs at once: no verifier can hold an older key set of a new issuer. Rotation sets
//! the next key's `activates_at` far enough ahead that verifiers have refreshed their
//! cached sets before it signs.

use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair, RsaPublicKeyComponents,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;

use crate::crypto::{Secrets, Unsealable};
use crate::db::{Db, DbError, SIGNING_KEYS_LOCK};
use sqlx::AnyConnection;

/// Bits of a generated RSA key.
const RSA_BITS: usize = 2048;

/// The algorithms tokens are signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SigningAlg {
    RS256,
    ES256,
    EdDSA,
}

impl SigningAlg {
    pub const ALL: [SigningAlg; 3] = [Self::RS256, Self::ES256, Self::EdDSA];

    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|alg| alg.name() == name)
    }
}

/// Why keys could not be made, stored or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(
        "signing key {kid} was sealed under key encryption key {stored}, but the configured one is {configured}: configure the key the keys were made with"
    )]
    WrongKek {
        kid: String,
        stored: String,
        configured: String,
    },
    #[error("signing key {kid}: {source}")]
    Unsealable {
        kid: String,
        #[source]
        source: Unsealable,
    },
    #[error("signing key {kid} is not a valid {alg} key")]
    Invalid { kid: String, alg: String },
    #[error("key generation failed: {0}")]
    Generation(String),
}

impl From<sqlx::Error> for KeyError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(DbError::Query(error))
    }
}

enum Signer {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl Signer {
    fn from_pkcs8(alg: SigningAlg, der: &[u8], rng: &SystemRandom) -> Option<Self> {
        match alg {
            SigningAlg::RS256 => RsaKeyPair::from_pkcs8(der).ok().map(Self::Rsa),
            SigningAlg::ES256 => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, rng)
                    .ok()
                    .map(Self::Ecdsa)
            }
            SigningAlg::EdDSA => Ed25519KeyPair::from_pkcs8(der).ok().map(Self::Ed25519),
        }
    }

    /// The public key as JWK members (RFC 7518 §6, RFC 8037 §2).
    fn public_jwk(&self) -> Value {
        match self {
            Self::Rsa(pair) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "n": b64(&public.n), "e": b64(&public.e)})
            }
            Self::Ecdsa(pair) => {
                // Uncompressed point: 0x04 || X || Y, 32 bytes each on P-256.
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            Self::Ed25519(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature::{
            ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
        };
        match self {
            Self::Rsa(pair) => RsaPublicKeyComponents::<Vec<u8>>::from(pair.public())
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Self::Ecdsa(pair) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key())
                    .verify(message, signature)
                    .is_ok()
            }
            Self::Ed25519(pair) => UnparsedPublicKey::new(&ED25519, pair.public_key())
                .verify(message, signature)
                .is_ok(),
        }
    }

    fn sign(&self, message: &[u8], rng: &SystemRandom) -> Vec<u8> {
        // ring fails to sign only on a wrong signature length or a broken random source,
        // neither of which a valid key here can meet.
        match self {
            Self::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                if pair
                    .sign(&RSA_PKCS1_SHA256, rng, message, &mut signature)
                    .is_err()
                {
                    panic!("RSA signing failed");
                }
                signature
            }
            Self::Ecdsa(pair) => match pair.sign(rng, message) {
                Ok(signature) => signature.as_ref().to_vec(),
                Err(_) => panic!("ECDSA signing failed"),
            },
            Self::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A new private key of `alg`, as PKCS#8 DER. RSA takes a while: call it off the async
/// threads.
fn generate_pkcs8(alg: SigningAlg, rng: &SystemRandom) -> Result<Vec<u8>, KeyError> {
    let failed = |what: &dyn std::fmt::Display| KeyError::Generation(format!("{alg:?}: {what}"));
    match alg {
        SigningAlg::RS256 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
                .map_err(|e| failed(&e))?;
            let der = key.to_pkcs8_der().map_err(|e| failed(&e))?;
            Ok(der.as_bytes().to_vec())
        }
        SigningAlg::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|e| failed(&e)),
        SigningAlg::EdDSA => Ed25519KeyPair::generate_pkcs8(rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|e| failed(&e)),
    }
}

/// A usable signing key.
pub struct SigningKey {
    pub kid: String,
    pub alg: SigningAlg,
    pub created_at: i64,
    pub activates_at: i64,
    pub retires_at: Option<i64>,
    pub expires_at: Option<i64>,
    jwk: Value,
    signer: Signer,
}

impl SigningKey {
    fn new(
        kid: String,
        alg: SigningAlg,
        der: &[u8],
        rng: &SystemRandom,
        times: [Option<i64>; 4],
    ) -> Result<Self, KeyError> {
        let signer = Signer::from_pkcs8(alg, der, rng).ok_or_else(|| KeyError::Invalid {
            kid: kid.clone(),
            alg: alg.name().to_owned(),
        })?;
        let mut jwk = signer.public_jwk();
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!(alg.name());
        jwk["use"] = json!("sig");
        let [created_at, activates_at, retires_at, expires_at] = times;
        Ok(Self {
            kid,
            alg,
            created_at: created_at.unwrap_or(0),
            activates_at: activates_at.unwrap_or(0),
            retires_at,
            expires_at,
            jwk,
            signer,
        })
    }

    /// The public JWK (`kid`, `alg`, `use: sig`).
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    fn signs_at(&self, now: i64) -> bool {
        self.activates_at <= now && self.retires_at.is_none_or(|retires| now < retires)
    }

    fn published_at(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|expires| now < expires)
    }

    /// A JWS compact serialization of `claims` with header `typ` (e.g. `at+jwt`, `JWT`).
    pub fn sign_jwt(&self, typ: &str, claims: &Value, rng: &SystemRandom) -> String {
        let header = json!({"alg": self.alg.name(), "typ": typ, "kid": self.kid});
        let mut token = b64(header.to_string().as_bytes());
        token.push('.');
        token.push_str(&b64(claims.to_string().as_bytes()));
        let signature = self.signer.sign(token.as_bytes(), rng);
        token.push('.');
        token.push_str(&b64(&signature));
        token
    }
}

/// The keys in use, shared by every request; replaced whole when keys change.
#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<Arc<Vec<Arc<SigningKey>>>>,
}

impl KeyRing {
    /// Loads every stored key, opening its private half with `secrets`.
    pub async fn load(db: &Db, secrets: &Secrets) -> Result<Self, KeyError> {
        let ring = Self::default();
        ring.reload(db, secrets).await?;
        Ok(ring)
    }

    pub async fn reload(&self, db: &Db, secrets: &Secrets) -> Result<(), KeyError> {
        let rows = sqlx::query(
            "SELECT kid, alg, sealed_private, kek_id, created_at, activates_at, retires_at, expires_at \
             FROM signing_keys ORDER BY created_at, kid",
        )
        .fetch_all(db.pool())
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let kid: String = row.try_get("kid")?;
            let alg: String = row.try_get("alg")?;
            let Some(alg) = SigningAlg::from_name(&alg) else {
                // A key of an algorithm this version does not know: leave it alone.
                tracing::warn!(%kid, %alg, "signing key of an unknown algorithm ignored");
                continue;
            };
            let kek_id: String = row.try_get("kek_id")?;
            if kek_id != secrets.key_id() {
                return Err(KeyError::WrongKek {
                    kid,
                    stored: kek_id,
                    configured: secrets.key_id().to_owned(),
                });
            }
            let sealed: Vec<u8> = row.try_get("sealed_private")?;
            let der = secrets
                .open(&seal_context(&kid, alg), &sealed)
                .map_err(|source| KeyError::Unsealable {
                    kid: kid.clone(),
                    source,
                })?;
            let times = [
                row.try_get("created_at")?,
                row.try_get("activates_at")?,
                row.try_get("retires_at")?,
                row.try_get("expires_at")?,
            ];
            keys.push(Arc::new(SigningKey::new(
                kid,
                alg,
                &der,
                secrets.rng(),
                times,
            )?));
        }
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(())
    }

    fn snapshot(&self) -> Arc<Vec<Arc<SigningKey>>> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The key that signs `alg` tokens at `now`: the newest active one.
    pub fn active(&self, alg: SigningAlg, now: i64) -> Option<Arc<SigningKey>> {
        self.snapshot()
            .iter()
            .filter(|key| key.alg == alg && key.signs_at(now))
            .max_by_key(|key| (key.activates_at, key.created_at))
            .cloned()
    }

    /// The claims of `token` when it is a JWS of `typ` signed by one of these keys (still
    /// published at `now`) with the algorithm of that key; `None` for anything else. Only
    /// the signature and type are checked here: expiry and the rest are the caller's.
    pub fn verify(&self, token: &str, typ: &str, now: i64) -> Option<Value> {
        if token.len() > 16 * 1024 {
            return None;
        }
        let (input, signature) = token.rsplit_once('.')?;
        let (header, claims) = input.split_once('.')?;
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        let kid = header.get("kid")?.as_str()?;
        let snapshot = self.snapshot();
        let key = snapshot
            .iter()
            .find(|key| key.kid == kid && key.published_at(now))?;
        if header.get("alg")?.as_str()? != key.alg.name() || header.get("typ")?.as_str()? != typ {
            return None;
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        if !key.signer.verify(input.as_bytes(), &signature) {
            return None;
        }
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()
    }

    /// The JWK Set document: every key not yet expired, including keys that do not sign
    /// yet (published ahead) and retired ones (their tokens may still be live).
    pub fn jwks(&self, now: i64) -> Value {
        let snapshot = self.snapshot();
        let keys: Vec<&Value> = snapshot
            .iter()
            .filter(|key| key.published_at(now))
            .map(|key| &key.jwk)
            .collect();
        json!({ "keys": keys })
    }

    /// Makes sure every algorithm has a key that signs now, generating and storing the
    /// missing ones, and loads every key stored. Servers sharing the database take turns
    /// (a lock held while checking and generating), so two starting together make one
    /// key per algorithm, not two. Returns the kids generated.
    pub async fn ensure_active(
        &self,
        db: &Db,
        secrets: &Secrets,
        now: i64,
    ) -> Result<Vec<String>, KeyError> {
        let mut made = Vec::new();
        if SigningAlg::ALL
            .iter()
            .any(|alg| self.active(*alg, now).is_none())
        {
            let mut tx = db.pool().begin().await?;
            db.lock(&mut tx, SIGNING_KEYS_LOCK).await?;
            for alg in SigningAlg::ALL {
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM signing_keys WHERE alg = $1 AND activates_at <= $2 \
                     AND (retires_at IS NULL OR retires_at > $3)",
                )
                .bind(alg.name())
                .bind(now)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                if active == 0 {
                    made.push(generate_and_store(&mut tx, secrets, alg, now, now).await?);
                }
            }
            tx.commit().await?;
        }
        self.reload(db, secrets).await?;
        Ok(made)
    }
}

/// The longest a token signed by a key can live (the largest access-token lifetime a
/// client may have, one day, and the verifiers' leeway): how long a retired key stays
/// published.
const LONGEST_TOKEN: i64 = 86_400 + 300;

impl KeyRing {
    /// Rotates `alg`: a new key is published now and signs from `now + lead`; the keys it
    /// replaces stop signing then and leave the key set once the last token they can
    /// have signed has expired. `lead` must exceed the time verifiers cache the key set
    /// (keel-jwt refreshes every 10 minutes), so that every verifier knows the new key
    /// before the first token it signs. Returns the new key's kid.
    pub async fn rotate(
        &self,
        db: &Db,
        secrets: &Secrets,
        alg: SigningAlg,
        now: i64,
        lead: i64,
    ) -> Result<String, KeyError> {
        let mut tx = db.pool().begin().await?;
        db.lock(&mut tx, SIGNING_KEYS_LOCK).await?;
        let kid = rotate_in(&mut tx, secrets, alg, now, lead).await?;
        tx.commit().await?;
        self.reload(db, secrets).await?;
        Ok(kid)
    }

    /// Rotates, as [`Self::rotate`], every algorithm whose newest key has signed for
    /// `interval` seconds (automatic rotation by age). Servers sharing the database take
    /// turns and look again under the lock, so a key is rotated out once, by whichever
    /// server comes first. Returns the algorithms rotated and their new kids.
    pub async fn rotate_due(
        &self,
        db: &Db,
        secrets: &Secrets,
        now: i64,
        interval: i64,
        lead: i64,
    ) -> Result<Vec<(SigningAlg, String)>, KeyError> {
        // A key that signs later (a rotation under way) counts as the newest: its
        // interval starts when it signs.
        let due = |newest: Option<i64>| newest.is_some_and(|at| at.saturating_add(interval) <= now);
        let keys = self.snapshot();
        // A key retired before it ever signed (a later rotation with a shorter lead)
        // does not count.
        let newest = |alg: SigningAlg| {
            keys.iter()
                .filter(|key| {
                    key.alg == alg && key.retires_at.is_none_or(|at| at > key.activates_at)
                })
                .map(|key| key.activates_at)
                .max()
        };
        // Most minutes nothing is due: known without a query.
        if !SigningAlg::ALL.iter().any(|alg| due(newest(*alg))) {
            return Ok(Vec::new());
        }
        let mut tx = db.pool().begin().await?;
        db.lock(&mut tx, SIGNING_KEYS_LOCK).await?;
        let mut rotated = Vec::new();
        for alg in SigningAlg::ALL {
            let newest: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(activates_at) FROM signing_keys WHERE alg = $1 \
                     AND (retires_at IS NULL OR retires_at > activates_at)",
            )
            .bind(alg.name())
            .fetch_one(&mut *tx)
            .await?;
            if due(newest) {
                rotated.push((alg, rotate_in(&mut tx, secrets, alg, now, lead).await?));
            }
        }
        tx.commit().await?;
        self.reload(db, secrets).await?;
        Ok(rotated)
    }
}

/// A new key of `alg`, published now and signing from `now + lead`, and the keys it
/// replaces retired then; in `tx`, under the signing keys' lock.
async fn rotate_in(
    tx: &mut AnyConnection,
    secrets: &Secrets,
    alg: SigningAlg,
    now: i64,
    lead: i64,
) -> Result<String, KeyError> {
    let activates_at = now.saturating_add(lead);
    let kid = generate_and_store(tx, secrets, alg, now, activates_at).await?;
    sqlx::query(
        "UPDATE signing_keys SET retires_at = $1, expires_at = $2 \
         WHERE alg = $3 AND kid <> $4 AND (retires_at IS NULL OR retires_at > $5)",
    )
    .bind(activates_at)
    .bind(activates_at.saturating_add(LONGEST_TOKEN))
    .bind(alg.name())
    .bind(&kid)
    .bind(activates_at)
    .execute(&mut *tx)
    .await?;
    Ok(kid)
}

/// What a sealed private key is bound to, so that it cannot be moved to another row.
fn seal_context(kid: &str, alg: SigningAlg) -> Vec<u8> {
    format!("{kid}|{}", alg.name()).into_bytes()
}

/// Generates a key of `alg` that signs from `activates_at`, stores it sealed, and returns
/// its kid.
pub async fn generate_and_store(
    db: &mut AnyConnection,
    secrets: &Secrets,
    alg: SigningAlg,
    now: i64,
    activates_at: i64,
) -> Result<String, KeyError> {
    let der = tokio::task::spawn_blocking(move || generate_pkcs8(alg, &SystemRandom::new()))
        .await
        .map_err(|e| KeyError::Generation(e.to_string()))??;
    let kid = secrets.generate_id();
    let key = SigningKey::new(
        kid.clone(),
        alg,
        &der,
        secrets.rng(),
        [Some(now), Some(activates_at), None, None],
    )?;
    sqlx::query(
        "INSERT INTO signing_keys (kid, alg, public_jwk, sealed_private, kek_id, created_at, activates_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&kid)
    .bind(alg.name())
    .bind(key.jwk.to_string())
    .bind(secrets.seal(&seal_context(&kid, alg), &der))
    .bind(secrets.key_id())
    .bind(now)
    .bind(activates_at)
    .execute(db)
    .await?;
    tracing::info!(%kid, alg = alg.name(), activates_at, "signing key generated");
    Ok(kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(alg: SigningAlg, times: [Option<i64>; 4]) -> SigningKey {
        let rng = SystemRandom::new();
        let der = generate_pkcs8(alg, &rng).unwrap();
        SigningKey::new(format!("k-{alg:?}"), alg, &der, &rng, times).unwrap()
    }

    fn verify(key: &SigningKey, token: &str) -> bool {
        use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};
        let (input, signature) = token.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        match &key.signer {
            Signer::Rsa(pair) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                public
                    .verify(
                        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                        input.as_bytes(),
                        &signature,
                    )
                    .is_ok()
            }
            Signer::Ecdsa(pair) => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key())
                    .verify(input.as_bytes(), &signature)
                    .is_ok()
            }
            Signer::Ed25519(pair) => UnparsedPublicKey::new(&ED25519, pair.public_key())
                .verify(input.as_bytes(), &signature)
                .is_ok(),
        }
    }

    #[test]
    fn every_algorithm_signs_what_its_public_key_verifies() {
        let rng = SystemRandom::new();
        for alg in [SigningAlg::ES256, SigningAlg::EdDSA, SigningAlg::RS256] {
            let key = key(alg, [Some(0), Some(0), None, None]);
            let token = key.sign_jwt("at+jwt", &json!({"sub": "x"}), &rng);
            assert!(verify(&key, &token), "{alg:?}");
            let mut parts = token.split('.');
            let header: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap())
                    .unwrap();
            assert_eq!(
                header,
                json!({"alg": alg.name(), "typ": "at+jwt", "kid": key.kid})
            );
            // A changed payload no longer verifies.
            let tampered = token.replacen(parts.next().unwrap(), &b64(b"{\"sub\":\"y\"}"), 1);
            assert!(!verify(&key, &tampered), "{alg:?}");
            let jwk = key.jwk();
            assert_eq!(jwk["alg"], alg.name());
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["kid"], key.kid.as_str());
            assert!(
                jwk.get("d").is_none(),
                "no private member in a published JWK"
            );
        }
    }

    #[test]
    fn a_key_signs_between_activation_and_retirement_and_is_published_until_expiry() {
        let key = key(
            SigningAlg::EdDSA,
            [Some(0), Some(100), Some(200), Some(300)],
        );
        assert!(!key.signs_at(99));
        assert!(key.signs_at(100));
        assert!(key.signs_at(199));
        assert!(!key.signs_at(200));
        assert!(key.published_at(0));
        assert!(key.published_at(299));
        assert!(!key.published_at(300));
    }

    #[test]
    fn the_newest_active_key_signs() {
        let ring = KeyRing::default();
        let old = key(SigningAlg::ES256, [Some(0), Some(0), Some(200), Some(400)]);
        let mut next = key(SigningAlg::ES256, [Some(50), Some(200), None, None]);
        next.kid = "next".into();
        *ring.keys.write().unwrap() = Arc::new(vec![Arc::new(old), Arc::new(next)]);
        assert_eq!(ring.active(SigningAlg::ES256, 100).unwrap().kid, "k-ES256");
        assert_eq!(ring.active(SigningAlg::ES256, 200).unwrap().kid, "next");
        assert!(ring.active(SigningAlg::RS256, 100).is_none());
        // Both published while the old one's tokens may live; then only the new one.
        assert_eq!(ring.jwks(100)["keys"].as_array().unwrap().len(), 2);
        assert_eq!(ring.jwks(400)["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_ring_verifies_its_own_tokens_only() {
        let rng = SystemRandom::new();
        let ring = KeyRing::default();
        let es = key(SigningAlg::ES256, [Some(0), Some(0), None, Some(1000)]);
        let token = es.sign_jwt("at+jwt", &json!({"sub": "x"}), &rng);
        let stranger = key(SigningAlg::ES256, [Some(0), Some(0), None, None]);
        let forged = stranger.sign_jwt("at+jwt", &json!({"sub": "x"}), &rng);
        *ring.keys.write().unwrap() = Arc::new(vec![Arc::new(es)]);
        assert_eq!(ring.verify(&token, "at+jwt", 10).unwrap()["sub"], "x");
        assert!(ring.verify(&token, "JWT", 10).is_none(), "another type");
        assert!(
            ring.verify(&token, "at+jwt", 1000).is_none(),
            "key no longer published"
        );
        assert!(
            ring.verify(&forged, "at+jwt", 10).is_none(),
            "same kid, other key"
        );
        let tampered = token.replacen('.', ".e30", 1);
        assert!(ring.verify(&tampered, "at+jwt", 10).is_none());
        for garbage in ["", "a.b", "a.b.c", "...", "\u{0}"] {
            assert!(ring.verify(garbage, "at+jwt", 10).is_none());
        }
    }

    #[test]
    fn algorithm_names_round_trip() {
        for alg in SigningAlg::ALL {
            assert_eq!(SigningAlg::from_name(alg.name()), Some(alg));
        }
        assert_eq!(SigningAlg::from_name("none"), None);
        assert_eq!(SigningAlg::from_name("HS256"), None);
    }
}
