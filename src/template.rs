//! The templates of SPEC §5: `{{record.FIELD}}`, `{{steps.STEP.CAPTURE}}` and `{{key}}` in URLs,
//! headers and JSON bodies, parsed once when a file is loaded and rendered per record. The
//! runner's steps, the consumer's deliveries and every `verify` lookup use them.
//!
//! Parsing refuses anything it does not understand, so a typo is caught before the first call;
//! rendering only looks values up and never panics, whatever the record holds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Number, Value};

/// What a placeholder names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Placeholder {
    /// `{{record.FIELD}}`: a field of the record; more segments (`record.customer.name`) walk
    /// into nested objects (and into arrays by index).
    Record(Vec<String>),
    /// `{{steps.STEP.CAPTURE}}`: a value an earlier step captured from its answer.
    Step {
        /// The step's name.
        step: String,
        /// The capture's name.
        capture: String,
    },
    /// `{{key}}`: the idempotency key of the step being sent.
    Key,
}

/// A piece of a [`Template`]: text written as is, or a placeholder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Literal(String),
    /// A value looked up at render time.
    Placeholder(Placeholder),
}

/// A string with placeholders, such as `http://api/customers/{{record.customer_id}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// The text as written, for messages and `--dry-run`.
    source: String,
    /// Never two literals in a row, never an empty literal.
    parts: Vec<Part>,
}

/// How [`Template::render`] writes the values it inserts (never the literal text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// Values are inserted as text.
    None,
    /// Values are percent-encoded as one URL component: `a/b c` becomes `a%2Fb%20c`.
    UrlComponent,
}

/// A JSON value whose string leaves are templates: a step's body.
///
/// A leaf that is exactly one placeholder keeps the JSON type of what it names (a number stays
/// a number, an object an object); a leaf that mixes text and placeholders renders to a string.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonTemplate(Node);

/// What the placeholders of one record resolve against.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The record's fields.
    pub record: &'a Map<String, Value>,
    /// Captured values, by step name, then capture name.
    pub steps: &'a HashMap<String, Map<String, Value>>,
    /// The idempotency key of the step being sent.
    pub key: &'a str,
}

/// A placeholder that names nothing for this record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The record has no such field.
    #[error("the record has no field \"{field}\"")]
    MissingField {
        /// The field, dotted as written after `record.`.
        field: String,
    },
    /// The step has captured no such value (yet).
    #[error("step \"{step}\" has no captured \"{capture}\"")]
    MissingCapture {
        /// The step's name.
        step: String,
        /// The capture's name.
        capture: String,
    },
}

/// A problem found while parsing a [`JsonTemplate`]: where it is inside the value (`.customer`,
/// `.items[0]`, or empty for the value itself), and what is wrong.
pub type JsonTemplateProblem = (String, String);

#[derive(Clone, Debug, PartialEq)]
enum Node {
    /// A subtree without placeholders, rendered by cloning.
    Literal(Value),
    String(Template),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

/// Everything but the unreserved characters of RFC 3986, so a value cannot add a path segment,
/// a query or a fragment to the URL it is inserted into.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placeholder::Record(path) => write!(f, "{{{{record.{}}}}}", path.join(".")),
            Placeholder::Step { step, capture } => write!(f, "{{{{steps.{step}.{capture}}}}}"),
            Placeholder::Key => f.write_str("{{key}}"),
        }
    }
}

impl Placeholder {
    /// Parses what is between `{{` and `}}`, surrounding whitespace allowed.
    fn parse(inner: &str) -> Result<Placeholder, String> {
        let segments: Vec<&str> = inner.trim().split('.').collect();
        let valid = |s: &&str| !s.is_empty() && s.trim() == *s && !s.contains(['{', '}']);
        let owned = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match segments.as_slice() {
            ["key"] => return Ok(Placeholder::Key),
            ["record", field @ ..] if !field.is_empty() && field.iter().all(valid) => {
                return Ok(Placeholder::Record(owned(field)));
            }
            ["steps", step, capture] if valid(step) && valid(capture) => {
                return Ok(Placeholder::Step { step: (*step).to_owned(), capture: (*capture).to_owned() });
            }
            _ => {}
        }
        let forms = "{{record.FIELD}}, {{steps.STEP.CAPTURE}} or {{key}}";
        Err(format!("\"{{{{{inner}}}}}\" is not a placeholder; write {forms}"))
    }
}

