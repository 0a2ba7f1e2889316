//! A tiny token issuer for tests (feature `testing`): it serves OpenID/RFC 8414 metadata
//! and a JWK Set on `127.0.0.1:0`, mints tokens signed with fixture keys, rotates keys,
//! counts fetches, and can fail or stop on demand.
//!
//! ```no_run
//! # async fn example() {
//! use keel_jwt::Verifier;
//! use keel_jwt::testing::TestIssuer;
//! use serde_json::json;
//!
//! let issuer = TestIssuer::start().await;
//! let verifier = Verifier::new(issuer.config()).unwrap();
//! let token = issuer.mint(json!({"scope": "orders:read", "roles": ["admin"]}));
//! let principal = verifier.verify(&token).await.unwrap();
//! assert!(principal.has_scope("orders:read"));
//! # }
//! ```
//!
//! The keys are fixtures under `tests/keys/` (see `generate.sh` there); they protect
//! nothing. A helper that cannot do its job panics: that is a broken test set-up.

#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::EncodingKey;
use keel_testkit::tls::{TestCa, TlsFront};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Algorithm, VerifierConfig};

/// The audience [`TestIssuer::mint`] puts in tokens and [`TestIssuer::config`] accepts.
pub const AUDIENCE: &str = "keel-api";

/// A fixture key pair. Its `kid` is its fixture name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestKey {
    /// RSA 2048, RS256, `kid` `rsa-1`.
    Rsa1,
    /// RSA 2048, RS256, `kid` `rsa-2`: the key [`TestIssuer::rotate`] moves to.
    Rsa2,
    /// P-256, ES256, `kid` `ec-1`.
    Ec1,
    /// Ed25519, EdDSA, `kid` `ed-1`.
    Ed1,
}

impl TestKey {
    pub fn kid(self) -> &'static str {
        match self {
            Self::Rsa1 => "rsa-1",
            Self::Rsa2 => "rsa-2",
            Self::Ec1 => "ec-1",
            Self::Ed1 => "ed-1",
        }
    }

    /// The algorithm the published JWK is pinned to.
    pub fn alg(self) -> Algorithm {
        match self {
            Self::Rsa1 | Self::Rsa2 => Algorithm::RS256,
            Self::Ec1 => Algorithm::ES256,
            Self::Ed1 => Algorithm::EdDSA,
        }
    }

    /// The public JWK as published (derived with openssl, not with this crate).
    pub fn jwk(self) -> Value {
        let text = match self {
            Self::Rsa1 => include_str!("../tests/keys/rsa-1.jwk.json"),
            Self::Rsa2 => include_str!("../tests/keys/rsa-2.jwk.json"),
            Self::Ec1 => include_str!("../tests/keys/ec-1.jwk.json"),
            Self::Ed1 => include_str!("../tests/keys/ed-1.jwk.json"),
        };
        serde_json::from_str(text).expect("fixture JWK is JSON")
    }

    /// The public key as SPKI PEM: what an attacker has, e.g. to try it as an HMAC secret.
    pub fn public_pem(self) -> &'static str {
        match self {
            Self::Rsa1 => include_str!("../tests/keys/rsa-1.pub.pem"),
            Self::Rsa2 => include_str!("../tests/keys/rsa-2.pub.pem"),
            Self::Ec1 => include_str!("../tests/keys/ec-1.pub.pem"),
            Self::Ed1 => include_str!("../tests/keys/ed-1.pub.pem"),
        }
    }

    /// The public key as SPKI DER.
    pub fn public_der(self) -> &'static [u8] {
        match self {
            Self::Rsa1 => include_bytes!("../tests/keys/rsa-1.pub.der"),
            Self::Rsa2 => include_bytes!("../tests/keys/rsa-2.pub.der"),
            Self::Ec1 => include_bytes!("../tests/keys/ec-1.pub.der"),
            Self::Ed1 => include_bytes!("../tests/keys/ed-1.pub.der"),
        }
    }

    fn encoding_key(self) -> EncodingKey {
        let key = match self {
            Self::Rsa1 => EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa-1.pem")),
            Self::Rsa2 => EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa-2.pem")),
            Self::Ec1 => EncodingKey::from_ec_pem(include_bytes!("../tests/keys/ec-1.pem")),
            Self::Ed1 => EncodingKey::from_ed_pem(include_bytes!("../tests/keys/ed-1.pem")),
        };
        key.expect("fixture private key loads")
    }
}

