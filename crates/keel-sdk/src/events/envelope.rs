//! Events and their CloudEvents 1.0 envelope (JSON format, structured mode): what every
//! transport carries, byte for byte, and what the outbox stores.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// An event or command the code publishes or consumes.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, JsonSchema)]
/// struct OrderPlaced { order_id: String, total: i64 }
///
/// impl Event for OrderPlaced {
///     const TYPE: &'static str = "keel.orders.order-placed.v1";
///     fn key(&self) -> String { self.order_id.clone() }
/// }
/// ```
pub trait Event:
    Serialize + DeserializeOwned + schemars::JsonSchema + Send + Sync + 'static
{
    /// The CloudEvents `type`, `keel.<service>.<event>.v1` by convention; a new version of
    /// an event's shape gets a new type, so old and new consumers can coexist.
    const TYPE: &'static str;

    /// The aggregate the event is about (an order's id, say): the envelope's `subject`.
    /// The outbox relays one aggregate's events in the order they were committed.
    fn key(&self) -> String;
}

/// The longest `id`, `source` or `type` accepted.
pub const MAX_ATTRIBUTE_BYTES: usize = 200;

/// The largest envelope a consumer accepts; a bigger message is dead-lettered unread.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// A CloudEvents 1.0 envelope. Trace context travels as the `traceparent` and `tracestate`
/// extension attributes (CloudEvents' distributed tracing extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub specversion: String,
    pub id: String,
    /// The publishing service, as a URI reference (`/keel/<service>`).
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    pub datacontenttype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// Extension: a command's correlation (a saga's, say), which its reply carries back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    /// Extension: the event type a command's reply is to be published as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replyto: Option<String>,
    pub data: serde_json::Value,
}

/// Why bytes are not an envelope, or not the expected event.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the message is {0} bytes; at most {MAX_ENVELOPE_BYTES} are accepted")]
    TooLarge(usize),
    #[error("not a CloudEvents JSON envelope: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("CloudEvents specversion {0:?} is not supported (only 1.0)")]
    SpecVersion(String),
    #[error("the envelope's {0} is empty")]
    Empty(&'static str),
    #[error("the envelope's {0} is not printable ASCII of at most {MAX_ATTRIBUTE_BYTES} bytes")]
    Attribute(&'static str),
    #[error("the envelope holds a {found}, not a {expected}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
    #[error("the data of a {event_type} does not match its type: {error}")]
    Data {
        event_type: String,
        #[source]
        error: serde_json::Error,
    },
}

impl Envelope {
    /// Wraps `event` for publication by `service`, with a fresh id (UUIDv7: time-ordered),
    /// the time now and the current span's trace context.
    pub fn new<E: Event>(service: &str, event: &E) -> Result<Self, serde_json::Error> {
        let (traceparent, tracestate) = keel_runtime::trace_context::current_fields();
        Ok(Self {
            specversion: "1.0".to_owned(),
            id: uuid::Uuid::now_v7().to_string(),
            source: format!("/keel/{service}"),
            event_type: E::TYPE.to_owned(),
            subject: Some(event.key()),
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            datacontenttype: "application/json".to_owned(),
            traceparent,
            tracestate,
            correlationid: None,
            replyto: None,
            data: serde_json::to_value(event)?,
        })
    }

    /// Parses and checks an envelope as it arrives (size first: bytes are hostile).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        let envelope: Self = serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)?;
        if envelope.specversion != "1.0" {
            return Err(EnvelopeError::SpecVersion(
                envelope.specversion.chars().take(16).collect(),
            ));
        }
        let optional = [
            ("correlationid", &envelope.correlationid),
            ("replyto", &envelope.replyto),
        ];
        let optional = optional
            .into_iter()
            .filter_map(|(name, value)| Some((name, value.as_ref()?)));
        for (name, value) in [
            ("id", &envelope.id),
            ("source", &envelope.source),
            ("type", &envelope.event_type),
        ]
        .into_iter()
        .chain(optional)
        {
            if value.is_empty() {
                return Err(EnvelopeError::Empty(name));
            }
            // They become AMQP short strings (255 bytes at most), routing keys and
            // primary-key columns: short printable ASCII only.
            if value.len() > MAX_ATTRIBUTE_BYTES || !value.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(EnvelopeError::Attribute(name));
            }
        }
        Ok(envelope)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        // A struct of strings and a JSON value always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The event inside, when the envelope holds an `E`.
    pub fn decode<E: Event>(&self) -> Result<E, EnvelopeError> {
        if self.event_type != E::TYPE {
            return Err(EnvelopeError::WrongType {
                expected: E::TYPE,
                found: self.event_type.chars().take(200).collect(),
            });
        }
        E::deserialize(&self.data).map_err(|error| EnvelopeError::Data {
            event_type: E::TYPE.to_owned(),
            error,
        })
    }

    /// The trace context the envelope carried, as the parent of the consumer's span.
    pub fn trace_context(&self) -> opentelemetry::Context {
        keel_runtime::trace_context::extract_fields(
            self.traceparent.as_deref(),
            self.tracestate.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Placed {
        order: String,
        total: i64,
    }

    impl Event for Placed {
        const TYPE: &'static str = "keel.orders.placed.v1";
        fn key(&self) -> String {
            self.order.clone()
        }
    }

    #[test]
    fn an_event_round_trips_through_its_envelope() {
        let event = Placed {
            order: "o-1".into(),
            total: 1250,
        };
        let envelope = Envelope::new("orders", &event).unwrap();
        assert_eq!(envelope.source, "/keel/orders");
        assert_eq!(envelope.subject.as_deref(), Some("o-1"));
        assert!(envelope.time.ends_with('Z'), "{}", envelope.time);
        let json: serde_json::Value = serde_json::from_slice(&envelope.to_vec()).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "keel.orders.placed.v1");
        assert_eq!(json["datacontenttype"], "application/json");
        assert_eq!(json["data"]["total"], 1250);
        let back = Envelope::from_slice(&envelope.to_vec()).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.decode::<Placed>().unwrap(), event);
    }

    #[test]
    fn hostile_bytes_are_refused_with_a_reason() {
        let good = Envelope::new(
            "orders",
            &Placed {
                order: "o".into(),
                total: 1,
            },
        )
        .unwrap();
        let error = |bytes: &[u8]| Envelope::from_slice(bytes).unwrap_err().to_string();
        assert!(error(b"not json").starts_with("not a CloudEvents"));
        assert!(error(&vec![b' '; MAX_ENVELOPE_BYTES + 1]).contains("at most"));
        let mut old = good.clone();
        old.specversion = "0.3".into();
        assert!(error(&old.to_vec()).contains("0.3"));
        let mut anonymous = good.clone();
        anonymous.id.clear();
        assert!(error(&anonymous.to_vec()).contains("id is empty"));
        let mut long = good.clone();
        long.id = "x".repeat(MAX_ATTRIBUTE_BYTES + 1);
        assert!(error(&long.to_vec()).contains("id is not printable"));
        let mut spaced = good.clone();
        spaced.event_type = "keel.orders placed".into();
        assert!(error(&spaced.to_vec()).contains("type is not printable"));
        let mut other = good.clone();
        other.event_type = "keel.orders.cancelled.v1".into();
        assert!(matches!(
            other.decode::<Placed>(),
            Err(EnvelopeError::WrongType { .. })
        ));
        let mut broken = good;
        broken.data = serde_json::json!({"order": 5});
        assert!(matches!(
            broken.decode::<Placed>(),
            Err(EnvelopeError::Data { .. })
        ));
    }
}
