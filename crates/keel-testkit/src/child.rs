//! A test that re-runs its own binary as a child process, to crash it for real (SIGKILL,
//! `abort`) at a chosen moment: the child runs the same test function, which sees
//! [`child_role`] and plays its part instead of the parent's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

/// The environment variable that tells a re-run test which part to play.
pub const CHILD_ROLE: &str = "KEEL_TEST_CHILD";

/// Set to an `EnvFilter` directive (`info,keel_sdk=debug`), it makes [`test_log`] print
/// the logs of a test and of its children to standard error.
pub const TEST_LOG: &str = "KEEL_TEST_LOG";

/// The part this process plays, when a test re-ran its binary; `None` in the parent. A
/// child logs as `role` when [`TEST_LOG`] is set.
pub fn child_role() -> Option<String> {
    let role = std::env::var(CHILD_ROLE).ok()?;
    test_log(&role);
    Some(role)
}

/// Prints this process's logs to standard error, as JSON lines naming `name` (and the
/// process id), when [`TEST_LOG`] is set: how a long test that fails now and then is
/// watched (children's standard error is the test's).
pub fn test_log(name: &str) {
    let Ok(level) = std::env::var(TEST_LOG) else {
        return;
    };
    let config = keel_runtime::telemetry::TelemetryConfig {
        log_format: keel_runtime::telemetry::LogFormat::Json,
        log_level: level,
        ..keel_runtime::telemetry::TelemetryConfig::default()
    };
    // Nothing is exported: the guard has nothing to flush, and lives as long as the process.
    if let Ok(guard) = keel_runtime::telemetry::init(&config, name, &std::process::id().to_string())
    {
        std::mem::forget(guard);
    }
}

/// A child process running one test of the current test binary; killed when dropped.
pub struct ChildTest {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildTest {
    /// Runs the test named `test` (as libtest names it: its module path within the test
    /// crate, then its name) in a new process, with [`CHILD_ROLE`] set to `role` and the
    /// extra environment `env`. Its standard output arrives line by line.
    pub fn spawn(test: &str, role: &str, env: &[(&str, &str)]) -> Self {
        let binary = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(binary)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ROLE, role)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-run the test binary");
        let stdout = child.stdout.take().expect("the child's stdout");
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits until the child prints a line containing `needle`; panics after `timeout`
    /// or when the child's output ends first.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the child ended without printing {needle:?}"),
            Err(_) => panic!("the child did not print {needle:?} within {timeout:?}"),
        }
    }

    /// Kills the child with SIGKILL, as a crash, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to end by itself; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the child did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        self.kill();
    }
}
