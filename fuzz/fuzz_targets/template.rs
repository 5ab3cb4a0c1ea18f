//! The templates (`template`, the runner's and every lookup's): parsing `{{record.F}}`,
//! `{{steps.S.C}}` and `{{key}}`, and rendering against arbitrary JSON records, as text, as a URL component and
//! as a JSON body that keeps the types of single-placeholder leaves.
//!
//! Input: the template on the first line, then a JSON object: `record`, `steps` (step name to
//! captures), `key` and `body` (a JSON body template). An object without `record` is the
//! record itself, and is also parsed as the body template.

#![no_main]

use std::collections::HashMap;

use idem::template::{Context, Escape, JsonTemplate, Part, Placeholder, Template};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let (line, rest) = match data.iter().position(|b| *b == b'\n') {
        Some(end) => (&data[..end], &data[end + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(source) = std::str::from_utf8(line) else { return };
    let context: Map<String, Value> = serde_json::from_slice(rest).unwrap_or_default();
    let (record, steps, key, body) = match context.get("record") {
        Some(record) => (
            record.as_object().cloned().unwrap_or_default(),
            steps_of(context.get("steps")),
            context.get("key").and_then(Value::as_str).unwrap_or("k-1").to_owned(),
            context.get("body").cloned(),
        ),
        None => (context.clone(), HashMap::new(), "k-1".to_owned(), Some(Value::Object(context.clone()))),
    };
    let ctx = Context { record: &record, steps: &steps, key: &key };

    if let Ok(template) = Template::parse(source) {
        check_template(source, &template, &ctx);
    }
    if let Some(body) = body {
        check_body(&body, &ctx);
    }
});

fn steps_of(value: Option<&Value>) -> HashMap<String, Map<String, Value>> {
    let Some(Value::Object(steps)) = value else { return HashMap::new() };
    steps.iter().map(|(name, captures)| (name.clone(), captures.as_object().cloned().unwrap_or_default())).collect()
}

fn check_template(source: &str, template: &Template, ctx: &Context<'_>) {
    assert_eq!(template.source(), source);
    let parts = template.parts();
    for pair in parts.windows(2) {
        assert!(!matches!(pair, [Part::Literal(_), Part::Literal(_)]), "two literals in a row: {parts:?}");
    }
    assert!(parts.iter().all(|p| !matches!(p, Part::Literal(t) if t.is_empty())), "an empty literal: {parts:?}");
    if !source.contains("{{") {
        let whole: Vec<Part> = if source.is_empty() { vec![] } else { vec![Part::Literal(source.to_owned())] };
        assert_eq!(parts, whole.as_slice(), "text without placeholders is one literal");
    }
    // Written back with each placeholder in its canonical form, it parses to the same parts.
    let written: String = parts
        .iter()
        .map(|p| match p {
            Part::Literal(text) => text.clone(),
            Part::Placeholder(p) => p.to_string(),
        })
        .collect();
    let again = Template::parse(&written).expect("a template written back parses");
    assert_eq!(again.parts(), parts, "{source:?} written back as {written:?}");

    // Rendering is the literals and the looked-up values, in order; the first missing value
    // is the error.
    let mut plain = String::new();
    let mut url = String::new();
    let mut error = None;
    for part in parts {
        match part {
            Part::Literal(text) => {
                plain.push_str(text);
                url.push_str(text);
            }
            Part::Placeholder(p) => match ctx.lookup(p) {
                Ok(value) => {
                    let text = text_of(&value);
                    plain.push_str(&text);
                    url.push_str(&percent_encoded(&text));
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            },
        }
    }
    match error {
        None => {
            assert_eq!(template.render(ctx, Escape::None).as_deref(), Ok(plain.as_str()));
            assert_eq!(template.render(ctx, Escape::UrlComponent).as_deref(), Ok(url.as_str()));
        }
        Some(e) => {
            assert_eq!(template.render(ctx, Escape::None), Err(e.clone()));
            assert_eq!(template.render(ctx, Escape::UrlComponent), Err(e));
        }
    }
    if let Some(single) = template.single_placeholder() {
        assert_eq!(parts, [Part::Placeholder(single.clone())].as_slice());
    }
    assert!(template.placeholders().all(|p| !matches!(p, Placeholder::Record(path) if path.is_empty())));
}

/// A body template renders leaf by leaf: a leaf that is one placeholder becomes the value it
/// names (its JSON type kept), a leaf with text and placeholders a string, anything else itself.
fn check_body(body: &Value, ctx: &Context<'_>) {
    let Ok(template) = JsonTemplate::parse(body) else {
        assert!(has_bad_leaf(body), "only a bad string leaf makes a body template fail");
        return;
    };
    let expected = expected_body(body, ctx);
    let rendered = template.render(ctx);
    match expected {
        Some(value) => assert_eq!(rendered.as_ref(), Ok(&value)),
        None => assert!(rendered.is_err(), "a leaf names nothing, yet {rendered:?}"),
    }
    if template.placeholders().is_empty() {
        assert_eq!(rendered.as_ref(), Ok(body), "a body without placeholders is sent as it is");
    }
}

fn has_bad_leaf(value: &Value) -> bool {
    match value {
        Value::String(s) => Template::parse(s).is_err(),
        Value::Array(items) => items.iter().any(has_bad_leaf),
        Value::Object(map) => map.values().any(has_bad_leaf),
        _ => false,
    }
}

fn expected_body(value: &Value, ctx: &Context<'_>) -> Option<Value> {
    Some(match value {
        Value::String(s) => {
            let template = Template::parse(s).ok()?;
            match template.single_placeholder() {
                Some(p) => ctx.lookup(p).ok()?.into_owned(),
                None if template.placeholders().next().is_none() => value.clone(),
                None => Value::String(template.render(ctx, Escape::None).ok()?),
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| expected_body(v, ctx)).collect::<Option<_>>()?),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| Some((k.clone(), expected_body(v, ctx)?))).collect::<Option<_>>()?)
        }
        other => other.clone(),
    })
}

/// A value as template text: strings raw, `null` empty, everything else as compact JSON.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// RFC 3986 unreserved characters kept, every other byte of the UTF-8 as `%XX`.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
