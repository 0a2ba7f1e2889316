//! W3C Trace Context (`traceparent`, `tracestate`) on HTTP headers and on messages (the
//! CloudEvents envelope carries both as extension attributes).
//!
//! The W3C format is Keel's convention everywhere, so the propagator is fixed here rather
//! than read from a global that tests would have to install.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context carried by incoming request headers (empty when there is none).
pub fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
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
    (fields.remove("traceparent"), fields.remove("tracestate"))
}

/// The trace context a message carried (empty when it carried none, or garbage).
pub fn extract_fields(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> opentelemetry::Context {
    let fields: std::collections::HashMap<String, String> =
        [("traceparent", traceparent), ("tracestate", tracestate)]
            .into_iter()
            .filter_map(|(name, value)| Some((name.to_owned(), value?.to_owned())))
            .collect();
    TraceContextPropagator::new().extract(&fields)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
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
    fn garbage_traceparent_yields_no_context() {
        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_static("zz-not-a-trace"));
        assert!(!extract(&incoming).span().span_context().is_valid());
    }
}