/// Header tweaks for [`TestIssuer::mint_with`]; every field defaults to what a correct
/// issuer would send.
#[derive(Debug, Clone, Default)]
pub struct MintOptions {
    /// The signing key; by default the issuer's current one.
    pub key: Option<TestKey>,
    /// The header `alg` (and the algorithm actually used to sign, so it must suit the
    /// key's type); by default the key's.
    pub alg: Option<Algorithm>,
    /// The header `kid`: `Some(None)` leaves it out; by default the key's.
    pub kid: Option<Option<String>>,
    /// The header `typ`: `Some(None)` leaves it out; by default `at+jwt`.
    pub typ: Option<Option<String>>,
}

struct IssuerState {
    published: Vec<TestKey>,
    signing: TestKey,
    openid_configuration: bool,
    advertised_issuer: Option<String>,
    available: bool,
}

#[derive(Clone)]
struct Shared {
    issuer: String,
    state: Arc<Mutex<IssuerState>>,
    jwks_fetches: Arc<AtomicUsize>,
    metadata_fetches: Arc<AtomicUsize>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, IssuerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running test issuer. Publishes `rsa-1`, `ec-1` and `ed-1` and signs with `rsa-1`
/// until told otherwise. Stops when dropped.
pub struct TestIssuer {
    shared: Shared,
    addr: SocketAddr,
    next_jti: AtomicU64,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    /// The TLS front of an issuer started with [`TestIssuer::start_https`].
    front: Option<TlsFront>,
}

impl TestIssuer {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_with_keys(&[TestKey::Rsa1, TestKey::Ec1, TestKey::Ed1]).await
    }

    /// Starts publishing exactly `keys`, signing with the first.
    pub async fn start_with_keys(keys: &[TestKey]) -> Self {
        Self::serve(keys, None).await
    }

    /// Starts behind a TLS front whose certificate `ca` signed: the issuer is
    /// `https://localhost:<port>`, and its metadata and keys are only reached over HTTPS
    /// by a client that trusts `ca`.
    pub async fn start_https(ca: &TestCa) -> Self {
        let mut front = TlsFront::bind(ca).await;
        let mut issuer = Self::serve(
            &[TestKey::Rsa1, TestKey::Ec1, TestKey::Ed1],
            Some(front.url()),
        )
        .await;
        front.relay_to(issuer.addr);
        issuer.front = Some(front);
        issuer
    }

