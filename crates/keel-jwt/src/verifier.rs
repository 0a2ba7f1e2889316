//! [`Verifier`]: checks access tokens against the issuer's cached keys.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{ConfigError, VerifierConfig};
use crate::error::VerifyError;
use crate::fetch::{FetchError, discover_jwks_uri, fetch_jwks};
use crate::keys::{KeySet, Selection, VerifyKey};
use crate::principal::Principal;
use crate::token::{self, UnverifiedToken};

/// While no keys are cached every request fails anyway, so fetches are retried sooner than
/// `min_refresh_interval` would allow, but still at most this often.
const EMPTY_CACHE_RETRY: Duration = Duration::from_secs(1);

/// Verifies RFC 9068 JWT access tokens from one issuer.
///
/// Cheap to clone; clones share the key cache. Keys are fetched on first use (or by
/// [`refresh`](Self::refresh)), refreshed in the background once older than
/// `refresh_interval`, and re-fetched early when a token names an unknown `kid` (at most
/// once per `min_refresh_interval`, one fetch shared by all requests waiting for it). A
/// failed refresh keeps the cached keys.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: VerifierConfig,
    http: reqwest::Client,
    /// The current keys. A std lock: it is held only to clone the `Arc`, never across an
    /// await, so readers never wait for a fetch.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Whoever holds this is the one fetch in flight (single flight); the others wait on
    /// it and then use its result.
    refresh: Arc<Mutex<RefreshState>>,
    /// Tokens already verified (see `VerifierConfig::cache_size`).
    verified: std::sync::Mutex<HashMap<Box<[u8]>, Arc<Principal>, TailHash>>,
}

/// Hashes the last [`TAIL`] bytes of a token with foldhash and a random seed: a JWT ends in
/// its signature, as random as any hash of the whole, and hashing all ~800 bytes of a token
/// (or SipHash on its tail) cost more than the rest of the gateway's work on a request.
/// Foldhash resists only simple flooding, which is enough here: colliding tails cannot be
/// planted, as only verified tokens (signed by the issuer) enter the map, and lookups still
/// compare whole tokens.
#[derive(Default, Clone)]
struct TailHash(foldhash::fast::RandomState);

const TAIL: usize = 32;

