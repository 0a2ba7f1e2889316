use std::time::Duration;

use keel_auth::config::DatabaseUrl;
use keel_auth::{
    AuthAdmin, AuthConfig, AuthMethod, AuthServer, Clock, GrantType, NewClient, SigningAlg,
};
use keel_runtime::{Secret, Shutdown};
use keel_testkit::{Service, TestDatabase, TestServer, TestSqlite};
use serde_json::Value;

/// Where a test's server keeps its data.
pub enum Store {
    Sqlite(TestSqlite),
    Postgres(TestDatabase),
}

impl Store {
    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(file) => file.url(),
            Self::Postgres(db) => db.url.clone(),
        }
    }
}

pub fn sqlite() -> Store {
    Store::Sqlite(TestSqlite::new("keel-auth"))
}

/// The stores to run a test on: SQLite always, PostgreSQL when it is there.
pub async fn stores() -> Vec<Store> {
    let mut stores = vec![sqlite()];
    if keel_testkit::require(Service::Postgres) {
        stores.push(Store::Postgres(TestDatabase::create().await));
    }
    stores
}

pub const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";

pub fn config(store: &Store) -> AuthConfig {
    AuthConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: DatabaseUrl::new(store.url()),
        key_encryption_key: Some(Secret::new(KEK.to_owned())),
        ..AuthConfig::default()
    }
}

/// A running server and what tests need of it.
pub struct App {
    pub server: TestServer,
    pub admin: AuthAdmin,
    pub http: reqwest::Client,
}

impl App {
    pub fn issuer(&self) -> &str {
        self.admin.issuer()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// A confidential client allowed client_credentials with `scopes`.
    pub async fn service_client(
        &self,
        auth_method: AuthMethod,
        scopes: &str,
        signing_alg: Option<SigningAlg>,
    ) -> (String, String) {
        let (client, secret) = self
            .admin
            .create_client(NewClient {
                client_id: None,
                name: "a service".into(),
                auth_method,
                redirect_uris: vec![],
                post_logout_redirect_uris: Vec::new(),
                grant_types: vec![GrantType::ClientCredentials],
                scopes: scopes.into(),
                audiences: vec!["keel-api".into()],
                signing_alg,
                access_token_ttl: None,
                jwks: None,
            })
            .await
            .unwrap();
        (client.client_id, secret.unwrap())
    }

    /// POSTs a form to the token endpoint, with Basic credentials when given.
    pub async fn token(&self, basic: Option<(&str, &str)>, form: &[(&str, &str)]) -> Token {
        self.token_endpoint("/token", basic, form).await
    }

    /// POSTs a form to `path` (token, introspection, revocation), with Basic credentials
    /// when given.
    pub async fn token_endpoint(
        &self,
        path: &str,
        basic: Option<(&str, &str)>,
        form: &[(&str, &str)],
    ) -> Token {
        let mut request = self.http.post(self.url(path)).form(form);
        if let Some((id, secret)) = basic {
            request = request.basic_auth(id, Some(secret));
        }
        Token::from(request.send().await.unwrap()).await
    }
}

/// A token endpoint's answer.
pub struct Token {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Token {
    async fn from(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
        }
    }

    /// Asserts an RFC 6749 §5.2 error with `code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"], code, "{}", self.body);
        assert_eq!(self.headers["cache-control"], "no-store");
    }
}

pub async fn spawn(store: &Store) -> App {
    spawn_with(store, |_| {}).await
}

pub async fn spawn_with(store: &Store, configure: impl FnOnce(&mut AuthConfig)) -> App {
    let mut config = config(store);
    configure(&mut config);
    let server = AuthServer::build_with_clock(config, &Shutdown::new(), Clock::adjustable())
        .await
        .unwrap();
    let admin = server.admin();
    App {
        server: keel_testkit::spawn(server),
        admin,
        http: keel_runtime::http_client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    }
}

/// A client registration with the usual defaults: no audience (the server's default), the
/// server's algorithm and lifetimes.
pub fn new_client(
    id: &str,
    auth_method: AuthMethod,
    redirect_uris: &[&str],
    grant_types: &[GrantType],
    scopes: &str,
) -> NewClient {
    NewClient {
        client_id: Some(id.into()),
        name: id.into(),
        auth_method,
        redirect_uris: redirect_uris.iter().map(|u| (*u).to_owned()).collect(),
        post_logout_redirect_uris: Vec::new(),
        grant_types: grant_types.to_vec(),
        scopes: scopes.into(),
        audiences: vec![],
        signing_alg: None,
        access_token_ttl: None,
        jwks: None,
    }
}
