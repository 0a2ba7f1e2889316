//! Just enough of Prometheus's text format to read a server's own metrics after a run.

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

/// The sample lines of a text exposition; comments and lines it cannot read are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        (labels, rest) = parse_labels(inner)?;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `key="value",...}` (values may hold `{`, `}` and escapes); returns the labels and
/// the text after the closing brace.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once('=')?;
        let quoted = after_key.strip_prefix('"')?;
        let mut chars = quoted.char_indices();
        let mut value = String::new();
        let closing = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, escaped) => value.push(escaped),
                },
                (at, '"') => break at,
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        text = &quoted[closing + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_route_templates_in_labels_are_read() {
        let text = "# HELP x y\n# TYPE x histogram\n\
            http_server_request_duration_seconds_sum{http_request_method=\"PUT\",http_route=\"/v1/services/{service}/instances/{id}\",http_response_status_code=\"200\"} 1.5\n\
            process_threads 3\n\
            odd{a=\"say \\\"hi\\\"\\n\"} +Inf\n\
            broken{a=\"unterminated} 1\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "http_server_request_duration_seconds_sum");
        assert_eq!(
            samples[0].label("http_route"),
            Some("/v1/services/{service}/instances/{id}")
        );
        assert_eq!(samples[0].label("http_request_method"), Some("PUT"));
        assert_eq!(samples[0].value, 1.5);
        assert_eq!(samples[1].name, "process_threads");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[1].value, 3.0);
        assert_eq!(samples[2].label("a"), Some("say \"hi\"\n"));
        assert!(samples[2].value.is_infinite());
    }
}
