//! The access log: one JSON line per request, written by a thread of its own, so the
//! request path never waits on stdout or a disk. Requests append their line to a shared
//! buffer (no channel, no wake-up, no system call); the writer swaps the buffer out every
//! few milliseconds and writes it in one go. When the writer falls behind and the buffer
//! is full, lines are dropped and counted (`keel_gateway_access_log_dropped_total`) rather
//! than slowing requests down.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// RFC 3339, UTC, milliseconds ([`timestamp`]).
    pub timestamp: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes as declared by the upstream (`content-length`), when known.
    pub bytes: Option<u64>,
    pub duration_ms: f64,
    pub upstream: Option<&'a str>,
    pub retries: u32,
    pub client: &'a str,
    pub request_id: &'a str,
    pub trace_id: Option<String>,
}

/// `now` in RFC 3339, UTC, with milliseconds (`2026-11-26T14:35:01.123Z`); the part up to
/// the second is formatted once a second per thread.
pub fn timestamp(now: SystemTime) -> [u8; 24] {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 24])> = const { std::cell::Cell::new((u64::MAX, [0; 24])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (second, mut text) = SECOND.get();
    if second != since.as_secs() {
        let formatted = humantime::format_rfc3339_millis(now).to_string();
        if let Some(whole) = formatted.as_bytes().get(..24) {
            text.copy_from_slice(whole);
        }
        SECOND.set((since.as_secs(), text));
    }
    let millis = since.subsec_millis();
    for (digit, place) in text[20..23].iter_mut().zip([100, 10, 1]) {
        *digit = b'0' + (millis / place % 10) as u8;
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_match_rfc3339_with_millis_across_seconds() {
        let base = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        for offset in [0, 1, 7, 99, 999, 1_000, 1_001, 61_234] {
            let now = base + Duration::from_millis(offset);
            let ours = timestamp(now);
            let expected = humantime::format_rfc3339_millis(now).to_string();
            assert_eq!(std::str::from_utf8(&ours).unwrap(), expected);
        }
    }
}
