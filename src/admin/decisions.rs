//! `GET /v1/decisions`: the decision counters of the metrics as JSON, for the Idempotency
//! Log page (SPEC §8) and for anyone who would rather not parse Prometheus text.
//!
//! The counters live in the process-wide Prometheus recorder, which offers no way to read
//! one value back; its rendered text is the one view of them, so this reads that text.
//! Only our own counters are read, and the exporter always writes them as
//! `name{label="value",…} number`, with `\\`, `\"` and `\n` escaped in values.

use serde_json::{Map, Value, json};

use crate::metrics::{EXPIRED_KEY_RETRIES, MESSAGES, REQUESTS, RETRY_RECOVERIES};

/// The counters, one array per metric, each entry its labels plus `count`:
/// `{"requests": [{"route", "decision", "count"}], "messages": [{"subscriber", "decision",
/// "count"}], "retry_recoveries": [{"route", "count"}], "expired_key_retries": [{"route", "count"}]}`.
pub fn decisions_json(exposition: &str) -> Value {
    let mut out = json!({ "requests": [], "messages": [], "retry_recoveries": [], "expired_key_retries": [] });
    let field = |name: &str| match name {
        REQUESTS => Some("requests"),
        MESSAGES => Some("messages"),
        RETRY_RECOVERIES => Some("retry_recoveries"),
        EXPIRED_KEY_RETRIES => Some("expired_key_retries"),
        _ => None,
    };
    for sample in exposition.lines().filter_map(sample) {
        if let Some(field) = field(sample.name) {
            let mut entry = sample.labels;
            entry.insert("count".into(), sample.value.into());
            if let Some(list) = out[field].as_array_mut() {
                list.push(Value::Object(entry));
            }
        }
    }
    out
}

/// One sample line of the exposition format.
struct Sample<'a> {
    name: &'a str,
    labels: Map<String, Value>,
    value: u64,
}

/// Reads `name{a="x",b="y"} 3`; `None` for comments, blank lines and anything else.
fn sample(line: &str) -> Option<Sample<'_>> {
    if line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inner) => labels(inner)?,
        None => (Map::new(), &line[name_end..]),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    // Counters only grow from zero; a float is how the format writes them.
    Some(Sample { name, labels, value: value.max(0.0) as u64 })
}

/// Reads `a="x",b="y"}` and returns the labels and what follows the `}`.
fn labels(mut text: &str) -> Option<(Map<String, Value>, &str)> {
    let mut labels = Map::new();
    loop {
        text = text.trim_start_matches(',');
        if let Some(rest) = text.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value.into());
        text = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::decisions_json;
    use serde_json::json;

    #[test]
    fn counters_are_read_with_their_labels() {
        let text = r#"# HELP idem_requests_total Requests by route and idempotency decision
# TYPE idem_requests_total counter
idem_requests_total{route="orders",decision="executed"} 3
idem_requests_total{route="say \"hi\"\\ok",decision="replayed"} 2
idem_retry_recoveries_total{route="orders"} 1
idem_messages_total{subscriber="sync",decision="delivered"} 4
idem_upstream_seconds_bucket{route="orders",le="0.5"} 3
idem_records{status="completed"} 2
"#;
        assert_eq!(
            decisions_json(text),
            json!({
                "requests": [
                    { "route": "orders", "decision": "executed", "count": 3 },
                    { "route": "say \"hi\"\\ok", "decision": "replayed", "count": 2 },
                ],
                "messages": [{ "subscriber": "sync", "decision": "delivered", "count": 4 }],
                "retry_recoveries": [{ "route": "orders", "count": 1 }],
                "expired_key_retries": [],
            })
        );
    }

    #[test]
    fn a_broken_line_is_skipped() {
        let text = "idem_requests_total{route=\"orders\n idem_requests_total{route=\"a\"} x\n";
        assert_eq!(decisions_json(text)["requests"], json!([]));
    }
}
