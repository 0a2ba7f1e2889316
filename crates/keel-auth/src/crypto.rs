//! The server's own secrets: sealing private keys at rest, hashing client secrets, and
//! generating random values. Everything is derived from one configured key (the key
//! encryption key), so an operator keeps one secret, and each use gets its own subkey
//! (HKDF-SHA256 with a distinct label) so no key serves two purposes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest::{SHA256, digest};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of a key encryption key.
pub const KEY_BYTES: usize = 32;

/// Why the configured key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the key encryption key must be {KEY_BYTES} bytes in unpadded base64url (43 characters)"
    )]
    Malformed,
}

/// A sealed value could not be opened: wrong key, or the bytes were changed.
#[derive(Debug, thiserror::Error)]
#[error("a sealed value did not open under the configured key (wrong key or altered data)")]
pub struct Unsealable;

/// The subkeys derived from the configured key encryption key.
pub struct Secrets {
    /// Seals signing keys' private halves (AES-256-GCM).
    sealing: LessSafeKey,
    /// Keys the hash of client secrets (HMAC-SHA256), so a stolen table alone cannot be
    /// checked against guesses.
    secret_hashing: hmac::Key,
    /// Binds CSRF tokens to the browser's CSRF cookie (HMAC-SHA256).
    csrf: hmac::Key,
    /// Names the key encryption key without revealing it, stored beside every sealed
    /// value so that a wrong key is reported as such.
    key_id: String,
    random: SystemRandom,
}