impl Template {
    /// Parses a template; an unclosed `{{` or anything unknown between `{{` and `}}` is refused
    /// with a message that names it.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close =
                after.find("}}").ok_or_else(|| format!("\"{{{{\" is never closed by \"}}}}\" in {source:?}"))?;
            parts.push(Part::Placeholder(Placeholder::parse(&after[..close])?));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Template { source: source.to_owned(), parts })
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The literal text and placeholders, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The placeholders, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.parts.iter().filter_map(|part| match part {
            Part::Placeholder(p) => Some(p),
            Part::Literal(_) => None,
        })
    }

    /// The literal text before the first placeholder (all of it when there is none).
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        }
    }

    /// The placeholder, when the template is exactly one placeholder and nothing else.
    pub fn single_placeholder(&self) -> Option<&Placeholder> {
        match self.parts.as_slice() {
            [Part::Placeholder(p)] => Some(p),
            _ => None,
        }
    }

    /// Writes the template for one record.
    pub fn render(&self, ctx: &Context<'_>, escape: Escape) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Placeholder(p) => {
                    let value = ctx.lookup(p)?;
                    let text = value_text(&value);
                    match escape {
                        Escape::None => out.push_str(&text),
                        Escape::UrlComponent => out.extend(utf8_percent_encode(&text, URL_COMPONENT)),
                    }
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Context<'_> {
    /// The value a placeholder names for this record.
    pub fn lookup(&self, placeholder: &Placeholder) -> Result<Cow<'_, Value>, RenderError> {
        match placeholder {
            Placeholder::Record(path) => record_field(self.record, path)
                .map(Cow::Borrowed)
                .ok_or_else(|| RenderError::MissingField { field: path.join(".") }),
            Placeholder::Step { step, capture } => self
                .steps
                .get(step)
                .and_then(|captures| captures.get(capture))
                .map(Cow::Borrowed)
                .ok_or_else(|| RenderError::MissingCapture { step: step.clone(), capture: capture.clone() }),
            Placeholder::Key => Ok(Cow::Owned(Value::String(self.key.to_owned()))),
        }
    }
}

/// Walks into nested objects (and arrays, by index); a field whose own name holds the dots
/// (a CSV column `customer.name`) is found when no nested value is.
fn record_field<'v>(record: &'v Map<String, Value>, path: &[String]) -> Option<&'v Value> {
    let (first, rest) = path.split_first()?;
    let nested = record.get(first).and_then(|top| {
        rest.iter().try_fold(top, |value, segment| match value {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
    });
    nested.or_else(|| if rest.is_empty() { None } else { record.get(&path.join(".")) })
}

/// A value as text: strings raw, `null` empty, everything else as compact JSON.
fn value_text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed(""),
        other => Cow::Owned(other.to_string()),
    }
}

impl JsonTemplate {
    /// Parses every string leaf of a JSON value as a template, reporting every bad leaf.
    pub fn parse(value: &Value) -> Result<JsonTemplate, Vec<JsonTemplateProblem>> {
        let mut problems = Vec::new();
        let node = Node::parse(value, String::new(), &mut problems);
        if problems.is_empty() { Ok(JsonTemplate(node)) } else { Err(problems) }
    }

    /// Converts a TOML value (datetimes become strings) and parses it as [`JsonTemplate::parse`]
    /// does; a float JSON cannot hold (`nan`, `inf`) is refused.
    pub fn from_toml(value: &toml::Value) -> Result<JsonTemplate, Vec<JsonTemplateProblem>> {
        let mut problems = Vec::new();
        let json = toml_to_json(value, String::new(), &mut problems);
        let node = Node::parse(&json, String::new(), &mut problems);
        if problems.is_empty() { Ok(JsonTemplate(node)) } else { Err(problems) }
    }

    /// Every placeholder with where it is inside the value (`.customer`, `.items[0]`, or empty
    /// for the value itself).
    pub fn placeholders(&self) -> Vec<(String, &Placeholder)> {
        let mut found = Vec::new();
        self.0.placeholders(String::new(), &mut found);
        found
    }

