//! Eureka's two wire formats over one document tree.
//!
//! Eureka's JSON follows the XStream/Jettison convention for XML: an attribute is a key
//! `@name`, an element's text beside attributes is the key `$`, and a repeated element is a
//! list (`<port enabled="true">8080</port>` is `"port": {"$": 8080, "@enabled": "true"}`).
//! Responses are built once as a [`Doc`] in that convention and written as either; XML
//! request bodies are read into a `serde_json::Value` in the same convention, so one parser
//! reads both.

use std::borrow::Cow;

use http::HeaderMap;
use http::header::{ACCEPT, CONTENT_TYPE};
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

/// A response document in Eureka's JSON convention, in field order (Eureka's own order).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Doc {
    Text(String),
    Number(u64),
    /// Fields in order; `@name` keys are XML attributes and `$` the element's text.
    Map(Vec<(String, Doc)>),
    /// In XML, the enclosing field's element once per item.
    List(Vec<Doc>),
}

impl Doc {
    pub(super) fn text(text: impl Into<String>) -> Doc {
        Doc::Text(text.into())
    }

    pub(super) fn map(fields: Vec<(&str, Doc)>) -> Doc {
        Doc::Map(
            fields
                .into_iter()
                .map(|(key, doc)| (key.to_owned(), doc))
                .collect(),
        )
    }
}

impl Serialize for Doc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Doc::Text(text) => serializer.serialize_str(text),
            Doc::Number(number) => serializer.serialize_u64(*number),
            Doc::Map(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, doc) in fields {
                    map.serialize_entry(key, doc)?;
                }
                map.end()
            }
            Doc::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

/// The media types Eureka speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Json,
    Xml,
}

// === content negotiation ===

/// The response format for a request's `Accept`, as Eureka's server (Jersey, producing
/// `application/xml` first) chooses it: JSON only when the client prefers it, so a browser,
/// `curl` (`*/*`) or a request without `Accept` gets XML. Spring's and Netflix's clients
/// ask for JSON.
pub(super) fn response_format(headers: &HeaderMap) -> Format {
    let mut json = 0;
    let mut xml = 0;
    for value in headers.get_all(ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for range in value.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|param| param.trim().strip_prefix("q="))
                .find_map(parse_quality)
                .unwrap_or(1000);
            let (is_json, is_xml) = match media.as_str() {
                "*/*" | "application/*" => (true, true),
                "application/json" | "text/json" => (true, false),
                "application/xml" | "text/xml" => (false, true),
                other => (other.ends_with("+json"), other.ends_with("+xml")),
            };
            if is_json {
                json = json.max(quality);
            }
            if is_xml {
                xml = xml.max(quality);
            }
        }
    }
    if json > xml {
        Format::Json
    } else {
        Format::Xml
    }
}

/// A `q` parameter in thousandths (`0.8` is 800); `None` when it is not one.
fn parse_quality(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// The format of a request body: its `Content-Type`, or a look at the body without one.
pub(super) fn body_format(headers: &HeaderMap, body: &[u8]) -> Result<Format, String> {
    let Some(content_type) = headers.get(CONTENT_TYPE) else {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        return Ok(if first == Some(&b'<') {
            Format::Xml
        } else {
            Format::Json
        });
    };
    let essence = content_type
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/json" => Ok(Format::Json),
        "application/xml" | "text/xml" => Ok(Format::Xml),
        other if other.ends_with("+json") => Ok(Format::Json),
        other if other.ends_with("+xml") => Ok(Format::Xml),
        other => Err(format!(
            "content type {other:?} is neither application/json nor application/xml"
        )),
    }
}

// === XML output ===

/// `doc` as the XML element `root`.
pub(super) fn to_xml(root: &str, doc: &Doc) -> String {
    let mut out = String::with_capacity(1024);
    write_element(&mut out, root, doc);
    out
}

fn write_element(out: &mut String, name: &str, doc: &Doc) {
    let name = element_name(name);
    match doc {
        Doc::List(items) => {
            for item in items {
                write_element(out, &name, item);
            }
        }
        Doc::Text(_) | Doc::Number(_) => {
            out.push('<');
            out.push_str(&name);
            out.push('>');
            write_scalar(out, doc);
            close(out, &name);
        }
        Doc::Map(fields) => {
            out.push('<');
            out.push_str(&name);
            let mut text = None;
            let mut children = Vec::new();
            for (key, value) in fields {
                if let Some(attribute) = key.strip_prefix('@') {
                    out.push(' ');
                    out.push_str(&element_name(attribute));
                    out.push_str("=\"");
                    write_scalar(out, value);
                    out.push('"');
                } else if key == "$" {
                    text = Some(value);
                } else {
                    children.push((key, value));
                }
            }
            if text.is_none() && children.is_empty() {
                out.push_str("/>");
                return;
            }
            out.push('>');
            if let Some(text) = text {
                write_scalar(out, text);
            }
            for (key, value) in children {
                write_element(out, key, value);
            }
            close(out, &name);
        }
    }
}

