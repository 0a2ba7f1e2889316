//! AsyncAPI 3.0 documents generated from the Rust event types a service sends and
//! receives: the same types the code publishes and consumes, so the document cannot drift
//! from them.
//!
//! ```ignore
//! let document = AsyncApi::new("orders", "1.0.0")
//!     .sends::<OrderPlaced>()
//!     .receives::<PaymentAuthorized>()
//!     .to_json();
//! service.document("/asyncapi.json", document)
//! ```
//!
//! Each event type is a channel whose address is the type (the RabbitMQ routing key); its
//! message is the CloudEvents envelope (structured mode), with `data` described by the
//! type's JSON Schema.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::Event;

/// An AsyncAPI document under construction.
#[derive(Debug, Clone)]
pub struct AsyncApi {
    title: String,
    version: String,
    /// Event type → (the data's JSON Schema, sent, received).
    types: BTreeMap<&'static str, (Value, bool, bool)>,
}

impl AsyncApi {
    /// A document for service `title` at API version `version`.
    pub fn new(title: &str, version: &str) -> Self {
        Self {
            title: title.to_owned(),
            version: version.to_owned(),
            types: BTreeMap::new(),
        }
    }

    /// The service publishes (or sends) `E`.
    pub fn sends<E: Event>(self) -> Self {
        self.with::<E>(true, false)
    }

    /// The service consumes `E`.
    pub fn receives<E: Event>(self) -> Self {
        self.with::<E>(false, true)
    }

    fn with<E: Event>(mut self, sends: bool, receives: bool) -> Self {
        // AsyncAPI 3.0's default schema format is a superset of Draft 07. Nested types are
        // inlined; a recursive one cannot be, and its `$ref` points at the document's own
        // `components/schemas`, where `to_json` moves its definition.
        let mut settings = schemars::generate::SchemaSettings::draft07();
        settings.inline_subschemas = true;
        settings.meta_schema = None;
        settings.definitions_path = "/components/schemas".into();
        let schema = settings.into_generator().into_root_schema_for::<E>();
        let schema = serde_json::to_value(schema).unwrap_or(Value::Null);
        let entry = self.types.entry(E::TYPE).or_insert((schema, false, false));
        entry.1 |= sends;
        entry.2 |= receives;
        self
    }

    /// The document as JSON.
    pub fn to_json(&self) -> Value {
        let mut channels = serde_json::Map::new();
        let mut operations = serde_json::Map::new();
        let mut messages = serde_json::Map::new();
        let mut schemas = serde_json::Map::new();
        for (event_type, (schema, sends, receives)) in &self.types {
            // Component keys are letters, digits, `.`, `-` and `_`.
            let id: String = event_type
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let mut schema = schema.clone();
            if let Some(Value::Object(definitions)) = schema
                .as_object_mut()
                .and_then(|object| object.remove("components"))
                .and_then(|mut components| components.get_mut("schemas").map(Value::take))
            {
                schemas.extend(definitions);
            }
            let schema = &schema;
            messages.insert(
                id.clone(),
                json!({
                    "name": event_type,
                    "title": schema.get("title").cloned().unwrap_or(Value::Null),
                    "contentType": "application/cloudevents+json",
                    "payload": envelope_schema(event_type, schema),
                }),
            );
            channels.insert(
                id.clone(),
                json!({
                    "address": event_type,
                    "messages": { id.clone(): { "$ref": format!("#/components/messages/{id}") } },
                }),
            );
            for (action, wanted) in [("send", sends), ("receive", receives)] {
                if *wanted {
                    operations.insert(
                        format!("{action}_{id}"),
                        json!({
                            "action": action,
                            "channel": { "$ref": format!("#/channels/{id}") },
                            "messages": [{ "$ref": format!("#/channels/{id}/messages/{id}") }],
                        }),
                    );
                }
            }
        }
        json!({
            "asyncapi": "3.0.0",
            "info": { "title": self.title, "version": self.version },
            "defaultContentType": "application/cloudevents+json",
            "channels": channels,
            "operations": operations,
            "components": { "messages": messages, "schemas": schemas },
        })
    }
}

