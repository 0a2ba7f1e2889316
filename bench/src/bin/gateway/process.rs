//! The processes a run starts (upstream, proxies, wrk), each pinned to a core with
//! `taskset` and stopped when its guard is dropped, so no run leaves one behind, even when
//! interrupted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_bench::procfs;

/// How long a process may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a process is checked while waiting for it.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// `taskset -c <cpu> <program>`: taskset sets the affinity and then execs the program, so the
/// child's pid is the program's, and its children and threads inherit the core.
pub fn pinned(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// A started process; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Starts `command` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, command: Command, log: &Path) -> anyhow::Result<Self> {
        Self::start(name, command, log, false)
    }

    /// As [`Running::spawn`], with stdout piped to the harness ([`Running::stdout`]).
    pub fn spawn_capturing(name: &str, command: Command, log: &Path) -> anyhow::Result<Self> {
        Self::start(name, command, log, true)
    }

    fn start(name: &str, mut command: Command, log: &Path, capture: bool) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        command.stdin(Stdio::null()).stderr(file.try_clone()?);
        if capture {
            command.stdout(Stdio::piped());
        } else {
            command.stdout(file);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&mut self) -> Option<&mut ChildStdout> {
        self.child.stdout.as_mut()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the process to exit on its own, for at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The last lines the process wrote, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        if tail.trim().is_empty() {
            format!("(nothing in {})", self.log.display())
        } else {
            format!("{}:\n{tail}", self.log.display())
        }
    }

    /// CPU time of the process and its children (NGINX's worker), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        std::iter::once(self.pid())
            .chain(procfs::children(self.pid()))
            .filter_map(|pid| procfs::sample(pid).ok())
            .map(|sample| sample.cpu_ticks)
            .sum()
    }

    /// Where the process runs and with how many threads, from `/proc/<pid>/status`.
    pub fn placement(&self) -> Placement {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |key: &str| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(key)?.strip_prefix(':')?;
                Some(value.trim().to_owned())
            })
        };
        Placement {
            pid: self.pid(),
            cpus: field("Cpus_allowed_list").unwrap_or_else(|| "?".to_owned()),
            threads: field("Threads").and_then(|n| n.parse().ok()),
        }
    }

    /// SIGTERM (a clean stop: NGINX's master takes its worker with it), then SIGKILL if the
    /// process is still there after [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL_EVERY);
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a process runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Placement {
    pub pid: u32,
    /// `Cpus_allowed_list`, e.g. `0`.
    pub cpus: String,
    pub threads: Option<u32>,
}