    /// Builds the JSON value for one record.
    pub fn render(&self, ctx: &Context<'_>) -> Result<Value, RenderError> {
        self.0.render(ctx)
    }
}

impl Node {
    fn parse(value: &Value, at: String, problems: &mut Vec<JsonTemplateProblem>) -> Node {
        match value {
            Value::String(s) => match Template::parse(s) {
                Ok(t) if t.placeholders().next().is_none() => Node::Literal(value.clone()),
                Ok(t) => Node::String(t),
                Err(e) => {
                    problems.push((at, e));
                    Node::Literal(Value::Null)
                }
            },
            Value::Array(items) => {
                let nodes = items.iter().enumerate().map(|(i, v)| Node::parse(v, format!("{at}[{i}]"), problems));
                Node::collapse(Node::Array(nodes.collect()))
            }
            Value::Object(map) => {
                let nodes = map.iter().map(|(k, v)| (k.clone(), Node::parse(v, format!("{at}.{k}"), problems)));
                Node::collapse(Node::Object(nodes.collect()))
            }
            other => Node::Literal(other.clone()),
        }
    }

    /// Turns a container without placeholders into one literal, so rendering it is one clone.
    fn collapse(node: Node) -> Node {
        let literal = |n: &Node| matches!(n, Node::Literal(_));
        match node {
            Node::Array(items) if items.iter().all(literal) => {
                Node::Literal(Value::Array(items.into_iter().filter_map(Node::into_literal).collect()))
            }
            Node::Object(fields) if fields.iter().all(|(_, n)| literal(n)) => Node::Literal(Value::Object(
                fields.into_iter().filter_map(|(k, n)| n.into_literal().map(|v| (k, v))).collect(),
            )),
            other => other,
        }
    }

    fn into_literal(self) -> Option<Value> {
        match self {
            Node::Literal(v) => Some(v),
            _ => None,
        }
    }

    fn placeholders<'t>(&'t self, at: String, found: &mut Vec<(String, &'t Placeholder)>) {
        match self {
            Node::Literal(_) => {}
            Node::String(t) => found.extend(t.placeholders().map(|p| (at.clone(), p))),
            Node::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    item.placeholders(format!("{at}[{i}]"), found);
                }
            }
            Node::Object(fields) => {
                for (k, node) in fields {
                    node.placeholders(format!("{at}.{k}"), found);
                }
            }
        }
    }

    fn render(&self, ctx: &Context<'_>) -> Result<Value, RenderError> {
        Ok(match self {
            Node::Literal(v) => v.clone(),
            Node::String(t) => match t.single_placeholder() {
                Some(p) => ctx.lookup(p)?.into_owned(),
                None => Value::String(t.render(ctx, Escape::None)?),
            },
            Node::Array(items) => Value::Array(items.iter().map(|n| n.render(ctx)).collect::<Result<_, _>>()?),
            Node::Object(fields) => Value::Object(
                fields.iter().map(|(k, n)| Ok((k.clone(), n.render(ctx)?))).collect::<Result<_, RenderError>>()?,
            ),
        })
    }
}

fn toml_to_json(value: &toml::Value, at: String, problems: &mut Vec<JsonTemplateProblem>) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::Number((*i).into()),
        toml::Value::Float(f) => Number::from_f64(*f).map(Value::Number).unwrap_or_else(|| {
            problems.push((at, format!("{f} cannot be written in JSON")));
            Value::Null
        }),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items.iter().enumerate().map(|(i, v)| toml_to_json(v, format!("{at}[{i}]"), problems)).collect(),
        ),
        toml::Value::Table(table) => Value::Object(
            table.iter().map(|(k, v)| (k.clone(), toml_to_json(v, format!("{at}.{k}"), problems))).collect(),
        ),
    }
}