/// The CloudEvents envelope of `event_type`, its `data` described by `data`.
fn envelope_schema(event_type: &str, data: &Value) -> Value {
    let text = |description: &str| json!({ "type": "string", "description": description });
    json!({
        "type": "object",
        "required": ["specversion", "id", "source", "type", "time", "datacontenttype", "data"],
        "properties": {
            "specversion": { "const": "1.0" },
            "id": text("unique per publication; repeated on redelivery"),
            "source": text("/keel/<publishing service>"),
            "type": { "const": event_type },
            "subject": text("the aggregate the event is about"),
            "time": { "type": "string", "format": "date-time" },
            "datacontenttype": { "const": "application/json" },
            "traceparent": text("W3C Trace Context of the publisher"),
            "tracestate": text("W3C Trace Context vendor state"),
            "correlationid": text("a command's correlation, carried back by its reply"),
            "replyto": text("the event type a command's reply is published as"),
            "data": data.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    /// An order was placed.
    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    struct OrderPlaced {
        order: String,
        total: i64,
        lines: Vec<Line>,
    }

    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    impl Event for OrderPlaced {
        const TYPE: &'static str = "keel.orders.order-placed.v1";
        fn key(&self) -> String {
            self.order.clone()
        }
    }

    #[test]
    fn the_document_describes_each_type_with_its_schema_and_direction() {
        let document = AsyncApi::new("orders", "1.2.0")
            .sends::<OrderPlaced>()
            .receives::<OrderPlaced>()
            .to_json();
        assert_eq!(document["asyncapi"], "3.0.0");
        assert_eq!(document["info"]["title"], "orders");
        let id = "keel.orders.order-placed.v1";
        assert_eq!(
            document["channels"][id]["address"],
            "keel.orders.order-placed.v1"
        );
        assert_eq!(
            document["operations"][format!("send_{id}")]["action"],
            "send"
        );
        assert_eq!(
            document["operations"][format!("receive_{id}")]["action"],
            "receive"
        );
        let payload = &document["components"]["messages"][id]["payload"];
        assert_eq!(
            payload["properties"]["type"]["const"],
            "keel.orders.order-placed.v1"
        );
        let data = &payload["properties"]["data"];
        assert_eq!(data["properties"]["total"]["type"], "integer");
        assert_eq!(data["properties"]["lines"]["type"], "array");
        // Nested types are inlined: nothing refers outside the document.
        assert_eq!(
            data["properties"]["lines"]["items"]["properties"]["sku"]["type"],
            "string"
        );
        assert!(
            !document.to_string().contains("$ref\":\"#/$defs"),
            "{document}"
        );
        assert_eq!(data["description"], "An order was placed.");
    }

    /// A tree of categories: a type that refers to itself cannot be inlined.
    #[derive(Serialize, Deserialize, schemars::JsonSchema)]
    struct Category {
        name: String,
        children: Vec<Category>,
    }

    impl Event for Category {
        const TYPE: &'static str = "keel.catalog.category-changed.v1";
        fn key(&self) -> String {
            self.name.clone()
        }
    }

    #[test]
    fn a_recursive_type_refers_to_a_definition_the_document_holds() {
        let document = AsyncApi::new("catalog", "1.0.0")
            .sends::<Category>()
            .to_json();
        let text = document.to_string();
        let refs: Vec<&str> = text
            .split("\"$ref\":\"#/")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap_or_default())
            .collect();
        assert!(!refs.is_empty(), "{text}");
        for target in refs {
            // Each reference resolves from the document's root.
            let pointer = format!("/{target}");
            assert!(document.pointer(&pointer).is_some(), "{target} in {text}");
        }
    }
}
