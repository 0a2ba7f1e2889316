//! What the load is run against: the upstream directly, NGINX (doing Keel's per-request
//! work, and bare for reference), HAProxy and Keel's gateway (plain, and with everything
//! on), each started from its template in `bench/gateway/` on a free loopback port, pinned
//! to the proxy core.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::ValueEnum;
use keel_jwt::testing::TestIssuer;
use serde::Serialize;
use serde_json::json;

use crate::process::{Placement, Running, pinned};

/// What the upstream answers, and so what every target must answer before it is measured.
pub const BODY: &str = "hello, world\n";
/// How long a target may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the everything-on variant's token stays valid: far past the end of any run.
const TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// The `client_id` of the token, which the rate limit counts by.
const CLIENT_ID: &str = "keel-bench";

const NGINX_CONF: &str = include_str!("../../../gateway/nginx.conf");
const NGINX_BARE_CONF: &str = include_str!("../../../gateway/nginx-bare.conf");
const HAPROXY_CFG: &str = include_str!("../../../gateway/haproxy.cfg");
const KEEL_PLAIN: &str = include_str!("../../../gateway/keel-plain.toml");
const KEEL_FULL: &str = include_str!("../../../gateway/keel-full.toml");

/// The targets, in the order they run and are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// wrk straight to the upstream: the load side's own ceiling, no proxy
    Direct,
    /// NGINX adding the forwarding headers and a request id, as Keel's gateway does; the
    /// targets are ratios to it
    Nginx,
    /// NGINX without those headers, for what they cost it; the targets are shown against it
    /// too, for reference only
    NginxBare,
    /// HAProxy adding the forwarding headers and a request id, as Keel's gateway does
    Haproxy,
    /// Keel's gateway, one static route, logs at warn
    Keel,
    /// Keel's gateway with JWT validation, rate limiting, metrics and an access log
    KeelFull,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Direct,
        Target::Nginx,
        Target::NginxBare,
        Target::Haproxy,
        Target::Keel,
        Target::KeelFull,
    ];

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "upstream, direct (no proxy)",
            Target::Nginx => "NGINX (forwarding headers + request id, as Keel)",
            Target::NginxBare => "NGINX, bare (no forwarding headers, no request id)",
            Target::Haproxy => "HAProxy",
            Target::Keel => "Keel gateway, plain",
            Target::KeelFull => "Keel gateway, JWT + rate limit + metrics + access log",
        }
    }
}

/// The programs a run needs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub keel: PathBuf,
    pub upstream: PathBuf,
    pub wrk: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
}

impl Tools {
    /// Finds every program, or says how to get the missing ones.
    pub fn find(keel: Option<PathBuf>) -> anyhow::Result<Self> {
        let beside_harness = |name: &str| -> anyhow::Result<PathBuf> {
            Ok(std::env::current_exe()
                .context("cannot locate this harness's own binary")?
                .with_file_name(name))
        };
        let keel = match keel {
            Some(path) => path,
            None => beside_harness("keel")?,
        };
        if !keel.is_file() {
            bail!(
                "no keel binary at {} (build it with `cargo build --release -p keel`, or pass --keel)",
                keel.display()
            );
        }
        let upstream = beside_harness("upstream")?;
        if !upstream.is_file() {
            bail!(
                "no upstream binary at {} (build it with `cargo build --release -p keel-bench`)",
                upstream.display()
            );
        }
        let installed = |name: &str| {
            find_program(name).with_context(|| {
                format!(
                    "{name} is not installed: `scripts/bench gateway` installs wrk, nginx and \
                     haproxy from Debian (apt-get install wrk nginx haproxy)"
                )
            })
        };
        find_program("taskset").context("taskset (util-linux) is not installed")?;
        Ok(Self {
            keel,
            upstream,
            wrk: installed("wrk")?,
            nginx: installed("nginx")?,
            haproxy: installed("haproxy")?,
        })
    }

