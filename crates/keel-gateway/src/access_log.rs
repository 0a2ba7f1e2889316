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

/// One request, as logged: one JSON object per line, its fields in this order.
pub struct AccessRecord<'a> {
    /// RFC 3339, UTC, milliseconds ([`timestamp`]).
    pub timestamp: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response body bytes as declared by the upstream (`content-length`), when known.
    pub bytes: Option<u64>,
    /// Written as `duration_ms`, milliseconds with microsecond precision.
    pub duration: Duration,
    pub upstream: Option<&'a str>,
    pub retries: u32,
    pub client: &'a str,
    pub request_id: &'a str,
    pub trace_id: Option<String>,
}

impl AccessRecord<'_> {
    /// The JSON object, written by hand: through serde it cost more than the rest of the
    /// gateway's work on a request.
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut number = itoa::Buffer::new();
        out.extend_from_slice(b"{\"timestamp\":");
        json_string(out, self.timestamp);
        out.extend_from_slice(b",\"route\":");
        json_string(out, self.route);
        out.extend_from_slice(b",\"method\":");
        json_string(out, self.method);
        out.extend_from_slice(b",\"path\":");
        json_string(out, self.path);
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(number.format(self.status).as_bytes());
        out.extend_from_slice(b",\"bytes\":");
        match self.bytes {
            Some(bytes) => out.extend_from_slice(number.format(bytes).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        let micros = self.duration.as_micros();
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(number.format(micros / 1000).as_bytes());
        let fraction = micros % 1000;
        out.extend_from_slice(&[
            b'.',
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
        out.extend_from_slice(b",\"upstream\":");
        match self.upstream {
            Some(upstream) => json_string(out, upstream),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"retries\":");
        out.extend_from_slice(number.format(self.retries).as_bytes());
        out.extend_from_slice(b",\"client\":");
        json_string(out, self.client);
        out.extend_from_slice(b",\"request_id\":");
        json_string(out, self.request_id);
        out.extend_from_slice(b",\"trace_id\":");
        match &self.trace_id {
            Some(trace_id) => json_string(out, trace_id),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }
}

/// A JSON string: copied as it is when nothing in it needs escaping (the usual case),
/// otherwise escaped by serde_json.
fn json_string(out: &mut Vec<u8>, value: &str) {
    if !needs_escape(value.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, value).is_err() {
        // Writing into a Vec does not fail; an empty string keeps the line valid anyway.
        out.extend_from_slice(b"\"\"");
    }
}

/// Whether `bytes` hold a byte JSON escapes (a control, `"` or `\`): one table look-up
/// per byte, and every byte looked at (no early exit), which measured cheapest for the
/// short fields of a line (the call around it costs more than the scan).
fn needs_escape(bytes: &[u8]) -> bool {
    const ESCAPED: [bool; 256] = {
        let mut escaped = [false; 256];
        let mut byte = 0;
        while byte < 0x20 {
            escaped[byte] = true;
            byte += 1;
        }
        escaped[b'"' as usize] = true;
        escaped[b'\\' as usize] = true;
        escaped
    };
    bytes
        .iter()
        .fold(false, |escape, &b| escape | ESCAPED[usize::from(b)])
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
        record.write_json(&mut pending);
        pending.push(b'\n');
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
    fn escapes_are_found_wherever_they_are() {
        let escaped: Vec<u8> = (0..0x20).chain([b'"', b'\\']).collect();
        let safe = "caf\u{e9} \u{7f}\u{2028}/:-.0123~!#[]{}".as_bytes();
        for len in 0..=safe.len() {
            let plain = &safe[..len];
            assert!(!needs_escape(plain), "{plain:?}");
            for at in 0..len {
                for &b in &escaped {
                    let mut bytes = plain.to_vec();
                    bytes[at] = b;
                    assert!(needs_escape(&bytes), "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn lines_are_json_whatever_the_strings_hold() {
        let record = AccessRecord {
            timestamp: "2026-11-26T14:35:01.123Z",
            route: "r\"oute\\",
            method: "GET",
            path: "/caf\u{e9}/\u{1}\n\ttab",
            status: 503,
            bytes: None,
            duration: Duration::from_micros(12_345_678),
            upstream: Some("http://127.0.0.1:1"),
            retries: 2,
            client: "::1",
            // Longer than one 16-byte stride, the quote and backslash past the first.
            request_id: "0123456789abcdef0123\"456\\789",
            trace_id: None,
        };
        let mut line = Vec::new();
        record.write_json(&mut line);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["route"], "r\"oute\\");
        assert_eq!(parsed["path"], "/caf\u{e9}/\u{1}\n\ttab");
        assert_eq!(parsed["status"], 503);
        assert_eq!(parsed["bytes"], serde_json::Value::Null);
        assert_eq!(parsed["duration_ms"].as_f64(), Some(12_345.678));
        assert_eq!(parsed["upstream"], "http://127.0.0.1:1");
        assert_eq!(parsed["retries"], 2);
        assert_eq!(parsed["request_id"], "0123456789abcdef0123\"456\\789");
        assert_eq!(parsed["trace_id"], serde_json::Value::Null);
        let fast = AccessRecord {
            duration: Duration::from_micros(7),
            bytes: Some(13),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            ..record
        };
        line.clear();
        fast.write_json(&mut line);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["duration_ms"].as_f64(), Some(0.007));
        assert_eq!(parsed["bytes"], 13);
        assert_eq!(parsed["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }

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
