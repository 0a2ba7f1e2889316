//! `keel auth`: serve the authorization server, or administer its database; and
//! `keel token`: an access token for curl.

use std::io::BufRead;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use keel_auth::crypto::Secrets;
use keel_auth::{
    AuthAdmin, AuthMethod, AuthServer, GrantType, NewClient, NewUser, SigningAlg, Subject,
};

use crate::config::KeelConfig;
use crate::up::serve_alone;

#[derive(Debug, Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: Option<AuthCommand>,
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Serve the authorization server (the default).
    Serve,
    /// Print a new random key encryption key for `auth.key_encryption_key`.
    Key,
    /// Users who sign in.
    #[command(subcommand)]
    User(UserCommand),
    /// Roles and who holds them.
    #[command(subcommand)]
    Role(RoleCommand),
    /// OAuth clients.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Publish a new signing key now, signing after `auth.key_publish_lead`; the old one
    /// stops signing then and leaves the key set once its tokens have expired.
    Rotate {
        /// RS256, ES256 or EdDSA; every algorithm when left out.
        #[arg(long)]
        alg: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from stdin with --password-stdin, else generated
    /// and printed.
    Add {
        username: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Turn on the TOTP second factor for a user (ending their sessions) and print the
    /// otpauth:// URI for their authenticator app.
    Totp { username: String },
    /// Set a user's password, read from stdin.
    Password { username: String },
    /// Stop a user from signing in; their sessions end and their tokens stop working.
    Disable { username: String },
    /// Let a disabled user sign in again.
    Enable { username: String },
}

#[derive(Debug, Subcommand)]
enum RoleCommand {
    /// Add a role that unlocks `--scopes`, for tokens of `--audience` (or any).
    Add {
        name: String,
        #[arg(long)]
        audience: Option<String>,
        /// Space-separated scopes only this role's holders are granted.
        #[arg(long, default_value = "")]
        scopes: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Grant a role to a user (by username), a group or a client.
    Grant {
        role: String,
        #[arg(long, group = "subject")]
        user: Option<String>,
        #[arg(long, group = "subject")]
        group: Option<String>,
        #[arg(long, group = "subject")]
        client: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ClientCommand {
    /// Add a client and print its secret (shown this once).
    Add {
        client_id: String,
        #[arg(long)]
        name: Option<String>,
        /// A public client (no secret; PKCE required).
        #[arg(long, conflicts_with = "post")]
        public: bool,
        /// Authenticate with client_secret_post instead of client_secret_basic.
        #[arg(long)]
        post: bool,
        /// authorization_code, refresh_token or client_credentials; repeatable.
        #[arg(long = "grant", required = true)]
        grants: Vec<String>,
        /// Space-separated scopes the client may be granted.
        #[arg(long, default_value = "")]
        scopes: String,
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// Where RP-initiated logout may return the browser (none: the redirect URIs);
        /// repeatable.
        #[arg(long = "post-logout-redirect-uri")]
        post_logout_redirect_uris: Vec<String>,
        #[arg(long = "audience")]
        audiences: Vec<String>,
    },
}

pub async fn run(args: AuthArgs, config: KeelConfig) -> anyhow::Result<()> {
    let command = args.command.unwrap_or(AuthCommand::Serve);
    if let AuthCommand::Serve = command {
        return serve_alone(&config.telemetry, "auth", async |shutdown| {
            Ok(AuthServer::build(config.auth, shutdown).await?)
        })
        .await;
    }
    if let AuthCommand::Key = command {
        println!("{}", Secrets::generate_key());
        return Ok(());
    }
    let admin = AuthAdmin::open(config.auth).await?;
    match command {
        AuthCommand::Serve | AuthCommand::Key => Ok(()),
        AuthCommand::User(UserCommand::Add {
            username,
            email,
            name,
            password_stdin,
        }) => {
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the password from stdin")?;
                (line.trim_end_matches(['\r', '\n']).to_owned(), false)
            } else {
                (Secrets::generate_key()[..20].to_owned(), true)
            };
            let user = admin
                .create_user(NewUser {
                    username,
                    password: password.clone(),
                    email,
                    name,
                })
                .await?;
            println!("user {} ({})", user.username, user.user_id);
            if generated {
                println!("password {password}");
            }
            Ok(())
        }
        AuthCommand::User(UserCommand::Password { username }) => {
            let user = existing_user(&admin, &username).await?;
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            let password = line.trim_end_matches(['\r', '\n']).to_owned();
            admin.set_password(&user.user_id, password).await?;
            println!("password of {username} set");
            Ok(())
        }
        AuthCommand::User(UserCommand::Disable { username }) => {
            let user = existing_user(&admin, &username).await?;
            admin.set_user_disabled(&user.user_id, true).await?;
            println!("user {username} disabled");
            Ok(())
        }
        AuthCommand::User(UserCommand::Enable { username }) => {
            let user = existing_user(&admin, &username).await?;
            admin.set_user_disabled(&user.user_id, false).await?;
            println!("user {username} enabled");
            Ok(())
        }
        AuthCommand::User(UserCommand::Totp { username }) => {
            let user = existing_user(&admin, &username).await?;
            println!("{}", admin.enable_totp(&user.user_id).await?);
            Ok(())
        }
        AuthCommand::Role(RoleCommand::Add {
            name,
            audience,
            scopes,
            description,
        }) => {
            admin
                .create_role(&name, audience.as_deref(), &description, &scopes)
                .await?;
            println!("role {name}");
            Ok(())
        }
        AuthCommand::Role(RoleCommand::Grant {
            role,
            user,
            group,
            client,
        }) => {
            let subject = match (user, group, client) {
                (Some(username), None, None) => {
                    Subject::User(existing_user(&admin, &username).await?.user_id)
                }
                (None, Some(group), None) => Subject::Group(group),
                (None, None, Some(client)) => Subject::Client(client),
                _ => bail!("name one of --user, --group or --client"),
            };
            admin.grant_role(&role, &subject).await?;
            println!("role {role} granted");
            Ok(())
        }
        AuthCommand::Keys(KeysCommand::Rotate { alg }) => {
            let alg = alg
                .map(|name| {
                    SigningAlg::from_name(&name).with_context(|| {
                        format!("unknown algorithm {name:?} (RS256, ES256, EdDSA)")
                    })
                })
                .transpose()?;
            for kid in admin.rotate_keys(alg).await? {
                println!("key {kid} published");
            }
            Ok(())
        }
        AuthCommand::Client(ClientCommand::Add {
            client_id,
            name,
            public,
            post,
            grants,
            scopes,
            redirect_uris,
            post_logout_redirect_uris,
            audiences,
        }) => {
            let grant_types = grants
                .iter()
                .map(|grant| {
                    GrantType::from_name(grant).with_context(|| format!("unknown grant {grant:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let auth_method = match (public, post) {
                (true, _) => AuthMethod::None,
                (false, true) => AuthMethod::ClientSecretPost,
                (false, false) => AuthMethod::ClientSecretBasic,
            };
            let (client, secret) = admin
                .create_client(NewClient {
                    name: name.unwrap_or_else(|| client_id.clone()),
                    client_id: Some(client_id),
                    auth_method,
                    redirect_uris,
                    post_logout_redirect_uris,
                    grant_types,
                    scopes,
                    audiences,
                    signing_alg: None,
                    access_token_ttl: None,
                    jwks: None,
                })
                .await?;
            println!("client {}", client.client_id);
            if let Some(secret) = secret {
                println!("secret {secret}");
            }
            Ok(())
        }
    }
}

/// The user named `username`, or an error saying there is none.
async fn existing_user(admin: &AuthAdmin, username: &str) -> anyhow::Result<keel_auth::User> {
    admin
        .find_user(username)
        .await?
        .with_context(|| format!("no user named {username:?}"))
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The client's id.
    #[arg(long)]
    client: String,
    /// The client's secret.
    #[arg(long, env = "KEEL_CLIENT_SECRET", hide_env_values = true)]
    secret: String,
    /// Space-separated scopes to ask for (default: all the client may have).
    #[arg(long)]
    scope: Option<String>,
    /// The authorization server; defaults to the configured issuer or listen address.
    #[arg(long, env = "KEEL_AUTH_URL")]
    url: Option<String>,
}

/// `keel token`: a client-credentials access token, printed alone so that
/// `curl -H "authorization: Bearer $(keel token …)"` works.
pub async fn token(args: TokenArgs, config: KeelConfig) -> anyhow::Result<()> {
    let url = args
        .url
        .or(config.auth.issuer)
        .unwrap_or_else(|| format!("http://{}", config.auth.listen));
    let token = client_token(&url, &args.client, &args.secret, args.scope.as_deref()).await?;
    println!("{token}");
    Ok(())
}

/// A client-credentials access token from the authorization server at `url`.
pub async fn client_token(
    url: &str,
    client: &str,
    secret: &str,
    scope: Option<&str>,
) -> anyhow::Result<String> {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let response = keel_runtime::http_client::builder()
        .build()?
        .post(format!("{}/token", url.trim_end_matches('/')))
        .basic_auth(client, Some(secret))
        .form(&form)
        .send()
        .await
        .with_context(|| format!("cannot reach the authorization server at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .context("the authorization server's answer is not JSON")?;
    match body.get("access_token").and_then(serde_json::Value::as_str) {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!(
            "the authorization server refused ({status}): {} {}",
            body["error"].as_str().unwrap_or("?"),
            body["error_description"].as_str().unwrap_or("")
        ),
    }
}