impl std::hash::BuildHasher for TailHash {
    type Hasher = TailHasher;

    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

struct TailHasher(foldhash::fast::FoldHasher<'static>);

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(TAIL)..]);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    generation: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.config.issuer)
            .field("audiences", &self.inner.config.audiences)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Validates the configuration; fetches nothing yet.
    pub fn new(config: VerifierConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let http = keel_runtime::http_client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            .build()
            .map_err(ConfigError::HttpClient)?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                keys: RwLock::new(None),
                refresh: Arc::new(Mutex::new(RefreshState::default())),
                verified: std::sync::Mutex::default(),
            }),
        })
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.inner.config
    }

    /// Verifies `token` (the bare JWT, without `Bearer `) now.
    pub async fn verify(&self, token: &str) -> Result<Arc<Principal>, VerifyError> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// Verifies `token` as of `now`: the clock is a parameter so expiry can be tested
    /// without waiting.
    ///
    /// The principal is shared (`Arc`): a remembered token hands out the same one again.
    pub async fn verify_at(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Arc<Principal>, VerifyError> {
        if let Some(principal) = self.remembered(token.as_bytes(), now) {
            return Ok(principal);
        }
        self.verify_and_remember(token, now).await
    }

    /// Verifies the bearer token of an `Authorization` header value, as it arrived, now;
    /// `Ok(None)` when the value holds no bearer token (see [`crate::bearer_token`]), which
    /// RFC 6750 §3.1 answers without an error code.
    ///
    /// A token verified before is found by its bytes before they are checked as text: they
    /// passed those checks when it was first verified, and a token is ~800 bytes, looked at
    /// on every request.
    pub async fn verify_authorization(
        &self,
        authorization: &[u8],
    ) -> Result<Option<Arc<Principal>>, VerifyError> {
        let now = SystemTime::now();
        if let Some(principal) =
            crate::bearer_bytes(authorization).and_then(|token| self.remembered(token, now))
        {
            return Ok(Some(principal));
        }
        let Some(token) = std::str::from_utf8(authorization)
            .ok()
            .and_then(crate::bearer_token)
        else {
            return Ok(None);
        };
        self.verify_and_remember(token, now).await.map(Some)
    }

    async fn verify_and_remember(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Arc<Principal>, VerifyError> {
        let principal = Arc::new(self.verify_uncached(token, now).await?);
        self.remember(token, &principal);
        Ok(principal)
    }

    /// A cached verification of `token` that has not expired by `now`.
    fn remembered(&self, token: &[u8], now: SystemTime) -> Option<Arc<Principal>> {
        if self.inner.config.cache_size == 0 {
            return None;
        }
        let mut verified = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let principal = verified.get(token)?;
        // The same expiry rule as a full check: valid until exp + leeway.
        if now < principal.expires_at + self.inner.config.leeway {
            return Some(Arc::clone(principal));
        }
        verified.remove(token);
        None
    }

    /// Only tokens that `bearer_token` would accept may be remembered: a lookup by raw
    /// bytes (`verify_authorization`) relies on a hit having passed its checks. Verified
    /// tokens do: three base64url parts hold no space.
    fn remember(&self, token: &str, principal: &Arc<Principal>) {
        debug_assert!(!token.is_empty() && !token.contains(' '));
        let capacity = self.inner.config.cache_size;
        if capacity == 0 {
            return;
        }
        let mut verified = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= capacity {
            // Any entry will do: under churn the cache only saves work, never decides.
            if let Some(evicted) = verified.keys().next().cloned() {
                verified.remove(&evicted);
            }
        }
        verified.insert(token.as_bytes().into(), Arc::clone(principal));
    }

    async fn verify_uncached(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Principal, VerifyError> {
        let config = &self.inner.config;
        // Everything that can be judged without keys first, so that garbage never causes
        // a fetch.
        let token = token::parse(token, config)?;
        let mut keys = self.keys().await?;
        if pick(&keys, &token)?.is_none()
            && let Some(newer) = self.refresh_for_unknown_kid(keys.generation).await
        {
            keys = newer;
        }
        let key = pick(&keys, &token)?.ok_or(VerifyError::UnknownKey)?;
        let valid = jsonwebtoken::crypto::verify(
            token.signature,
            token.signing_input.as_bytes(),
            &key.key,
            key.alg.to_jsonwebtoken(),
        );
        if !matches!(valid, Ok(true)) {
            return Err(VerifyError::BadSignature);
        }
        // Only now is the payload trusted enough to parse.
        token::claims(token.payload, config, now)
    }

    /// Fetches the keys now, waiting for a fetch already in flight and ignoring
    /// `min_refresh_interval`. For warming the cache at start (and failing readiness when
    /// the issuer is unreachable), not for request paths.
    pub async fn refresh(&self) -> Result<(), VerifyError> {
        let mut state = self.inner.refresh.lock().await;
        self.fetch(&mut state).await.map(drop)
    }

    fn cached(&self) -> Option<Arc<KeySet>> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keys to verify with: the cached ones (starting a background refresh when they
    /// are stale), or, when there are none yet, the result of a fetch.
    async fn keys(&self) -> Result<Arc<KeySet>, VerifyError> {
        if let Some(keys) = self.cached() {
            if keys.fetched_at.elapsed() >= self.inner.config.refresh_interval {
                self.refresh_in_background();
            }
            return Ok(keys);
        }
        let mut state = self.inner.refresh.lock().await;
        if let Some(keys) = self.cached() {
            return Ok(keys);
        }
        let backoff = self
            .inner
            .config
            .min_refresh_interval
            .min(EMPTY_CACHE_RETRY);
        if state.last_attempt.is_some_and(|at| at.elapsed() < backoff) {
            let reason = state.last_error.clone().unwrap_or_default();
            return Err(VerifyError::KeysUnavailable(reason));
        }
        self.fetch(&mut state).await
    }

    /// A token named a `kid` that `seen` lacks. Returns a newer key set if one was fetched
    /// meanwhile by someone else or now by this call, `None` when rate-limited or failed.
    async fn refresh_for_unknown_kid(&self, seen: u64) -> Option<Arc<KeySet>> {
        let mut state = self.inner.refresh.lock().await;
        if let Some(keys) = self.cached()
            && keys.generation != seen
        {
            return Some(keys);
        }
        if self.rate_limited(&state) {
            return None;
        }
        self.fetch(&mut state).await.ok()
    }

    fn rate_limited(&self, state: &RefreshState) -> bool {
        state
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.inner.config.min_refresh_interval)
    }

    /// Starts a refresh without making the request wait, unless one is in flight or one
    /// ran too recently.
    fn refresh_in_background(&self) {
        let Ok(mut state) = Arc::clone(&self.inner.refresh).try_lock_owned() else {
            return;
        };
        if self.rate_limited(&state) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            // Failures are logged by `fetch` and leave the cached keys in place.
            let _ = this.fetch(&mut state).await;
        });
    }

    /// Fetches metadata (unless `jwks_uri` is configured) and keys, and installs them.
    /// Callers hold the refresh lock, which is what makes this single flight.
    async fn fetch(&self, state: &mut RefreshState) -> Result<Arc<KeySet>, VerifyError> {
        let config = &self.inner.config;
        state.last_attempt = Some(Instant::now());
        let fetched = async {
            let uri = match &config.jwks_uri {
                Some(uri) => uri.clone(),
                None => discover_jwks_uri(&self.inner.http, &config.issuer).await?,
            };
            let keys = fetch_jwks(&self.inner.http, &uri).await?;
            Ok::<_, FetchError>((uri, keys))
        }
        .await;
        match fetched {
            Ok((uri, keys)) => {
                state.generation += 1;
                state.last_error = None;
                let set = Arc::new(KeySet {
                    keys,
                    fetched_at: Instant::now(),
                    generation: state.generation,
                });
                *self
                    .inner
                    .keys
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&set));
                tracing::debug!(
                    issuer = %config.issuer,
                    jwks_uri = %uri,
                    keys = set.keys.len(),
                    "fetched token signing keys"
                );
                Ok(set)
            }
            Err(error) => {
                let cached = self.cached().is_some();
                tracing::warn!(
                    issuer = %config.issuer,
                    %error,
                    keeping_cached_keys = cached,
                    "could not fetch token signing keys"
                );
                let reason = error.to_string();
                state.last_error = Some(reason.clone());
                Err(VerifyError::KeysUnavailable(reason))
            }
        }
    }
}

/// The key for `token` in `keys`; `Ok(None)` when its `kid` is unknown (worth a refresh).
fn pick<'k>(
    keys: &'k KeySet,
    token: &UnverifiedToken<'_>,
) -> Result<Option<&'k VerifyKey>, VerifyError> {
    match keys.select(token.kid.as_deref(), token.alg) {
        Selection::Key(key) => Ok(Some(key)),
        Selection::UnknownKid => Ok(None),
        Selection::AlgorithmMismatch => Err(VerifyError::AlgorithmMismatch),
        // Without a kid a refresh cannot help: the set would still hold several keys.
        Selection::Ambiguous => Err(VerifyError::UnknownKey),
    }
}
