//! `keel registry`: serve the registry, or list what one holds.

use clap::{Args, Subcommand};
use keel_registry::RegistryServer;
use keel_registry::client::{InstancesQuery, RegistryClient};

use crate::config::KeelConfig;
use crate::up::serve_alone;

#[derive(Debug, Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    command: Option<RegistryCommand>,
}

#[derive(Debug, Subcommand)]
enum RegistryCommand {
    /// Serve the registry (the default).
    Serve,
    /// Print services and their instances as a table.
    Ls {
        /// The registry to ask; defaults to the configured listen address.
        #[arg(long, env = "KEEL_REGISTRY_URL")]
        url: Option<String>,
    },
}

pub async fn run(args: RegistryArgs, config: KeelConfig) -> anyhow::Result<()> {
    match args.command.unwrap_or(RegistryCommand::Serve) {
        RegistryCommand::Serve => serve(config).await,
        RegistryCommand::Ls { url } => {
            let url = url.unwrap_or_else(|| format!("http://{}", config.registry.listen));
            list(&url).await
        }
    }
}

async fn serve(config: KeelConfig) -> anyhow::Result<()> {
    serve_alone(&config.telemetry, "registry", async |shutdown| {
        Ok(RegistryServer::build(config.registry, shutdown).await?)
    })
    .await
}

async fn list(url: &str) -> anyhow::Result<()> {
    let client = RegistryClient::new(url, None)?;
    let services = client.services().await?;
    if services.services.is_empty() {
        println!("no services registered at {url}");
        return Ok(());
    }
    let mut rows = vec![[
        "SERVICE".to_owned(),
        "INSTANCE".to_owned(),
        "ADDRESS".to_owned(),
        "STATUS".to_owned(),
        "ZONE".to_owned(),
        "TAGS".to_owned(),
    ]];
    for service in &services.services {
        let found = client
            .instances(&service.name, &InstancesQuery::default())
            .await?;
        for instance in found.instances {
            rows.push([
                service.name.clone(),
                instance.id.clone(),
                instance.base_url(),
                instance.status.as_str().to_owned(),
                instance.zone.clone().unwrap_or_else(|| "-".into()),
                instance.tags.join(","),
            ]);
        }
    }
    print!("{}", table(&rows));
    Ok(())
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["A".to_owned(), "BB".to_owned()],
            ["ccc".to_owned(), "d".to_owned()],
        ];
        assert_eq!(table(&rows), "A    BB\nccc  d\n");
    }
}