fn close(out: &mut String, name: &str) {
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// Text and attribute values, escaped; nested values have no place there and are dropped.
fn write_scalar(out: &mut String, doc: &Doc) {
    match doc {
        Doc::Text(text) => {
            // Characters XML 1.0 cannot carry at all would make the whole document
            // unreadable for every client; one hostile registration must not do that.
            let legal: Cow<'_, str> = if text.chars().all(is_xml_char) {
                Cow::Borrowed(text)
            } else {
                Cow::Owned(
                    text.chars()
                        .map(|c| if is_xml_char(c) { c } else { '\u{FFFD}' })
                        .collect(),
                )
            };
            out.push_str(&escape(legal));
        }
        Doc::Number(number) => out.push_str(&number.to_string()),
        Doc::Map(_) | Doc::List(_) => {}
    }
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Names come from Keel's metadata keys (letters, digits, `-`, `_`, `.`, first a letter or
/// digit); XML names may not start with a digit, so such a key gets a leading `_`.
fn element_name(key: &str) -> Cow<'_, str> {
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        return Cow::Borrowed(key);
    }
    let cleaned: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    Cow::Owned(format!("_{cleaned}"))
}

// === XML input ===

/// Deepest element nesting accepted; Eureka's documents are four levels deep.
const MAX_DEPTH: usize = 32;

struct Frame {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<(String, Value)>,
    text: String,
}

/// Reads an XML document into a JSON value in Eureka's convention, root element included
/// (`<instance>…</instance>` is `{"instance": {…}}`). No DTD is accepted, so no entity can be
/// defined, let alone expanded; the error says what was wrong and where.
pub(super) fn parse_xml(text: &str) -> Result<Value, String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Value> = None;
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|error| format!("invalid XML at byte {position}: {error}"))?;
        match event {
            Event::Start(start) => open(&mut stack, &root, &start)?,
            Event::Empty(start) => {
                open(&mut stack, &root, &start)?;
                finish(&mut stack, &mut root);
            }
            Event::End(_) => finish(&mut stack, &mut root),
            Event::Text(content) => push_text(&mut stack, &content.xml10_content())?,
            Event::CData(content) => push_text(&mut stack, &content.xml10_content())?,
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => resolve_predefined_entity(&reference)
                        .ok_or_else(|| format!("unknown XML entity &{};", &*reference))?
                        .to_owned(),
                    Err(error) => return Err(format!("invalid character reference: {error}")),
                };
                push_text(&mut stack, &resolved)?;
            }
            Event::DocType(_) => return Err("XML documents with a DOCTYPE are not accepted".into()),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err("the XML document ends inside an element".into());
    }
    root.ok_or_else(|| "the XML document is empty".into())
}

fn open(
    stack: &mut Vec<Frame>,
    root: &Option<Value>,
    start: &BytesStart<'_>,
) -> Result<(), String> {
    if stack.is_empty() && root.is_some() {
        return Err("the XML document has more than one root element".into());
    }
    if stack.len() >= MAX_DEPTH {
        return Err(format!("XML elements nest deeper than {MAX_DEPTH} levels"));
    }
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|error| format!("invalid XML attribute: {error}"))?;
        let key = attribute.key.local_name().as_ref().to_owned();
        if attribute.key.as_ref() == "xmlns" || attribute.key.as_ref().starts_with("xmlns:") {
            continue;
        }
        let value = attribute
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|error| format!("invalid value of XML attribute {key:?}: {error}"))?;
        attributes.push((key, value.into_owned()));
    }
    stack.push(Frame {
        name: start.local_name().as_ref().to_owned(),
        attributes,
        children: Vec::new(),
        text: String::new(),
    });
    Ok(())
}

