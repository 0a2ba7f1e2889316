//! The load: `wrk` pinned to the load core, and what its `--latency` output says.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::process::{Running, pinned};

/// How one wrk run is made: the same for every target.
#[derive(Debug, Clone)]
pub struct Load {
    pub cpu: usize,
    pub connections: usize,
    /// Extra request headers (`Name: value`).
    pub headers: Vec<String>,
}

/// What a measured run reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WrkResult {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Responses other than 2xx and 3xx (wrk counts them as requests too).
    pub non_2xx: u64,
    pub socket_errors: SocketErrors,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

impl WrkResult {
    /// Everything that went wrong in the run, or `None` when nothing did.
    pub fn errors(&self) -> Option<String> {
        let s = self.socket_errors;
        let mut parts = Vec::new();
        if self.non_2xx > 0 {
            parts.push(format!("{} non-2xx/3xx responses", self.non_2xx));
        }
        if s.total() > 0 {
            parts.push(format!(
                "socket errors: connect {}, read {}, write {}, timeout {}",
                s.connect, s.read, s.write, s.timeout
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

impl Load {
    /// Runs `wrk` against `url` for `duration` (whole seconds, at least 1) and parses its
    /// report. Stopped (by the guard) if the harness is interrupted meanwhile.
    pub async fn run(
        &self,
        wrk: &Path,
        url: &str,
        duration: Duration,
        log: &Path,
    ) -> anyhow::Result<WrkResult> {
        let seconds = duration.as_secs().max(1);
        let mut command = pinned(self.cpu, wrk);
        command
            .arg("-t1")
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{seconds}s"))
            .arg("--latency");
        for header in &self.headers {
            command.arg("-H").arg(header);
        }
        command.arg(url);
        let mut wrk_run = Running::spawn_capturing("wrk", command, log)?;
        let status = wrk_run.wait(duration + Duration::from_secs(30)).await?;
        let mut output = String::new();
        if let Some(stdout) = wrk_run.stdout() {
            stdout
                .read_to_string(&mut output)
                .context("cannot read wrk's output")?;
        }
        if !status.success() {
            bail!("wrk failed ({status}): {}", wrk_run.log_tail());
        }
        parse(&output).with_context(|| format!("cannot make sense of wrk's output:\n{output}"))
    }
}

/// Reads the figures out of `wrk --latency`'s report.
pub fn parse(output: &str) -> anyhow::Result<WrkResult> {
    let mut requests_per_second = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut non_2xx = 0;
    let mut socket_errors = SocketErrors::default();
    let mut in_distribution = false;
    for line in output.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        } else if in_distribution && let Some((percent, value)) = line.split_once('%') {
            match percent.trim() {
                "50" => p50 = Some(duration_ms(value.trim())?),
                "99" => p99 = Some(duration_ms(value.trim())?),
                _ => {}
            }
            continue;
        } else if let Some(value) = line.strip_prefix("Requests/sec:") {
            requests_per_second = Some(value.trim().parse::<f64>()?);
        } else if let Some(value) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = value.trim().parse()?;
        } else if let Some(value) = line.strip_prefix("Socket errors:") {
            socket_errors = parse_socket_errors(value)?;
        } else if let Some((count, _)) = line.split_once(" requests in ") {
            requests = Some(count.trim().parse()?);
        }
        in_distribution = false;
    }
    Ok(WrkResult {
        requests_per_second: requests_per_second.context("no Requests/sec line")?,
        p50_ms: p50.context("no 50% latency (was --latency given?)")?,
        p99_ms: p99.context("no 99% latency (was --latency given?)")?,
        requests: requests.context("no \"N requests in\" line")?,
        non_2xx,
        socket_errors,
    })
}

/// ` connect 0, read 12, write 0, timeout 3`
fn parse_socket_errors(text: &str) -> anyhow::Result<SocketErrors> {
    let mut errors = SocketErrors::default();
    for part in text.split(',') {
        let Some((name, count)) = part.trim().split_once(' ') else {
            bail!("unexpected socket errors {text:?}");
        };
        let count: u64 = count.trim().parse()?;
        match name {
            "connect" => errors.connect = count,
            "read" => errors.read = count,
            "write" => errors.write = count,
            "timeout" => errors.timeout = count,
            _ => bail!("unexpected socket error kind {name:?}"),
        }
    }
    Ok(errors)
}

/// wrk's times: `635.00us`, `1.23ms`, `2.00s`, `1.50m`, `1.00h`.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("not a number in {text:?}"))?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 3s test @ http://127.0.0.1:40123/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   790.41us  212.54us   8.61ms   91.33%
    Req/Sec    81.53k     2.10k   84.65k    80.00%
  Latency Distribution
     50%  755.00us
     75%  810.00us
     90%    0.91ms
     99%    1.52ms
  243301 requests in 3.00s, 35.53MB read
Requests/sec:  81093.37
Transfer/sec:     11.84MB
";

    #[test]
    fn a_clean_report_is_read() {
        let result = parse(REPORT).unwrap();
        assert_eq!(result.requests_per_second, 81093.37);
        assert!((result.p50_ms - 0.755).abs() < 1e-9);
        assert_eq!(result.p99_ms, 1.52);
        assert_eq!(result.requests, 243_301);
        assert_eq!(result.non_2xx, 0);
        assert_eq!(result.socket_errors.total(), 0);
        assert_eq!(result.errors(), None);
    }

    #[test]
    fn errors_are_read_and_reported() {
        let report = REPORT.replace(
            "Requests/sec:",
            "  Socket errors: connect 0, read 12, write 0, timeout 3\n  \
             Non-2xx or 3xx responses: 4512\nRequests/sec:",
        );
        let result = parse(&report).unwrap();
        assert_eq!(
            result.socket_errors,
            SocketErrors {
                connect: 0,
                read: 12,
                write: 0,
                timeout: 3
            }
        );
        assert_eq!(result.non_2xx, 4512);
        assert_eq!(
            result.errors().as_deref(),
            Some(
                "4512 non-2xx/3xx responses; socket errors: connect 0, read 12, write 0, timeout 3"
            )
        );
    }

    #[test]
    fn every_wrk_time_unit_is_understood() {
        assert_eq!(duration_ms("500.00us").unwrap(), 0.5);
        assert_eq!(duration_ms("1.23ms").unwrap(), 1.23);
        assert_eq!(duration_ms("2.00s").unwrap(), 2000.0);
        assert_eq!(duration_ms("1.50m").unwrap(), 90_000.0);
        assert_eq!(duration_ms("1.00h").unwrap(), 3_600_000.0);
        assert!(duration_ms("12").is_err());
        assert!(duration_ms("1.0ns").is_err());
    }

    #[test]
    fn a_report_without_the_distribution_is_refused() {
        let without: String = REPORT
            .lines()
            .filter(|line| !line.contains('%') || line.contains("Stdev"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(parse(&without).is_err());
    }
}