    async fn serve(keys: &[TestKey], issuer: Option<String>) -> Self {
        let signing = *keys.first().expect("at least one key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let shared = Shared {
            issuer: issuer.unwrap_or_else(|| format!("http://{addr}")),
            state: Arc::new(Mutex::new(IssuerState {
                published: keys.to_vec(),
                signing,
                openid_configuration: true,
                advertised_issuer: None,
                available: true,
            })),
            jwks_fetches: Arc::default(),
            metadata_fetches: Arc::default(),
        };
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(openid_configuration),
            )
            .route(
                "/.well-known/oauth-authorization-server",
                get(oauth_metadata),
            )
            .route("/jwks.json", get(jwks))
            .with_state(shared.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            shared,
            addr,
            next_jti: AtomicU64::new(1),
            shutdown: Some(shutdown),
            server: Some(server),
            front: None,
        }
    }

    /// The issuer identifier, `http://127.0.0.1:<port>` (`https://localhost:<port>` for
    /// [`start_https`](Self::start_https); no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// Where it listens for plain HTTP (behind the TLS front, if it has one).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks.json", self.shared.issuer)
    }

    /// A verifier configuration for this issuer and [`AUDIENCE`], otherwise the defaults.
    pub fn config(&self) -> VerifierConfig {
        VerifierConfig::new(self.shared.issuer.clone(), [AUDIENCE])
    }

    /// The claims of a valid token issued now: `iss`, `sub` (`user-1`), `aud`
    /// ([`AUDIENCE`]), `iat`, `exp` (in 5 minutes), `jti` (unique) and `client_id`
    /// (`test-client`). No scope or roles.
    pub fn claims(&self) -> Map<String, Value> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let jti = self.next_jti.fetch_add(1, Ordering::Relaxed);
        let value = json!({
            "iss": self.shared.issuer,
            "sub": "user-1",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 300,
            "jti": format!("token-{jti}"),
            "client_id": "test-client",
        });
        match value {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        }
    }

    /// A token with [`claims`](Self::claims) overlaid by `changes` (an object; a `null`
    /// member removes that claim), signed by the current key.
    pub fn mint(&self, changes: Value) -> String {
        self.mint_with(MintOptions::default(), changes)
    }

    /// Like [`mint`](Self::mint), with header tweaks.
    pub fn mint_with(&self, options: MintOptions, changes: Value) -> String {
        let mut claims = self.claims();
        if let Value::Object(changes) = changes {
            for (name, value) in changes {
                if value.is_null() {
                    claims.remove(&name);
                } else {
                    claims.insert(name, value);
                }
            }
        }
        let key = options.key.unwrap_or_else(|| self.shared.state().signing);
        let alg = options.alg.unwrap_or(key.alg());
        let mut header = jsonwebtoken::Header::new(alg.to_jsonwebtoken());
        header.kid = options.kid.unwrap_or_else(|| Some(key.kid().to_owned()));
        header.typ = options.typ.unwrap_or_else(|| Some("at+jwt".to_owned()));
        jsonwebtoken::encode(&header, &claims, &key.encoding_key())
            .expect("signing with a fixture key and an algorithm of its type")
    }

    /// Rotates the RSA signing key: publishes the other one (`rsa-2` after `rsa-1`, and
    /// back) next to the current keys and signs with it from now on. Returns the new key.
    pub fn rotate(&self) -> TestKey {
        let mut state = self.shared.state();
        let next = if state.signing == TestKey::Rsa2 {
            TestKey::Rsa1
        } else {
            TestKey::Rsa2
        };
        if !state.published.contains(&next) {
            state.published.push(next);
        }
        state.signing = next;
        next
    }

    /// Publishes exactly `keys` from now on (the signing key is unchanged).
    pub fn publish(&self, keys: &[TestKey]) {
        self.shared.state().published = keys.to_vec();
    }

    /// Signs with `key` from now on (publishing is unchanged).
    pub fn sign_with(&self, key: TestKey) {
        self.shared.state().signing = key;
    }

    /// How many times the JWK Set was requested.
    pub fn fetch_count(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How many times either metadata document was requested.
    pub fn metadata_fetch_count(&self) -> usize {
        self.shared.metadata_fetches.load(Ordering::SeqCst)
    }

    /// With `false`, `/.well-known/openid-configuration` answers 404 and only the RFC 8414
    /// document is served, as by a plain OAuth server.
    pub fn serve_openid_configuration(&self, serve: bool) {
        self.shared.state().openid_configuration = serve;
    }

    /// Makes the metadata name another `issuer` than the one it is served for.
    pub fn advertise_issuer(&self, issuer: impl Into<String>) {
        self.shared.state().advertised_issuer = Some(issuer.into());
    }

    /// With `false`, every request is answered 503 (requests are still counted).
    pub fn set_available(&self, available: bool) {
        self.shared.state().available = available;
    }

    /// Stops serving: closes the listener and open connections, so later fetches are
    /// refused.
    pub async fn stop(&mut self) {
        self.front = None;
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn metadata(shared: &Shared) -> Response {
    shared.metadata_fetches.fetch_add(1, Ordering::SeqCst);
    let state = shared.state();
    if !state.available {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let issuer = state
        .advertised_issuer
        .clone()
        .unwrap_or_else(|| shared.issuer.clone());
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}/jwks.json", shared.issuer),
        "token_endpoint": format!("{}/oauth2/token", shared.issuer),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

async fn openid_configuration(State(shared): State<Shared>) -> Response {
    if !shared.state().openid_configuration {
        shared.metadata_fetches.fetch_add(1, Ordering::SeqCst);
        return StatusCode::NOT_FOUND.into_response();
    }
    metadata(&shared)
}

async fn oauth_metadata(State(shared): State<Shared>) -> Response {
    metadata(&shared)
}

async fn jwks(State(shared): State<Shared>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let state = shared.state();
    if !state.available {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let keys: Vec<Value> = state.published.iter().map(|k| k.jwk()).collect();
    Json(json!({ "keys": keys })).into_response()
}