fn push_text(stack: &mut [Frame], text: &str) -> Result<(), String> {
    match stack.last_mut() {
        Some(frame) => {
            frame.text.push_str(text);
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err("the XML document has text outside its root element".into()),
    }
}

/// Closes the innermost element and hands its value to its parent (or makes it the root).
fn finish(stack: &mut Vec<Frame>, root: &mut Option<Value>) {
    let Some(frame) = stack.pop() else { return };
    let text = frame.text.trim();
    let value = if frame.attributes.is_empty() && frame.children.is_empty() {
        Value::String(text.to_owned())
    } else {
        let mut map = Map::new();
        for (key, value) in frame.attributes {
            map.insert(format!("@{key}"), Value::String(value));
        }
        if !text.is_empty() {
            map.insert("$".into(), Value::String(text.to_owned()));
        }
        for (key, value) in frame.children {
            match map.get_mut(&key) {
                // A second element of the same name makes a list; later ones join it.
                Some(Value::Array(items)) => items.push(value),
                Some(first) => {
                    let first = first.take();
                    map.insert(key, Value::Array(vec![first, value]));
                }
                None => {
                    map.insert(key, value);
                }
            }
        }
        Value::Object(map)
    };
    match stack.last_mut() {
        Some(parent) => parent.children.push((frame.name, value)),
        None => {
            let mut document = Map::new();
            document.insert(frame.name, value);
            *root = Some(Value::Object(document));
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use serde_json::json;

    use super::*;

    fn accept(value: &str) -> Format {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_str(value).expect("header"));
        response_format(&headers)
    }

    #[test]
    fn json_only_when_preferred_as_jersey_does() {
        assert_eq!(response_format(&HeaderMap::new()), Format::Xml);
        assert_eq!(accept("*/*"), Format::Xml);
        assert_eq!(accept("application/json"), Format::Json);
        assert_eq!(accept("application/json, application/*+json"), Format::Json);
        assert_eq!(accept("application/xml"), Format::Xml);
        assert_eq!(
            accept("application/xml;q=0.5, application/json"),
            Format::Json
        );
        assert_eq!(accept("application/json;q=0.1, */*"), Format::Xml);
        assert_eq!(
            accept("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            Format::Xml
        );
        assert_eq!(accept("application/json;q=nonsense"), Format::Json);
    }

    #[test]
    fn body_format_follows_the_content_type_or_the_body() {
        let mut headers = HeaderMap::new();
        assert_eq!(body_format(&headers, b" <instance/>"), Ok(Format::Xml));
        assert_eq!(body_format(&headers, b"{}"), Ok(Format::Json));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/xml; charset=utf-8"),
        );
        assert_eq!(body_format(&headers, b"{}"), Ok(Format::Xml));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(body_format(&headers, b"{}").is_err());
    }

    #[test]
    fn documents_write_as_eureka_json_and_xml() {
        let doc = Doc::map(vec![
            ("hostName", Doc::text("a<b")),
            (
                "port",
                Doc::map(vec![
                    ("$", Doc::Number(8080)),
                    ("@enabled", Doc::text("true")),
                ]),
            ),
            (
                "metadata",
                Doc::map(vec![(
                    "@class",
                    Doc::text("java.util.Collections$EmptyMap"),
                )]),
            ),
            ("tag", Doc::List(vec![Doc::text("x"), Doc::text("y")])),
            ("9lives", Doc::text("\u{1}cat")),
        ]);
        let json = serde_json::to_value(&doc).expect("json");
        assert_eq!(
            json,
            json!({"hostName": "a<b", "port": {"$": 8080, "@enabled": "true"},
                   "metadata": {"@class": "java.util.Collections$EmptyMap"},
                   "tag": ["x", "y"], "9lives": "\u{1}cat"})
        );
        assert_eq!(
            to_xml("instance", &doc),
            "<instance><hostName>a&lt;b</hostName><port enabled=\"true\">8080</port>\
             <metadata class=\"java.util.Collections$EmptyMap\"/><tag>x</tag><tag>y</tag>\
             <_9lives>\u{FFFD}cat</_9lives></instance>"
        );
    }

    #[test]
    fn xml_reads_in_the_json_convention() {
        let value = parse_xml(
            r#"<?xml version="1.0"?>
            <instance>
              <hostName>web&amp;1 &#65;</hostName>
              <port enabled="true">8080</port>
              <metadata class="java.util.Collections$EmptyMap"/>
              <empty/>
              <item>1</item><item>2</item><item><![CDATA[<3>]]></item>
            </instance>"#,
        )
        .expect("parse");
        assert_eq!(
            value,
            json!({"instance": {
                "hostName": "web&1 A",
                "port": {"@enabled": "true", "$": "8080"},
                "metadata": {"@class": "java.util.Collections$EmptyMap"},
                "empty": "",
                "item": ["1", "2", "<3>"]
            }})
        );
    }

    #[test]
    fn hostile_or_broken_xml_is_an_error_not_a_panic() {
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        let cases = [
            "",
            "<instance>",
            "<a></b>",
            "<a/><b/>",
            "text",
            "<a>&unknown;</a>",
            "<a>&#0;</a>",
            "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            "<a b=\"1\" b=\"2\"/>",
            deep.as_str(),
        ];
        for case in cases {
            assert!(parse_xml(case).is_err(), "{case:?} should not parse");
        }
    }
}