    /// `nginx/1.22.1`, `HAProxy 2.6.12-1+deb12u4`, `wrk 4.1.0`, `keel 0.1.0`, for the report.
    pub fn versions(&self) -> Versions {
        let run = |program: &Path, arg: &str| {
            Command::new(program)
                .arg(arg)
                .output()
                .map(|output| {
                    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&output.stderr));
                    text
                })
                .unwrap_or_default()
        };
        let first_line = |text: String| text.lines().next().unwrap_or("?").trim().to_owned();
        Versions {
            nginx: first_line(run(&self.nginx, "-v"))
                .trim_start_matches("nginx version: ")
                .to_owned(),
            // `HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/`
            haproxy: first_line(run(&self.haproxy, "-v"))
                .trim_start_matches("HAProxy version ")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_owned(),
            // `wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer`
            wrk: first_line(run(&self.wrk, "-v"))
                .split(" [")
                .next()
                .unwrap_or("?")
                .to_owned(),
            keel: first_line(run(&self.keel, "--version")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Versions {
    pub nginx: String,
    pub haproxy: String,
    pub wrk: String,
    pub keel: String,
}

/// Where `name` is on `PATH`, or in the sbin directories a non-root `PATH` leaves out.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// What every target shares in a run.
pub struct Setup<'a> {
    pub tools: &'a Tools,
    /// Configurations and logs go here.
    pub dir: &'a Path,
    pub upstream: SocketAddr,
    pub proxy_cpu: usize,
    pub connections: usize,
}

/// A target ready for load.
pub struct Started {
    /// `None` for the upstream itself, which the run does not own.
    pub process: Option<Running>,
    pub url: String,
    /// Request headers the load must send (a bearer token).
    pub headers: Vec<String>,
    /// The token issuer the target verifies against (everything on); it answers from this
    /// harness's runtime and stops when dropped, with the target.
    pub issuer: Option<TestIssuer>,
    /// Where the target writes its access log (everything on).
    pub access_log: Option<PathBuf>,
}

impl Started {
    fn without_process(url: String) -> Self {
        Self {
            process: None,
            url,
            headers: Vec::new(),
            issuer: None,
            access_log: None,
        }
    }

    fn with_process(process: Running, listen: SocketAddr) -> Self {
        Self {
            process: Some(process),
            ..Self::without_process(format!("http://{listen}/"))
        }
    }

    pub fn placement(&self) -> Option<Placement> {
        self.process.as_ref().map(Running::placement)
    }

    /// `Err` when the target has died since it started.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(process) = &mut self.process
            && let Some(status) = process.exited()?
        {
            bail!("exited during the run ({status}); {}", process.log_tail());
        }
        Ok(())
    }
}

