//! `keel auth`: serve the authorization server, or help set one up.

use clap::{Args, Subcommand};
use keel_auth::AuthServer;
use keel_auth::crypto::Secrets;
use keel_runtime::Shutdown;

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
}

pub async fn run(args: AuthArgs, config: KeelConfig) -> anyhow::Result<()> {
    match args.command.unwrap_or(AuthCommand::Serve) {
        AuthCommand::Serve => {
            let shutdown = Shutdown::new();
            let server = AuthServer::build(config.auth, &shutdown).await?;
            serve_alone(&config.telemetry, shutdown, server).await
        }
        AuthCommand::Key => {
            println!("{}", Secrets::generate_key());
            Ok(())
        }
    }
}
