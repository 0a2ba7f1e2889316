//! The access log: one JSON line per request, written by a thread of its own, so the
//! request path never waits on stdout or a disk. Requests append their line to a shared
//! buffer (no channel, no wake-up, no system call); the writer swaps the buffer out every
//! few milliseconds and writes it in one go. When the writer falls behind and the buffer
//! is full, lines are dropped and counted (`keel_gateway_access_log_dropped_total`) rather
//! than slowing requests down.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// `[gateway.access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    pub enabled: bool,
    /// A file to append to; standard output when unset.
    pub path: Option<PathBuf>,
}

/// Bytes waiting for the writer before new lines are dropped.
const BUFFER_LIMIT: usize = 16 * 1024 * 1024;
/// How often the writer takes what has accumulated.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

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
    pending: Arc<Mutex<Vec<u8>>>,
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
        let pending = Arc::new(Mutex::new(Vec::with_capacity(64 * 1024)));
        let shared = Arc::clone(&pending);
        std::thread::Builder::new()
            .name("keel-access-log".into())
            .spawn(move || write_lines(&shared, out))
            .map_err(|error| format!("access log writer: {error}"))?;
        Ok(Some(Self { pending }))
    }

    pub fn log(&self, record: &AccessRecord<'_>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= BUFFER_LIMIT {
            drop(pending);
            metrics::counter!("keel_gateway_access_log_dropped_total").increment(1);
            return;
        }
        let start = pending.len();
        if serde_json::to_writer(&mut *pending, record).is_ok() {
            pending.push(b'\n');
        } else {
            pending.truncate(start);
        }
    }
}

/// Takes the accumulated lines every [`WRITE_INTERVAL`] and writes them; ends, after a
/// last write, once every [`AccessLog`] handle is gone.
fn write_lines(pending: &Arc<Mutex<Vec<u8>>>, mut out: Box<dyn Write + Send>) {
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        std::thread::sleep(WRITE_INTERVAL);
        let last = Arc::strong_count(pending) == 1;
        std::mem::swap(
            &mut *pending.lock().unwrap_or_else(PoisonError::into_inner),
            &mut spare,
        );
        if !spare.is_empty() {
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
        if last {
            return;
        }
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
