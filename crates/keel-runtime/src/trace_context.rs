//! W3C Trace Context (`traceparent`, `tracestate`) on HTTP headers and on messages (the
//! CloudEvents envelope carries both as extension attributes).
//!
//! The W3C format is Keel's convention everywhere, so the propagator is fixed here rather
//! than read from a global that tests would have to install.

use std::borrow::Cow;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context carried by incoming request headers (empty when there is none, or
/// when it is not one `traceparent` of the W3C form). Several `tracestate` fields are one
/// list, joined with commas (RFC 9110 §5.3).
pub fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    let mut traceparents = headers.get_all("traceparent").iter();
    // Two are invalid (W3C Trace Context §3.2): the trace restarts.
    let traceparent = match (traceparents.next(), traceparents.next()) {
        (Some(one), None) => one.to_str().ok(),
        _ => None,
    };
    let mut states = headers
        .get_all("tracestate")
        .iter()
        .filter_map(|value| value.to_str().ok());
    // Borrowed when there is one, as nearly always (this runs for every request served).
    let tracestate = match (states.next(), states.next()) {
        (Some(one), None) => Some(Cow::Borrowed(one)),
        (Some(first), Some(second)) => {
            let rest: Vec<&str> = [first, second].into_iter().chain(states).collect();
            Some(Cow::Owned(rest.join(",")))
        }
        (None, _) => None,
    };
    extract_fields(traceparent, tracestate.as_deref())
}

/// The trace id of a `traceparent` of the W3C form.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    well_formed(traceparent).then(|| &traceparent[3..35])
}

/// Writes the current span's context into outgoing request headers.
pub fn inject_current(headers: &mut HeaderMap) {
    inject(&tracing::Span::current().context(), headers);
}

/// Writes `context` into outgoing request headers.
pub fn inject(context: &opentelemetry::Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
}

/// The current span's `traceparent` and `tracestate`, for a message leaving the process
/// (both `None` outside a sampled or remote-parented span).
pub fn current_fields() -> (Option<String>, Option<String>) {
    let mut fields = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut fields);
    (
        fields.remove("traceparent"),
        fields
            .remove("tracestate")
            .filter(|state| !state.is_empty()),
    )
}

/// The trace context a message carried (empty when it carried none, or garbage).
pub fn extract_fields(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> opentelemetry::Context {
    let fields = Fields {
        traceparent: traceparent.filter(|traceparent| well_formed(traceparent)),
        // None for an empty one (W3C Trace Context §3.3.1.1).
        tracestate: tracestate.filter(|state| !state.is_empty()),
    };
    TraceContextPropagator::new().extract(&fields)
}

/// The two fields a context is read from, borrowed from where they came.
struct Fields<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Fields<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        [
            ("traceparent", self.traceparent),
            ("tracestate", self.tracestate),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|_| key))
        .collect()
    }
}

/// Whether `traceparent` has the W3C form (§3.2.2) the propagator's own parse does not
/// hold it to: lowercase hex fields of exactly 2, 32, 16 and 2 digits (it takes `+1`, one
/// digit or capitals), version `ff` refused, and nothing after the flags in version 00
/// (a later version may append fields after a `-`).
fn well_formed(traceparent: &str) -> bool {
    let bytes = traceparent.as_bytes();
    let hex = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|field| field.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    };
    let dashes = [2, 35, 52].iter().all(|&at| bytes.get(at) == Some(&b'-'));
    let rest_fits = match &bytes[..bytes.len().min(2)] {
        b"00" => bytes.len() == 55,
        b"ff" => false,
        _ => bytes.len() == 55 || bytes.get(55) == Some(&b'-'),
    };
    dashes && hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55) && rest_fits
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is left out (W3C Trace Context §3.3.1.1).
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_traceparent() {
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_static(PARENT));
        let context = extract(&incoming);
        assert_eq!(
            context.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut outgoing = HeaderMap::new();
        inject(&context, &mut outgoing);
        assert_eq!(outgoing["traceparent"], PARENT);
    }

    #[test]
    fn message_fields_round_trip_a_traceparent() {
        let context = extract_fields(Some(PARENT), Some("congo=t61rcWkgMzE"));
        assert_eq!(
            context.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(
            !extract_fields(Some("zz"), None)
                .span()
                .span_context()
                .is_valid()
        );
        assert!(!extract_fields(None, None).span().span_context().is_valid());
    }

    #[test]
    fn only_the_w3c_form_is_taken() {
        let valid = |traceparent: &str| {
            extract_fields(Some(traceparent), None)
                .span()
                .span_context()
                .is_valid()
        };
        assert!(valid(PARENT));
        // A later version may append fields.
        assert!(valid(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"
        ));
        for bad in [
            "00-1-1-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "A0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_trace_id_is_read_only_from_the_w3c_form() {
        assert_eq!(trace_id(PARENT), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn two_traceparents_restart_the_trace_and_tracestates_join() {
        let mut incoming = HeaderMap::new();
        incoming.append("traceparent", HeaderValue::from_static(PARENT));
        incoming.append("traceparent", HeaderValue::from_static(PARENT));
        assert!(!extract(&incoming).span().span_context().is_valid());

        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_static(PARENT));
        incoming.append("tracestate", HeaderValue::from_static("a=1"));
        incoming.append("tracestate", HeaderValue::from_static("b=2"));
        let context = extract(&incoming);
        let mut outgoing = HeaderMap::new();
        inject(&context, &mut outgoing);
        assert_eq!(outgoing["tracestate"], "a=1,b=2");

        // No tracestate in, none out (not an empty header).
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_static(PARENT));
        let mut outgoing = HeaderMap::new();
        inject(&extract(&incoming), &mut outgoing);
        assert!(!outgoing.contains_key("tracestate"));
    }

    #[test]
    fn garbage_traceparent_yields_no_context() {
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_static("zz-not-a-trace"));
        assert!(!extract(&incoming).span().span_context().is_valid());
    }
}
