//! The access log: one JSON line per request, written by a thread of its own through a
//! buffer, so the request path never waits on stdout or a disk. When the writer falls
//! behind, lines are dropped and counted (`keel_gateway_access_log_dropped_total`) rather
//! than slowing requests down.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// `[gateway.access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// A file to append to; standard output when unset.
    pub path: Option<PathBuf>,
}

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 65_536;

/// One request, as logged.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    pub timestamp: String,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes as declared by the upstream (`content-length`), when known.
    pub bytes: Option<u64>,
    pub duration_ms: f64,
    pub upstream: Option<&'a str>,
    pub retries: u32,
    pub client: String,
    pub request_id: &'a str,
    pub trace_id: Option<String>,
}

#[derive(Clone)]
pub struct AccessLog {
    lines: SyncSender<Vec<u8>>,
}

impl AccessLog {
    pub fn start(config: &AccessLogConfig) -> Result<Option<Self>, String> {
        if !config.enabled {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = match &config.path {
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| {
                        format!("gateway.access_log.path {}: {error}", path.display())
                    })?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (lines, queue) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || write_lines(queue, out))
            .map_err(|error| format!("access log writer: {error}"))?;
        Ok(Some(Self { lines }))
    }

    pub fn log(&self, record: &AccessRecord<'_>) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("keel_gateway_access_log_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Writes lines as they come; flushes once the queue runs empty (a full buffer flushes
/// itself meanwhile), so a burst costs a few large writes.
fn write_lines(queue: Receiver<Vec<u8>>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(256 * 1024, out);
    while let Ok(line) = queue.recv() {
        let _ = out.write_all(&line);
        for line in queue.try_iter() {
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
}

/// RFC 3339 UTC with milliseconds, without a date library.
pub fn timestamp(now: SystemTime) -> String {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(timestamp(at), "2026-11-18T11:06:40.123Z");
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