/// A URL template whose scheme and host are fixed text or at least parse once the
/// placeholders are filled in.
pub fn url_template(s: &str) -> Result<Template, String> {
    let template = Template::parse(s)?;
    let prefix = template.literal_prefix().to_ascii_lowercase();
    let Some(authority) = prefix.strip_prefix("http://").or_else(|| prefix.strip_prefix("https://")) else {
        return Err(format!("{s:?} must start with http:// or https://, before any placeholder"));
    };
    if authority.starts_with('/') {
        return Err(format!("{s:?} has no host"));
    }
    // "1" stands for every value: it fits a host, a port and a path segment alike.
    let sample: String = template
        .parts()
        .iter()
        .map(|part| match part {
            Part::Literal(text) => text.as_str(),
            Part::Placeholder(_) => "1",
        })
        .collect();
    match url::Url::parse(&sample) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(template),
        Ok(_) => Err(format!("{s:?} has no host")),
        Err(e) => Err(format!("invalid URL {s:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn record(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test records are objects"),
        }
    }

    fn render(template: &str, record_value: Value, escape: Escape) -> Result<String, RenderError> {
        let record = record(record_value);
        let steps = HashMap::new();
        Template::parse(template).unwrap().render(&Context { record: &record, steps: &steps, key: "k-1" }, escape)
    }

    #[test]
    fn parses_the_three_placeholder_forms() {
        let t = Template::parse("a {{record.customer.name}} b {{ steps.invoice.id }}{{key}}").unwrap();
        let found: Vec<_> = t.placeholders().cloned().collect();
        assert_eq!(
            found,
            vec![
                Placeholder::Record(vec!["customer".into(), "name".into()]),
                Placeholder::Step { step: "invoice".into(), capture: "id".into() },
                Placeholder::Key,
            ]
        );
        assert_eq!(t.literal_prefix(), "a ");
        assert_eq!(t.source(), "a {{record.customer.name}} b {{ steps.invoice.id }}{{key}}");
        assert_eq!(found[1].to_string(), "{{steps.invoice.id}}");
    }

    #[test]
    fn whitespace_inside_the_braces_is_tolerated() {
        let t = Template::parse("{{\trecord.id \n}}").unwrap();
        assert_eq!(t.single_placeholder(), Some(&Placeholder::Record(vec!["id".into()])));
    }

    #[test]
    fn unknown_placeholders_are_refused_by_name() {
        for bad in [
            "{{recrd.id}}",
            "{{record}}",
            "{{record.}}",
            "{{record..id}}",
            "{{record. id}}",
            "{{steps.a}}",
            "{{steps.a.b.c}}",
            "{{}}",
            "{{ keys }}",
            "{{{record.id}}}",
        ] {
            let err = Template::parse(&format!("http://x/{bad}")).unwrap_err();
            assert!(err.contains("is not a placeholder"), "{bad}: {err}");
        }
        let err = Template::parse("x {{recrd.id}} y").unwrap_err();
        assert!(err.starts_with("\"{{recrd.id}}\""), "{err}");
    }

    #[test]
    fn an_unclosed_placeholder_is_refused() {
        let err = Template::parse("http://x/{{record.id").unwrap_err();
        assert!(err.contains("never closed"), "{err}");
    }

    #[test]
    fn text_without_placeholders_is_literal() {
        let t = Template::parse("http://x/a}}b{c").unwrap();
        assert_eq!(t.placeholders().count(), 0);
        assert_eq!(t.literal_prefix(), "http://x/a}}b{c");
        assert_eq!(render("http://x/a}}b{c", json!({}), Escape::UrlComponent).unwrap(), "http://x/a}}b{c");
    }

    #[test]
    fn url_escaping_encodes_values_and_leaves_literals() {
        let out = render("http://x/a b/{{record.id}}?q={{key}}", json!({"id": "a/b c"}), Escape::UrlComponent);
        assert_eq!(out.unwrap(), "http://x/a b/a%2Fb%20c?q=k-1");
        let out = render("{{record.id}}", json!({"id": "é?#&=.-_~"}), Escape::UrlComponent);
        assert_eq!(out.unwrap(), "%C3%A9%3F%23%26%3D.-_~");
        assert_eq!(render("/{{record.id}}", json!({"id": "a/b c"}), Escape::None).unwrap(), "/a/b c");
    }

    #[test]
    fn values_become_text() {
        let rec = json!({"s": "text", "n": 12.5, "i": 7, "b": true, "z": null, "o": {"a": [1, 2]}});
        let out =
            render("{{record.s}}|{{record.n}}|{{record.i}}|{{record.b}}|{{record.z}}|{{record.o}}", rec, Escape::None);
        assert_eq!(out.unwrap(), r#"text|12.5|7|true||{"a":[1,2]}"#);
    }

    #[test]
    fn dotted_fields_walk_objects_and_arrays() {
        let rec = json!({"customer": {"name": "Ada", "tags": ["x", "y"]}, "flat.name": "F"});
        let out = render("{{record.customer.name}} {{record.customer.tags.1}} {{record.flat.name}}", rec, Escape::None);
        assert_eq!(out.unwrap(), "Ada y F");
    }

    #[test]
    fn missing_values_are_named() {
        let err = render("{{record.customer.email}}", json!({"customer": {}}), Escape::None).unwrap_err();
        assert_eq!(err, RenderError::MissingField { field: "customer.email".into() });
        assert_eq!(err.to_string(), "the record has no field \"customer.email\"");
        let err = render("{{record.n.x}}", json!({"n": 3}), Escape::None).unwrap_err();
        assert_eq!(err, RenderError::MissingField { field: "n.x".into() });

        let rec = Map::new();
        let steps = HashMap::from([("invoice".to_owned(), Map::new())]);
        let ctx = Context { record: &rec, steps: &steps, key: "" };
        for text in ["{{steps.invoice.id}}", "{{steps.customer.ref}}"] {
            let err = Template::parse(text).unwrap().render(&ctx, Escape::None).unwrap_err();
            assert!(matches!(err, RenderError::MissingCapture { .. }), "{err}");
        }
        let err = Template::parse("{{steps.invoice.id}}").unwrap().render(&ctx, Escape::None).unwrap_err();
        assert_eq!(err.to_string(), "step \"invoice\" has no captured \"id\"");
    }

    #[test]
    fn captures_are_rendered() {
        let rec = Map::new();
        let steps = HashMap::from([("customer".to_owned(), record(json!({"ref": "C-9", "n": 4})))]);
        let ctx = Context { record: &rec, steps: &steps, key: "K" };
        let t = Template::parse("{{steps.customer.ref}}/{{steps.customer.n}}/{{key}}").unwrap();
        assert_eq!(t.render(&ctx, Escape::None).unwrap(), "C-9/4/K");
    }

    #[test]
    fn a_lone_placeholder_keeps_its_json_type() {
        let rec = record(json!({"amount": 12.5, "qty": 3, "paid": true, "none": null,
            "customer": {"name": "Ada"}, "lines": [1, 2], "id": "o-1"}));
        let steps = HashMap::from([("customer".to_owned(), record(json!({"ref": 42})))]);
        let ctx = Context { record: &rec, steps: &steps, key: "K" };
        let body = JsonTemplate::parse(&json!({
            "amount": "{{record.amount}}",
            "qty": "{{ record.qty }}",
            "paid": "{{record.paid}}",
            "none": "{{record.none}}",
            "customer": "{{record.customer}}",
            "lines": "{{record.lines}}",
            "ref": "{{steps.customer.ref}}",
            "key": "{{key}}",
            "label": "order {{record.id}} x{{record.qty}}",
            "padded": " {{record.qty}}",
            "nested": {"list": ["{{record.qty}}", "lit", 5, null], "name": "{{record.customer.name}}"},
            "fixed": {"a": [1, "two"]},
        }))
        .unwrap();
        let expected = json!({
            "amount": 12.5,
            "qty": 3,
            "paid": true,
            "none": null,
            "customer": {"name": "Ada"},
            "lines": [1, 2],
            "ref": 42,
            "key": "K",
            "label": "order o-1 x3",
            "padded": " 3",
            "nested": {"list": [3, "lit", 5, null], "name": "Ada"},
            "fixed": {"a": [1, "two"]},
        });
        assert_eq!(body.render(&ctx).unwrap(), expected);
        let mut paths: Vec<_> = body.placeholders().into_iter().map(|(at, _)| at).collect();
        paths.sort();
        assert!(paths.contains(&".nested.list[0]".to_owned()), "{paths:?}");
        assert!(paths.contains(&".label".to_owned()), "{paths:?}");
        assert_eq!(paths.iter().filter(|p| *p == ".label").count(), 2);
    }

    #[test]
    fn a_body_that_is_one_placeholder_sends_that_value() {
        let rec = record(json!({"payload": {"a": 1}}));
        let steps = HashMap::new();
        let ctx = Context { record: &rec, steps: &steps, key: "" };
        let body = JsonTemplate::parse(&json!("{{record.payload}}")).unwrap();
        assert_eq!(body.render(&ctx).unwrap(), json!({"a": 1}));
        assert_eq!(body.placeholders()[0].0, "");
    }

    #[test]
    fn render_errors_surface_from_bodies() {
        let rec = Map::new();
        let steps = HashMap::new();
        let ctx = Context { record: &rec, steps: &steps, key: "" };
        let body = JsonTemplate::parse(&json!({"a": ["x {{record.gone}}"]})).unwrap();
        assert_eq!(body.render(&ctx).unwrap_err(), RenderError::MissingField { field: "gone".into() });
    }

    #[test]
    fn every_bad_leaf_is_reported_with_its_path() {
        let problems = JsonTemplate::parse(&json!({"a": "{{nope}}", "b": [1, "{{record}}"], "c": "ok"})).unwrap_err();
        let paths: Vec<_> = problems.iter().map(|(at, _)| at.as_str()).collect();
        assert_eq!(paths, vec![".a", ".b[1]"]);
        assert!(problems[0].1.contains("{{nope}}"), "{problems:?}");
    }

    #[test]
    fn toml_values_convert() {
        let value: toml::Table = toml::from_str(concat!(
            "body = { s = \"{{record.id}}\", i = 3, f = 1.5, b = false, d = 1979-05-27T07:32:00Z,",
            " a = [1, \"x\"], t = { k = \"v\" } }",
        ))
        .unwrap();
        let body = JsonTemplate::from_toml(&value["body"]).unwrap();
        let rec = record(json!({"id": 9}));
        let steps = HashMap::new();
        let out = body.render(&Context { record: &rec, steps: &steps, key: "" }).unwrap();
        assert_eq!(
            out,
            json!({"s": 9, "i": 3, "f": 1.5, "b": false, "d": "1979-05-27T07:32:00Z", "a": [1, "x"], "t": {"k": "v"}})
        );
    }

    #[test]
    fn floats_json_cannot_hold_are_refused() {
        let value: toml::Table = toml::from_str("body = { x = [nan], y = inf, z = \"{{bad}}\" }").unwrap();
        let problems = JsonTemplate::from_toml(&value["body"]).unwrap_err();
        let paths: Vec<_> = problems.iter().map(|(at, _)| at.as_str()).collect();
        assert_eq!(paths, vec![".x[0]", ".y", ".z"]);
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = Template::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_brace_soup(text in "[{}. a-z\\u{e9}]{0,40}") {
            if let Ok(t) = Template::parse(&text) {
                prop_assert_eq!(t.source(), text.as_str());
            }
        }

        #[test]
        fn text_without_braces_renders_as_itself(text in "[^{}]{0,60}") {
            let t = Template::parse(&text).unwrap();
            let rec = Map::new();
            let steps = HashMap::new();
            let ctx = Context { record: &rec, steps: &steps, key: "" };
            prop_assert_eq!(t.render(&ctx, Escape::UrlComponent).unwrap(), text);
        }

        #[test]
        fn rendering_never_panics(
            field in "[a-z]{1,3}(\\.[a-z0-9]{1,2}){0,2}",
            value in proptest::arbitrary::any::<(i64, String, bool)>(),
        ) {
            let rec = record(json!({"a": {"b": [value.0, value.1.clone()]}, "ab": value.2, "s": value.1}));
            let steps = HashMap::new();
            let ctx = Context { record: &rec, steps: &steps, key: "k" };
            let text = format!("x{{{{record.{field}}}}}y");
            let t = Template::parse(&text).unwrap();
            let _ = t.render(&ctx, Escape::UrlComponent);
            let _ = JsonTemplate::parse(&json!({"v": text})).unwrap().render(&ctx);
        }
    }
}