impl Secrets {
    /// From the key encryption key, as unpadded base64url.
    pub fn from_base64(key: &str) -> Result<Self, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(key.trim())
            .map_err(|_| KeyError::Malformed)?;
        let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(Self::from_bytes(&bytes))
    }

    pub fn from_bytes(key: &[u8; KEY_BYTES]) -> Self {
        let prk = Salt::new(HKDF_SHA256, b"keel-auth").extract(key);
        let sealing = prk
            .expand(&[b"keel-auth signing-key sealing"], &AES_256_GCM)
            .map(UnboundKey::from)
            .map(LessSafeKey::new);
        let secret_hashing = prk
            .expand(&[b"keel-auth client-secret hashing"], hmac::HMAC_SHA256)
            .map(hmac::Key::from);
        let csrf = prk
            .expand(&[b"keel-auth csrf"], hmac::HMAC_SHA256)
            .map(hmac::Key::from);
        // HKDF-SHA256 can expand up to 255 * 32 bytes; 32 always fits.
        let (Ok(sealing), Ok(secret_hashing), Ok(csrf)) = (sealing, secret_hashing, csrf) else {
            unreachable!("HKDF-SHA256 expands to 32 bytes")
        };
        let id = digest(&SHA256, key);
        Self {
            sealing,
            secret_hashing,
            csrf,
            key_id: hex(&id.as_ref()[..8]),
            random: SystemRandom::new(),
        }
    }

    /// A new random key encryption key, as unpadded base64url.
    pub fn generate_key() -> String {
        let mut key = [0u8; KEY_BYTES];
        fill_random(&mut key);
        URL_SAFE_NO_PAD.encode(key)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `plaintext` encrypted and authenticated, bound to `context` (which must be given
    /// again to open it): a random nonce, then the ciphertext and tag.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.fill_random(&mut nonce);
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        sealed.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs beyond AES-GCM's size limit (64 GiB).
        if self
            .sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut body,
            )
            .is_err()
        {
            unreachable!("a signing key is far below AES-GCM's limit")
        }
        sealed.extend_from_slice(&body);
        sealed
    }

    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unsealable> {
        if sealed.len() < NONCE_LEN {
            return Err(Unsealable);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unsealable)?;
        let mut body = body.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, Aad::from(context), &mut body)
            .map_err(|_| Unsealable)?;
        Ok(plaintext.to_vec())
    }

    /// The stored form of a client secret.
    pub fn hash_secret(&self, secret: &str) -> Vec<u8> {
        hmac::sign(&self.secret_hashing, secret.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// Whether `secret` is the one `stored` was made from; constant-time in the bytes
    /// compared.
    pub fn secret_matches(&self, secret: &str, stored: &[u8]) -> bool {
        hmac::verify(&self.secret_hashing, secret.as_bytes(), stored).is_ok()
    }

    /// The CSRF token a form carries for the browser whose CSRF cookie is `cookie`.
    pub fn csrf_token(&self, cookie: &str) -> String {
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.csrf, cookie.as_bytes()))
    }

    /// Whether a form's CSRF token belongs to `cookie` (constant-time).
    pub fn csrf_matches(&self, cookie: &str, token: &str) -> bool {
        URL_SAFE_NO_PAD
            .decode(token)
            .is_ok_and(|tag| hmac::verify(&self.csrf, cookie.as_bytes(), &tag).is_ok())
    }

    /// A new secret: 256 random bits in unpadded base64url (43 characters). Secrets are
    /// made only here, with this much entropy, which is why a fast keyed hash is enough
    /// to store them (guessing is hopeless; argon2 is for passwords people choose).
    pub fn generate_secret(&self) -> String {
        let mut bytes = [0u8; 32];
        self.fill_random(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An identifier nobody can guess: 128 random bits in unpadded base64url.
    pub fn generate_id(&self) -> String {
        let mut bytes = [0u8; 16];
        self.fill_random(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn rng(&self) -> &SystemRandom {
        &self.random
    }

    /// Fills `out` with random bytes.
    pub fn fill_random(&self, out: &mut [u8]) {
        if self.random.fill(out).is_err() {
            // The operating system's generator failed: nothing safe can be issued.
            panic!("the system random number generator failed");
        }
    }
}

fn fill_random(out: &mut [u8]) {
    if SystemRandom::new().fill(out).is_err() {
        panic!("the system random number generator failed");
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

/// SHA-256 of `value`, for looking up values (codes, tokens) without storing them.
pub fn sha256(value: &[u8]) -> Vec<u8> {
    digest(&SHA256, value).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets::from_bytes(&[7; KEY_BYTES])
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let secrets = secrets();
        let sealed = secrets.seal(b"kid-1|RS256", b"private key");
        assert_ne!(&sealed[NONCE_LEN..], b"private key");
        assert_eq!(
            secrets.open(b"kid-1|RS256", &sealed).unwrap(),
            b"private key"
        );
        // Another context (a key's row moved to another kid) or another key fails.
        assert!(secrets.open(b"kid-2|RS256", &sealed).is_err());
        assert!(
            Secrets::from_bytes(&[8; KEY_BYTES])
                .open(b"kid-1|RS256", &sealed)
                .is_err()
        );
        // Altered or truncated data fails, and never panics.
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(secrets.open(b"kid-1|RS256", &altered).is_err());
        assert!(secrets.open(b"kid-1|RS256", &sealed[..5]).is_err());
        assert!(secrets.open(b"kid-1|RS256", &[]).is_err());
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let secrets = secrets();
        assert_ne!(secrets.seal(b"c", b"v"), secrets.seal(b"c", b"v"));
    }

    #[test]
    fn secret_hashes_are_keyed() {
        let secrets = secrets();
        let secret = secrets.generate_secret();
        assert_eq!(secret.len(), 43);
        let stored = secrets.hash_secret(&secret);
        assert!(secrets.secret_matches(&secret, &stored));
        assert!(!secrets.secret_matches("guess", &stored));
        assert!(!secrets.secret_matches(&secret, &stored[..16]));
        // Another server key gives another hash: the table alone cannot be checked.
        assert_ne!(
            Secrets::from_bytes(&[8; KEY_BYTES]).hash_secret(&secret),
            stored
        );
    }

    #[test]
    fn the_configured_key_is_checked() {
        let key = Secrets::generate_key();
        assert_eq!(key.len(), 43);
        let a = Secrets::from_base64(&key).unwrap();
        let b = Secrets::from_base64(&key).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.key_id().len(), 16);
        assert!(Secrets::from_base64("short").is_err());
        assert!(Secrets::from_base64("not base64 at all, not base64 at all, not!!").is_err());
        assert!(Secrets::from_base64(&URL_SAFE_NO_PAD.encode([1u8; 31])).is_err());
    }

    #[test]
    fn csrf_tokens_belong_to_their_cookie() {
        let secrets = secrets();
        let token = secrets.csrf_token("cookie-a");
        assert!(secrets.csrf_matches("cookie-a", &token));
        assert!(!secrets.csrf_matches("cookie-b", &token));
        assert!(!secrets.csrf_matches("cookie-a", "forged"));
        assert!(!secrets.csrf_matches("cookie-a", ""));
    }

    #[test]
    fn generated_values_are_unique() {
        let secrets = secrets();
        assert_ne!(secrets.generate_secret(), secrets.generate_secret());
        assert_ne!(secrets.generate_id(), secrets.generate_id());
        assert_eq!(secrets.generate_id().len(), 22);
    }
}
