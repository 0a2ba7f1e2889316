//! The registry under test: `keel registry` started as its own process, so its CPU time and
//! memory are its own and not the harness's.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use keel_bench::procfs::{self, ProcessSample};
use keel_runtime::Shutdown;

/// How long the registry may take to answer `/health/ready` (an etcd backend connects first).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the registry's CPU time and memory are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Which registry to start, and how.
#[derive(Debug, Clone, Args)]
pub struct Launch {
    /// The keel binary to start [default: `keel` beside this harness, i.e. target/release/keel]
    #[arg(long, value_name = "PATH")]
    keel: Option<PathBuf>,
    /// Registry backend, passed as KEEL_REGISTRY__BACKEND [default: as configured, i.e. memory]
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// TOML configuration for the registry (`keel --config FILE registry`)
    #[arg(long, value_name = "FILE")]
    registry_config: Option<PathBuf>,
    /// Extra environment for the registry, repeatable (e.g. KEEL_REGISTRY__ETCD__PREFIX=/bench/1)
    #[arg(long = "registry-env", value_name = "KEY=VALUE", value_parser = key_value)]
    registry_env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    Memory,
    Etcd,
}

impl BackendArg {
    fn as_str(self) -> &'static str {
        match self {
            BackendArg::Memory => "memory",
            BackendArg::Etcd => "etcd",
        }
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

impl Launch {
    fn keel(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.keel {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("cannot locate this harness's own binary")?
                .with_file_name("keel"),
        };
        if !path.is_file() {
            bail!(
                "no keel binary at {} (build it with `cargo build --release -p keel`, or pass --keel)",
                path.display()
            );
        }
        Ok(path)
    }

    /// `keel [--config FILE] <args>` with the registry's environment; `listen` is set last
    /// so the harness always knows where the registry is.
    fn command(&self, keel: &PathBuf, listen: Option<SocketAddr>, args: &[&str]) -> Command {
        let mut command = Command::new(keel);
        if let Some(config) = &self.registry_config {
            command.arg("--config").arg(config);
        }
        command.args(args);
        // Info-level access logs would cost the registry CPU that the run should not count.
        command.env("KEEL_TELEMETRY__LOG_LEVEL", "warn");
        command.envs(self.registry_env.iter().map(|(k, v)| (k, v)));
        if let Some(backend) = self.backend {
            command.env("KEEL_REGISTRY__BACKEND", backend.as_str());
        }
        if let Some(listen) = listen {
            command.env("KEEL_REGISTRY__LISTEN", listen.to_string());
        }
        command
    }

    /// The backend the registry will run with, from `keel config` under the same file and
    /// environment (which also stops a bad configuration before anything starts).
    fn effective_backend(&self, keel: &PathBuf) -> anyhow::Result<String> {
        let output = self
            .command(keel, None, &["config"])
            .output()
            .with_context(|| format!("cannot run {} config", keel.display()))?;
        if !output.status.success() {
            bail!(
                "keel rejected the registry configuration: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let config = String::from_utf8_lossy(&output.stdout);
        registry_backend(&config).context("`keel config` printed no registry backend")
    }
}

/// `backend = "..."` in the `[registry]` table of `keel config`'s TOML.
fn registry_backend(config: &str) -> Option<String> {
    let mut table = "";
    for line in config.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name;
        } else if table == "registry"
            && let Some((key, value)) = line.split_once('=')
            && key.trim() == "backend"
        {
            return Some(value.trim().trim_matches('"').to_owned());
        }
    }
    None
}

/// A running `keel registry`; killed when dropped, so no run leaves one behind.
pub struct RegistryProcess {
    child: Child,
    addr: SocketAddr,
    pub backend: String,
    pub keel: PathBuf,
    /// For the harness's own calls (readiness, `/metrics`), apart from the load's pool.
    admin: reqwest::Client,
}

impl RegistryProcess {
    /// Starts the registry on a free loopback port and waits until it is ready.
    pub async fn start(launch: &Launch) -> anyhow::Result<Self> {
        let keel = launch.keel()?;
        let backend = launch.effective_backend(&keel)?;
        let addr = free_loopback_port()?;
        let child = launch
            .command(&keel, Some(addr), &["registry"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Warnings and a failed start stay visible; the report goes to stdout.
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {} registry", keel.display()))?;
        let admin = keel_runtime::http_client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut process = Self {
            child,
            addr,
            backend,
            keel,
            admin,
        };
        process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/health/ready", self.base_url());
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("keel registry exited ({status}) before it was ready; see its output above");
            }
            let ready = self.admin.get(&url).send().await;
            if ready.is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("keel registry was not ready within {READY_TIMEOUT:?}")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sample(&self) -> anyhow::Result<ProcessSample> {
        procfs::sample(self.pid()).context("cannot read the registry's /proc entries")
    }

    /// The registry's Prometheus exposition.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.base_url());
        let response = self.admin.get(url).send().await?.error_for_status()?;
        Ok(response.text().await?)
    }

    /// Samples CPU time and memory every second until `stop` fires.
    pub fn spawn_sampler(
        &self,
        stop: Shutdown,
    ) -> tokio::task::JoinHandle<Vec<(Instant, ProcessSample)>> {
        let pid = self.pid();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            while !stop.is_triggered() {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = stop.wait() => break,
                }
                // A failed read means the registry is gone; the run notices that itself.
                match procfs::sample(pid) {
                    Ok(sample) => samples.push((Instant::now(), sample)),
                    Err(_) => break,
                }
            }
            samples
        })
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        // The memory backend has nothing to flush, so a kill is a clean enough stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port the kernel just handed out (and that we released).
fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_read_from_the_registry_table() {
        let config = "[telemetry]\nbackend = \"nope\"\n\n[registry]\nlisten = \"127.0.0.1:8500\"\n\
                      backend = \"etcd\"\n\n[registry.etcd]\nprefix = \"/keel\"\n";
        assert_eq!(registry_backend(config).as_deref(), Some("etcd"));
        assert_eq!(registry_backend("[registry]\nlisten = \"x\"\n"), None);
    }

    #[test]
    fn extra_environment_is_key_value() {
        assert_eq!(
            key_value("KEEL_A__B=x=y"),
            Ok(("KEEL_A__B".to_owned(), "x=y".to_owned()))
        );
        assert!(key_value("=x").is_err());
        assert!(key_value("KEEL_A").is_err());
    }
}