impl Setup<'_> {
    /// Starts `target` and waits until it proxies a request to the upstream.
    pub async fn start(&self, target: Target) -> anyhow::Result<Started> {
        let mut started = match target {
            Target::Direct => Started::without_process(format!("http://{}/", self.upstream)),
            Target::Nginx => self.nginx("nginx", NGINX_CONF)?,
            Target::NginxBare => self.nginx("nginx-bare", NGINX_BARE_CONF)?,
            Target::Haproxy => self.haproxy()?,
            Target::Keel => self.keel("keel-plain", KEEL_PLAIN, &[])?,
            Target::KeelFull => self.keel_full().await?,
        };
        wait_until_proxying(&mut started).await?;
        Ok(started)
    }

    /// NGINX from `template`, written as `{name}.conf`, whose `error_log` is
    /// `{name}-error.log`.
    fn nginx(&self, name: &str, template: &str) -> anyhow::Result<Started> {
        let listen = free_loopback_port()?;
        let conf = self.write_config(&format!("{name}.conf"), template, listen, &[])?;
        let mut command = pinned(self.proxy_cpu, &self.tools.nginx);
        command
            .arg("-p")
            .arg(self.dir)
            // Before it reads its configuration NGINX opens this log, not the system one.
            .arg("-e")
            .arg(self.dir.join(format!("{name}-error.log")))
            .arg("-c")
            .arg(&conf);
        let process = Running::spawn(name, command, &self.dir.join(format!("{name}.log")))?;
        Ok(Started::with_process(process, listen))
    }

    fn haproxy(&self) -> anyhow::Result<Started> {
        let listen = free_loopback_port()?;
        let conf = self.write_config("haproxy.cfg", HAPROXY_CFG, listen, &[])?;
        let mut command = pinned(self.proxy_cpu, &self.tools.haproxy);
        command.arg("-db").arg("-f").arg(&conf);
        let process = Running::spawn("haproxy", command, &self.dir.join("haproxy.log"))?;
        Ok(Started::with_process(process, listen))
    }

    /// `keel --config FILE gateway` on one tokio worker thread (as NGINX's one worker).
    fn keel(
        &self,
        name: &str,
        template: &str,
        values: &[(&str, String)],
    ) -> anyhow::Result<Started> {
        let listen = free_loopback_port()?;
        let config = self.keel_config(name, template, listen, values)?;
        if let Err(rejected) = self.keel_accepts(&config) {
            bail!("keel rejects {}: {rejected}", config.display());
        }
        Ok(Started::with_process(
            self.spawn_keel(name, &config)?,
            listen,
        ))
    }

    /// Keel with everything on: a [`TestIssuer`] started in this process for it to fetch
    /// keys from, and a token of that issuer for the load to send.
    async fn keel_full(&self) -> anyhow::Result<Started> {
        let issuer = TestIssuer::start().await;
        let audience = issuer
            .config()
            .audiences
            .first()
            .cloned()
            .context("the test issuer's configuration has no audience")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?;
        // Overlaid on the issuer's claims (iss, sub, aud, iat, jti), replacing its 5-minute
        // expiry and its client_id.
        let token = issuer.mint(json!({
            "exp": (now + TOKEN_LIFETIME).as_secs(),
            "client_id": CLIENT_ID,
        }));
        let access_log = self.dir.join("keel-full-access.log");
        // Each round starts a new log, so its size is checked against that round's
        // requests.
        match std::fs::remove_file(&access_log) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).context("cannot remove the last round's access log");
            }
            _ => {}
        }
        let values = [
            ("JWT_ISSUER", issuer.issuer().to_owned()),
            ("JWT_AUDIENCE", audience),
            ("ACCESS_LOG", access_log.display().to_string()),
        ];
        let mut started = self.keel("keel-full", KEEL_FULL, &values)?;
        started.headers = vec![format!("Authorization: Bearer {token}")];
        started.issuer = Some(issuer);
        started.access_log = Some(access_log);
        Ok(started)
    }

    /// Writes a keel configuration; the admin listener, where this keel has one, gets a free
    /// port too (its default, 8081, may be taken).
    fn keel_config(
        &self,
        name: &str,
        template: &str,
        listen: SocketAddr,
        values: &[(&str, String)],
    ) -> anyhow::Result<PathBuf> {
        let mut values = values.to_vec();
        if self.keel_has_gateway_key("admin_listen")? {
            values.push(("ADMIN_LISTEN", free_loopback_port()?.to_string()));
        }
        self.write_config(&format!("{name}.toml"), template, listen, &values)
    }

    /// Whether `keel config` (the defaults) shows `key` in its `[gateway]` table.
    fn keel_has_gateway_key(&self, key: &str) -> anyhow::Result<bool> {
        let output = Command::new(&self.tools.keel)
            .arg("config")
            .env_remove("KEEL_CONFIG")
            .output()
            .with_context(|| format!("cannot run {} config", self.tools.keel.display()))?;
        if !output.status.success() {
            bail!(
                "keel config failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(has_key(
            &String::from_utf8_lossy(&output.stdout),
            "gateway",
            key,
        ))
    }

    /// `keel --config FILE config`: `Err` with keel's own message (which names an unknown
    /// key) when the configuration is rejected.
    fn keel_accepts(&self, config: &Path) -> Result<(), String> {
        let output = Command::new(&self.tools.keel)
            .arg("--config")
            .arg(config)
            .arg("config")
            .output()
            .map_err(|error| format!("cannot run keel: {error}"))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(stderr
            .lines()
            .map(|line| line.trim().trim_start_matches("error: "))
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" "))
    }

    fn spawn_keel(&self, name: &str, config: &Path) -> anyhow::Result<Running> {
        let mut command = pinned(self.proxy_cpu, &self.tools.keel);
        command
            .arg("--config")
            .arg(config)
            .arg("gateway")
            // Read by keel when its configuration has no [runtime] worker_threads: one is a
            // single-threaded event loop (tokio's current-thread runtime).
            .env("TOKIO_WORKER_THREADS", "1");
        // Keel's own log (warnings and errors) goes to a file, as the peers' error logs do.
        Running::spawn(name, command, &self.dir.join(format!("{name}.log")))
    }

    fn write_config(
        &self,
        file: &str,
        template: &str,
        listen: SocketAddr,
        values: &[(&str, String)],
    ) -> anyhow::Result<PathBuf> {
        let mut all = vec![
            ("LISTEN", listen.to_string()),
            ("UPSTREAM", self.upstream.to_string()),
            ("DIR", self.dir.display().to_string()),
            ("CONNECTIONS", self.connections.to_string()),
        ];
        all.extend(values.iter().cloned());
        let path = self.dir.join(file);
        std::fs::write(&path, render(template, &all))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// Fills in `{{NAME}}` placeholders; a line with a placeholder that has no value is left out
/// (a key this build of a program does not have).
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    'lines: for line in template.lines() {
        let mut line = line.to_owned();
        while let Some(start) = line.find("{{") {
            let Some(end) = line[start..].find("}}").map(|end| start + end) else {
                break;
            };
            let name = &line[start + 2..end];
            let Some((_, value)) = values.iter().find(|(key, _)| *key == name) else {
                continue 'lines;
            };
            line.replace_range(start..end + 2, value);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Whether `key = …` is in `[table]` of a TOML text.
fn has_key(toml: &str, table: &str, key: &str) -> bool {
    let mut current = "";
    for line in toml.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == table
            && let Some((name, _)) = line.split_once('=')
            && name.trim() == key
        {
            return true;
        }
    }
    false
}

/// Polls `GET /` until the target answers `200` with the upstream's body, so a target that
/// cannot reach the upstream (and would answer fast 502s) is never measured.
async fn wait_until_proxying(started: &mut Started) -> anyhow::Result<()> {
    let client = keel_runtime::http_client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        started.check_alive()?;
        let mut request = client.get(&started.url);
        for header in &started.headers {
            if let Some((name, value)) = header.split_once(':') {
                request = request.header(name.trim(), value.trim());
            }
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                if status.is_success() && body == BODY {
                    return Ok(());
                }
                last = format!("{status}: {:?}", truncate(&body, 200));
            }
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = started
        .process
        .as_ref()
        .map(Running::log_tail)
        .unwrap_or_default();
    bail!(
        "{} did not answer 200 {BODY:?} within {READY_TIMEOUT:?} (last: {last}) {log}",
        started.url
    )
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

/// A loopback address with a port the kernel just handed out (and that we released).
pub fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<(&'static str, String)> {
        vec![
            ("LISTEN", "127.0.0.1:4000".to_owned()),
            ("UPSTREAM", "127.0.0.1:5000".to_owned()),
        ]
    }

    #[test]
    fn placeholders_are_filled_in() {
        let rendered = render(
            "listen = \"{{LISTEN}}\"\nupstreams = [\"http://{{UPSTREAM}}\"] # {{UPSTREAM}}\n",
            &values(),
        );
        assert_eq!(
            rendered,
            "listen = \"127.0.0.1:4000\"\n\
             upstreams = [\"http://127.0.0.1:5000\"] # 127.0.0.1:5000\n"
        );
    }

    #[test]
    fn a_line_whose_placeholder_has_no_value_is_left_out() {
        let rendered = render(
            "listen = \"{{LISTEN}}\"\nadmin_listen = \"{{ADMIN_LISTEN}}\"\nx = 1\n",
            &values(),
        );
        assert_eq!(rendered, "listen = \"127.0.0.1:4000\"\nx = 1\n");
    }

    #[test]
    fn every_template_is_filled_in_completely() {
        let mut all = values();
        for name in [
            "DIR",
            "CONNECTIONS",
            "ADMIN_LISTEN",
            "JWT_ISSUER",
            "JWT_AUDIENCE",
            "ACCESS_LOG",
        ] {
            all.push((name, "x".to_owned()));
        }
        for template in [
            NGINX_CONF,
            NGINX_BARE_CONF,
            HAPROXY_CFG,
            KEEL_PLAIN,
            KEEL_FULL,
        ] {
            let rendered = render(template, &all);
            assert!(!rendered.contains("{{"), "{rendered}");
            assert_eq!(rendered.lines().count(), template.lines().count());
        }
    }

    #[test]
    fn the_peers_add_keels_headers_but_nginx_bare_does_not() {
        for (template, headers) in [
            (
                NGINX_CONF,
                [
                    "proxy_set_header X-Forwarded-For",
                    "proxy_set_header X-Forwarded-Host",
                    "proxy_set_header X-Forwarded-Proto",
                    "proxy_set_header X-Request-ID",
                    "add_header X-Request-ID",
                ],
            ),
            (
                HAPROXY_CFG,
                [
                    "option forwardfor",
                    "set-header X-Forwarded-Host",
                    "set-header X-Forwarded-Proto",
                    "unique-id-header X-Request-ID",
                    "http-after-response set-header X-Request-ID",
                ],
            ),
        ] {
            for header in headers {
                assert!(template.contains(header), "{header}");
            }
        }
        let directives = NGINX_BARE_CONF
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!directives.contains("X-Forwarded"), "{directives}");
        assert!(!directives.contains("X-Request-ID"), "{directives}");
    }

    #[test]
    fn the_keel_templates_are_toml() {
        let all: Vec<(&str, String)> = [
            "LISTEN",
            "UPSTREAM",
            "DIR",
            "CONNECTIONS",
            "ADMIN_LISTEN",
            "JWT_ISSUER",
            "JWT_AUDIENCE",
            "ACCESS_LOG",
        ]
        .into_iter()
        .map(|name| (name, "127.0.0.1:1".to_owned()))
        .collect();
        for template in [KEEL_PLAIN, KEEL_FULL] {
            let rendered = render(template, &all);
            let parsed: toml::Table = toml::from_str(&rendered).expect("valid TOML");
            assert!(parsed["gateway"].get("listen").is_some(), "{rendered}");
            assert!(has_key(&rendered, "gateway", "listen"), "{rendered}");
        }
    }

    #[test]
    fn a_key_is_found_only_in_its_table() {
        let toml = "[telemetry]\nadmin_listen = \"x\"\n\n[gateway]\nlisten = \"y\"\n\
                    admin_listen = \"z\"\n\n[gateway.http]\nfoo = 1\n";
        assert!(has_key(toml, "gateway", "admin_listen"));
        assert!(has_key(toml, "telemetry", "admin_listen"));
        assert!(!has_key(toml, "gateway", "foo"));
        assert!(!has_key(
            "[gateway]\nlisten = \"y\"\n",
            "gateway",
            "admin_listen"
        ));
    }
}
