//! `keel`: run the whole stack or one component, and small admin helpers.

mod auth_cmd;
mod config;
mod demo_cmd;
mod events_cmd;
mod registry_cmd;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::KeelConfig;

// mimalloc rather than the system allocator: a proxied request allocates a few times
// (header maps, the boxed response body) and glibc's malloc and free cost several times
// as much per call (measured with callgrind: see bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keel, a microservices platform: registry, gateway, authorization server and services.
///
/// Configuration comes from defaults, then the TOML file given with --config, then
/// KEEL_<SECTION>__<KEY> environment variables (for example KEEL_REGISTRY__LISTEN).
#[derive(Debug, Parser)]
#[command(name = "keel", version, propagate_version = true)]
struct Cli {
    /// TOML configuration file; every component reads its own section.
    #[arg(long, short, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every component in one process (embedded profile: nothing to install).
    Up(up::UpArgs),
    /// Run the service registry, or inspect one.
    Registry(registry_cmd::RegistryArgs),
    /// Run the API gateway.
    Gateway,
    /// Run the authorization server (OAuth 2.0 / OpenID Connect), or administer it.
    Auth(auth_cmd::AuthArgs),
    /// Print a client-credentials access token (for curl).
    Token(auth_cmd::TokenArgs),
    /// List or replay the event bus's dead letters.
    Events(events_cmd::EventsArgs),
    /// Tour the shop on a running stack: stock it, place three orders, show how each ended.
    Demo(demo_cmd::DemoArgs),
    /// Print the effective configuration (secrets redacted).
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match KeelConfig::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &config.runtime.ca_file
        && let Err(error) = keel_runtime::http_client::trust_ca_file(path)
    {
        eprintln!("error: runtime.ca_file: {error}");
        return ExitCode::from(2);
    }
    let identity = match (&config.runtime.client_cert, &config.runtime.client_key) {
        (Some(cert), Some(key)) => keel_runtime::http_client::present_certificate(cert, key),
        (None, None) => Ok(()),
        _ => Err("client_cert and client_key go together".to_owned()),
    };
    if let Err(error) = identity {
        eprintln!("error: runtime.client_cert, client_key: {error}");
        return ExitCode::from(2);
    }
    let runtime = match config.runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(config, cli.config.as_deref(), &args).await,
            Command::Registry(args) => registry_cmd::run(args, config).await,
            Command::Events(args) => events_cmd::run(args).await,
            Command::Gateway => {
                let source = KeelConfig::gateway_source(cli.config.as_deref());
                up::serve_alone(&config.telemetry, "gateway", async |shutdown| {
                    Ok(keel_gateway::GatewayServer::build_with_source(
                        config.gateway,
                        source,
                        shutdown,
                    )
                    .await?)
                })
                .await
            }
            Command::Auth(args) => auth_cmd::run(args, config).await,
            Command::Token(args) => auth_cmd::token(args, config).await,
            Command::Demo(args) => demo_cmd::run(args, config).await,
            Command::Config => config.print(),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
