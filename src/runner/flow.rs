//! The flow file of `idem run` (SPEC §5): one serde tree that refuses unknown keys, validated
//! into a typed [`Flow`] with every mistake named by its path (`steps[1].url`).
//!
//! Key names are public contract. Beyond SPEC §5 a flow also takes `timeout` (per call),
//! `headers` on a step and `body` on `when_known`. Reading, the problem collector and the
//! value checks are the shared [`crate::config`] toolkit's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};
use serde::Deserialize;

use super::source::{Input, Source};
use crate::config::{self, Kind, Problems, check, field, parse_toml};
use crate::core::OnUnknown;
use crate::template::{JsonTemplate, Part, Placeholder, Template, url_template};

/// The flow file as written. Every table refuses unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    /// The flow's name: the prefix of its scopes.
    pub flow: Option<String>,
    /// Store URL.
    pub store: Option<String>,
    /// How long a log entry is kept.
    pub retention: Option<String>,
    /// Records in flight.
    pub concurrency: Option<i64>,
    /// Calls per unit of time, all steps together.
    pub rate_limit: Option<String>,
    /// Attempts per call before a retryable failure needs review.
    pub max_attempts: Option<i64>,
    /// Budget for one call.
    pub timeout: Option<String>,
    /// Where records come from.
    pub source: Option<RawSource>,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<RawStep>,
}

/// `[source]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// A JSON Lines file, or `-` for stdin.
    pub jsonl: Option<String>,
    /// A CSV file with a header row, or `-` for stdin.
    pub csv: Option<String>,
    /// A PostgreSQL query.
    pub postgres: Option<RawPostgres>,
    /// The fields that identify a record.
    pub primary_key: Option<Vec<String>>,
}

/// `postgres = { url = "…", query = "…" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// Connection URL.
    pub url: Option<String>,
    /// The query whose rows are the records.
    pub query: Option<String>,
}

/// `[[steps]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// Unique name: the scope is `flow:name`.
    pub name: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// URL template.
    pub url: Option<String>,
    /// Body template; absent sends the record itself.
    pub body: Option<toml::Value>,
    /// Header name to value template.
    pub headers: Option<BTreeMap<String, String>>,
    /// How the key is built.
    pub key_strategy: Option<KeyStrategy>,
    /// Send a changed record again under its new key.
    pub resend_on_change: Option<bool>,
    /// The header the key is sent in; `""` sends none.
    pub idempotency_header: Option<String>,
    /// Capture name to JSON pointer into the answer.
    pub capture: Option<BTreeMap<String, String>>,
    /// The call made instead once the step has captured its values.
    pub when_known: Option<RawWhenKnown>,
    /// A non-idempotent side effect: at most once, ever.
    pub guard: Option<bool>,
    /// What a call sent but never answered becomes.
    pub on_unknown: Option<OnUnknown>,
    /// The lookup that settles a call sent but never answered.
    pub verify: Option<crate::verify::RawVerify>,
}

/// `when_known = { method = "…", url = "…", body = … }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhenKnown {
    /// HTTP method, typically `PUT` or `PATCH`.
    pub method: Option<String>,
    /// URL template.
    pub url: Option<String>,
    /// Body template; absent sends what the step sends.
    pub body: Option<toml::Value>,
}

/// A validated flow.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    /// The flow's name.
    pub name: String,
    /// Store URL.
    pub store: String,
    /// How long a log entry is kept; after that the record is sent again.
    pub retention: Duration,
    /// Records in flight.
    pub concurrency: usize,
    /// Calls per second, all steps together; `None` is unlimited.
    pub rate_limit: Option<f64>,
    /// Attempts per call before a retryable failure needs review.
    pub max_attempts: u32,
    /// Budget for one call.
    pub timeout: Duration,
    /// Where records come from.
    pub source: SourceSpec,
    /// The steps, in order (at least one).
    pub steps: Vec<Step>,
}

/// Where records come from and what identifies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    /// The records' origin; a relative file path is resolved against the flow file's
    /// directory (by [`load`]).
    pub input: Source,
    /// The fields that together identify a record (at least one).
    pub primary_key: Vec<String>,
}

/// How a step's idempotency key is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStrategy {
    /// The primary key: sent once per record, even if its data changes.
    #[default]
    PrimaryKey,
    /// The primary key and a SHA-256 of the fields sent.
    PrimaryKeyHash,
}

/// One validated step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Unique name within the flow.
    pub name: String,
    /// HTTP method.
    pub method: Method,
    /// URL template; render it with [`Escape::UrlComponent`](crate::template::Escape).
    pub url: Template,
    /// Body template; `None` sends the record itself.
    pub body: Option<JsonTemplate>,
    /// Extra headers, in name order.
    pub headers: Vec<(HeaderName, Template)>,
    /// How the key is built.
    pub key_strategy: KeyStrategy,
    /// Send a changed record again under its new key (only with [`KeyStrategy::PrimaryKeyHash`]).
    pub resend_on_change: bool,
    /// The header the key is sent in; `None` tracks the key internally only.
    pub idempotency_header: Option<HeaderName>,
    /// Capture name and JSON pointer into the answer, in name order.
    pub capture: Vec<(String, String)>,
    /// The call made instead once this step has captured its values (only with `capture`).
    pub when_known: Option<WhenKnown>,
    /// A non-idempotent side effect: at most once, ever.
    pub guard: bool,
    /// What a call sent but never answered becomes.
    pub on_unknown: OnUnknown,
    /// The lookup that settles a call sent but never answered (`verify = { … }`).
    pub verify: Option<std::sync::Arc<crate::verify::Lookup>>,
}

/// The update made for a record whose step already captured its external ids.
#[derive(Clone, Debug, PartialEq)]
pub struct WhenKnown {
    /// HTTP method.
    pub method: Method,
    /// URL template; may name this step's own captures.
    pub url: Template,
    /// Body template; `None` sends what the step sends.
    pub body: Option<JsonTemplate>,
}

/// The store used when the flow names none.
pub const DEFAULT_STORE: &str = "sqlite://./idem.db";

/// Reads and validates a flow file; relative source paths are resolved against its directory
/// and every problem is prefixed with the file's path.
pub fn load(path: &Path) -> Result<Flow, config::Error> {
    let raw: RawFlow = config::read_toml(path, Kind::Flow)?;
    raw.validate(Some(path.parent().unwrap_or(Path::new("")))).map_err(|e| e.in_file(path))
}

/// Parses and validates flow text; relative source paths stay relative to the working directory.
pub fn parse(text: &str) -> Result<Flow, config::Error> {
    let raw: RawFlow = parse_toml(text).map_err(|e| config::Error(vec![e], Kind::Flow))?;
    raw.validate(None)
}

impl Flow {
    /// The scope of a step's records: `"{flow}:{step}"`.
    pub fn scope(&self, step: &str) -> String {
        format!("{}:{step}", self.name)
    }
}

/// Step names and the captures each declares, as written, for checking `{{steps.S.C}}`.
type Captures = HashMap<String, BTreeSet<String>>;

impl RawFlow {
    /// Validates the tree into a [`Flow`]; `base_dir` is where relative source paths start.
    pub fn validate(self, base_dir: Option<&Path>) -> Result<Flow, config::Error> {
        let mut p = Problems::default();
        let name = p.required("flow", self.flow, "flow = \"orders-to-accounting\"");
        let name = name.and_then(|n| p.check("flow", flow_name(n)));
        let store = self.store.unwrap_or_else(|| DEFAULT_STORE.into());
        if store.trim().is_empty() {
            p.push("store", "must not be empty");
        }
        let retention = p.check("retention", check::duration(self.retention.as_deref().unwrap_or("7d")));
        let concurrency = p.check("concurrency", check::bounded(self.concurrency.unwrap_or(8), 1, 1024));
        let rate_limit = match self.rate_limit {
            None => Some(None),
            Some(r) => p.check("rate_limit", rate(&r)).map(Some),
        };
        let max_attempts = p.check("max_attempts", check::bounded(self.max_attempts.unwrap_or(5), 1, 100));
        let timeout = p.check("timeout", check::duration(self.timeout.as_deref().unwrap_or(config::DEFAULT_TIMEOUT)));
        let source = p.required("source", self.source, "[source] with jsonl = \"orders.jsonl\"");
        let source = source.and_then(|s| s.validate(base_dir, &mut p));
        let steps = validate_steps(self.steps, &mut p);
        let flow = || {
            Some(Flow {
                name: name?,
                store,
                retention: retention?,
                concurrency: concurrency?,
                rate_limit: rate_limit?,
                max_attempts: max_attempts?,
                timeout: timeout?,
                source: source?,
                steps: steps?,
            })
        };
        p.finish(Kind::Flow, flow())
    }
}

impl RawSource {
    fn validate(self, base_dir: Option<&Path>, p: &mut Problems) -> Option<SourceSpec> {
        let given: Vec<&str> =
            [("jsonl", self.jsonl.is_some()), ("csv", self.csv.is_some()), ("postgres", self.postgres.is_some())]
                .into_iter()
                .filter_map(|(name, set)| set.then_some(name))
                .collect();
        let input = match (self.jsonl, self.csv, self.postgres) {
            (Some(file), None, None) => p.check("source.jsonl", input(&file, base_dir)).map(Source::Jsonl),
            (None, Some(file), None) => p.check("source.csv", input(&file, base_dir)).map(Source::Csv),
            (None, None, Some(pg)) => pg.validate(p),
            (None, None, None) => {
                p.push("source", "give one of jsonl = \"FILE\", csv = \"FILE\" or postgres = { url, query }");
                None
            }
            _ => {
                let (last, others) = given.split_last().unwrap_or((&"", &[]));
                p.push("source", format_args!("{} and {last} are given together; give exactly one", others.join(", ")));
                None
            }
        };
        let keys = p.required("source.primary_key", self.primary_key, "primary_key = [\"order_id\"]")?;
        if keys.is_empty() {
            p.push("source.primary_key", "name at least one field, e.g. [\"order_id\"]");
        }
        for (i, key) in keys.iter().enumerate() {
            if key.trim().is_empty() {
                p.push(&format!("source.primary_key[{i}]"), "a field name must not be empty");
            } else if keys[..i].contains(key) {
                p.push(&format!("source.primary_key[{i}]"), format_args!("{key:?} is listed twice"));
            }
        }
        Some(SourceSpec { input: input?, primary_key: keys })
    }
}

impl RawPostgres {
    fn validate(self, p: &mut Problems) -> Option<Source> {
        let url = p.required("source.postgres.url", self.url, "url = \"postgres://user@host/db\"");
        let url = url.and_then(|u| {
            let ok = u.starts_with("postgres://") || u.starts_with("postgresql://");
            p.check("source.postgres.url", if ok { Ok(u) } else { Err("must start with postgres://".into()) })
        });
        let query = p.required("source.postgres.query", self.query, "query = \"SELECT … FROM orders\"");
        let query = query.and_then(|q| {
            p.check("source.postgres.query", if q.trim().is_empty() { Err("must not be empty".into()) } else { Ok(q) })
        });
        Some(Source::Postgres { url: url?, query: query? })
    }
}

/// Validates one step on its own (a consumer's `[deliver]`), its problems recorded under `at`.
/// It may not refer to other steps' captures: there are none.
pub fn validate_step(raw: RawStep, at: &str, p: &mut Problems) -> Option<Step> {
    let problems_before = p.len();
    let step = raw.validate(at, &Captures::new(), p);
    step.filter(|_| p.len() == problems_before)
}

fn validate_steps(raw: Vec<RawStep>, p: &mut Problems) -> Option<Vec<Step>> {
    if raw.is_empty() {
        p.push("steps", "a flow needs at least one [[steps]]");
        return None;
    }
    let problems_before = p.len();
    let mut earlier = Captures::new();
    let mut first_index = HashMap::new();
    let mut steps = Vec::new();
    for (i, step) in raw.into_iter().enumerate() {
        let at = format!("steps[{i}]");
        // What this step declares is registered from the raw text, so a mistake elsewhere in
        // it does not also make every later reference to it an error.
        let name = step.name.clone();
        let captures: BTreeSet<String> = step.capture.iter().flatten().map(|(c, _)| c.clone()).collect();
        if let Some((name, first)) = name.as_ref().and_then(|n| Some((n, first_index.get(n)?))) {
            p.push(&format!("{at}.name"), format_args!("{name:?} is already the name of steps[{first}]"));
        }
        steps.extend(step.validate(&at, &earlier, p));
        if let Some(name) = name {
            first_index.entry(name.clone()).or_insert(i);
            earlier.entry(name).or_insert(captures);
        }
    }
    (p.len() == problems_before).then_some(steps)
}

impl RawStep {
    fn validate(self, at: &str, earlier: &Captures, p: &mut Problems) -> Option<Step> {
        let problems_before = p.len();
        let name = p.required(&field(at, "name"), self.name, "name = \"invoice\"");
        let name = name.and_then(|n| p.check(&field(at, "name"), step_name(n)));
        let method = p.check(&field(at, "method"), check::method(self.method.as_deref().unwrap_or("POST")));
        let url = p.required(&field(at, "url"), self.url, "url = \"https://api.example.com/invoices\"");
        let url = url.and_then(|u| p.check(&field(at, "url"), url_template(&u)));
        let body = self.body.as_ref().map(|b| json_template(p, &field(at, "body"), b));
        let idempotency_header = idempotency_header(self.idempotency_header.as_deref(), at, p);
        let key_header = idempotency_header.as_ref().and_then(Option::as_ref);
        let headers = validate_headers(at, self.headers.unwrap_or_default(), key_header, p);
        let capture = validate_captures(at, self.capture.unwrap_or_default(), p);
        let when_known = self.when_known.map(|w| w.validate(&field(at, "when_known"), !capture.is_empty(), p));
        let settings = Settings {
            key_strategy: self.key_strategy.unwrap_or_default(),
            resend_on_change: self.resend_on_change.unwrap_or(false),
            guard: self.guard.unwrap_or(false),
            on_unknown: self.on_unknown,
        };
        settings.check(at, p);

        let verify = self.verify.and_then(|raw| raw.validate(&field(at, "verify"), p));
        let (mut references, update_references) = step_references(at, &url, &headers, &body, &when_known);
        if let Some(lookup) = &verify {
            references.extend(lookup.placeholders().into_iter().map(|(place, p)| (format!("{at}.verify.{place}"), p)));
        }
        let this = name.as_deref().map(|name| (name, capture.as_slice()));
        check_references(p, earlier, this, references, update_references);

        if p.len() > problems_before {
            return None;
        }
        Some(Step {
            name: name?,
            method: method?,
            url: url?,
            body: body.flatten(),
            headers: headers?.into_iter().map(|(_, header, template)| (header, template)).collect(),
            key_strategy: settings.key_strategy,
            resend_on_change: settings.resend_on_change,
            idempotency_header: idempotency_header?,
            capture,
            when_known: when_known.flatten(),
            guard: settings.guard,
            on_unknown: settings.on_unknown.unwrap_or_default(),
            verify: verify.map(std::sync::Arc::new),
        })
    }
}

/// Placeholders, each with the path it is written at.
type References<'a> = Vec<(String, &'a Placeholder)>;

/// The placeholders of the step's url, headers and body, and (apart) those of its `when_known`.
fn step_references<'a>(
    at: &str,
    url: &'a Option<Template>,
    headers: &'a Option<Vec<(String, HeaderName, Template)>>,
    body: &'a Option<Option<JsonTemplate>>,
    when_known: &'a Option<Option<WhenKnown>>,
) -> (References<'a>, References<'a>) {
    let mut references: References<'a> = Vec::new();
    references.extend(url.iter().flat_map(|url| url.placeholders().map(|placeholder| (field(at, "url"), placeholder))));
    for (at, _, template) in headers.iter().flatten() {
        references.extend(template.placeholders().map(|placeholder| (at.clone(), placeholder)));
    }
    references.extend(body.iter().flatten().flat_map(|body| within(field(at, "body"), body)));
    let mut update_references: References<'a> = Vec::new();
    if let Some(Some(w)) = when_known {
        update_references.extend(w.url.placeholders().map(|placeholder| (field(at, "when_known.url"), placeholder)));
        update_references.extend(w.body.iter().flat_map(|body| within(field(at, "when_known.body"), body)));
    }
    (references, update_references)
}

/// How a step's key is built and how often it may be sent: settings that can contradict
/// each other.
struct Settings {
    key_strategy: KeyStrategy,
    resend_on_change: bool,
    guard: bool,
    on_unknown: Option<OnUnknown>,
}

impl Settings {
    fn check(&self, at: &str, p: &mut Problems) {
        if self.resend_on_change && self.key_strategy != KeyStrategy::PrimaryKeyHash {
            let why = "with \"primary_key\" a record is sent once, whatever changes";
            p.push(&field(at, "resend_on_change"), format_args!("needs key_strategy = \"primary_key_hash\": {why}"));
        }
        if self.guard && self.resend_on_change {
            p.push(&field(at, "resend_on_change"), "contradicts guard = true (at most once, ever)");
        }
        if self.guard && self.on_unknown == Some(OnUnknown::Retry) {
            p.push(&field(at, "on_unknown"), "\"retry\" contradicts guard = true (at most once, ever)");
        }
    }
}

/// The header the key is sent in (default `Idempotency-Key`); `""` sends none: `Some(None)`.
fn idempotency_header(raw: Option<&str>, at: &str, p: &mut Problems) -> Option<Option<HeaderName>> {
    match raw.unwrap_or("Idempotency-Key") {
        "" => Some(None),
        h => p.check(&field(at, "idempotency_header"), check::header_name(h)).map(Some),
    }
}

/// Captures in name order; each name is a segment of `{{steps.S.C}}`, each value a pointer.
fn validate_captures(at: &str, raw: BTreeMap<String, String>, p: &mut Problems) -> Vec<(String, String)> {
    let capture: Vec<(String, String)> = raw.into_iter().collect();
    for (capture_name, pointer) in &capture {
        let at = format!("{at}.capture.{capture_name}");
        p.check(&at, segment_name("capture", capture_name).and_then(|()| check::pointer(pointer)));
    }
    capture
}

/// A TOML body as a JSON template, each problem at its place inside the body.
fn json_template(p: &mut Problems, at: &str, value: &toml::Value) -> Option<JsonTemplate> {
    JsonTemplate::from_toml(value)
        .map_err(|problems| problems.into_iter().for_each(|(inner, e)| p.push(&format!("{at}{inner}"), e)))
        .ok()
}

impl RawWhenKnown {
    fn validate(self, at: &str, step_captures: bool, p: &mut Problems) -> Option<WhenKnown> {
        if !step_captures {
            p.push(at, "needs capture on the step: without a captured id nothing is ever known about a record");
        }
        let method = p.required(&field(at, "method"), self.method, "method = \"PATCH\"");
        let method = method.and_then(|m| p.check(&field(at, "method"), check::method(&m)));
        let url = p.required(&field(at, "url"), self.url, "url = \"https://api.example.com/items/{{steps.STEP.id}}\"");
        let url = url.and_then(|u| p.check(&field(at, "url"), url_template(&u)));
        let body = match &self.body {
            None => Some(None),
            Some(b) => json_template(p, &field(at, "body"), b).map(Some),
        };
        Some(WhenKnown { method: method?, url: url?, body: body? })
    }
}

/// Headers in name order, each with its path for later messages; `None` when any is bad.
fn validate_headers(
    at: &str,
    raw: BTreeMap<String, String>,
    idempotency_header: Option<&HeaderName>,
    p: &mut Problems,
) -> Option<Vec<(String, HeaderName, Template)>> {
    let problems_before = p.len();
    let mut headers: Vec<(String, HeaderName, Template)> = Vec::new();
    for (name, value) in raw {
        let at = format!("{at}.headers.{name}");
        let Some(header) = p.check(&at, check::header_name(&name)) else { continue };
        if headers.iter().any(|(_, h, _)| *h == header) {
            p.push(&at, format_args!("{header} is given twice"));
        }
        if idempotency_header == Some(&header) {
            p.push(
                &at,
                "is the idempotency_header, which carries the key; set idempotency_header = \"\" to send your own",
            );
        }
        let Some(template) = p.check(&at, Template::parse(&value)) else { continue };
        // Only the literal text is checked here; what a placeholder fills in is checked per record.
        for part in template.parts() {
            if let Part::Literal(text) = part {
                p.check(&at, check::header_value(text));
            }
        }
        headers.push((at, header, template));
    }
    (p.len() == problems_before).then_some(headers)
}

/// `{{steps.S.C}}` must name an earlier step that captures C. `when_known` is used once this
/// step (`this`: its name and captures) has captured its values, so it may name them too.
fn check_references(
    p: &mut Problems,
    earlier: &Captures,
    this: Option<(&str, &[(String, String)])>,
    references: Vec<(String, &Placeholder)>,
    update_references: Vec<(String, &Placeholder)>,
) {
    for (at, placeholder) in references {
        p.check(&at, reference(placeholder, earlier, this.map(|(name, _)| name)));
    }
    let Some((name, captures)) = this else { return };
    let mut known = earlier.clone();
    known.insert(name.to_owned(), captures.iter().map(|(c, _)| c.clone()).collect());
    for (at, placeholder) in update_references {
        p.check(&at, reference(placeholder, &known, None));
    }
}

/// A body's placeholders, each with its full path (`steps[1].body.customer`).
fn within(path: String, body: &JsonTemplate) -> impl Iterator<Item = (String, &Placeholder)> {
    body.placeholders().into_iter().map(move |(rel, placeholder)| (format!("{path}{rel}"), placeholder))
}

fn reference(placeholder: &Placeholder, known: &Captures, this_step: Option<&str>) -> Result<(), String> {
    let Placeholder::Step { step, capture } = placeholder else { return Ok(()) };
    match known.get(step) {
        None => {
            let hint = if this_step == Some(step.as_str()) {
                " (a step's own captures can be used only in its when_known)"
            } else {
                ""
            };
            Err(format!("{placeholder} names step {step:?}, which is not an earlier step{hint}"))
        }
        Some(captures) if !captures.contains(capture) => {
            Err(format!("{placeholder} names step {step:?}, which captures no {capture:?}"))
        }
        Some(_) => Ok(()),
    }
}

fn flow_name(name: String) -> Result<String, String> {
    let ok = (1..=100).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(name) } else { Err(format!("{name:?} must be 1-100 characters of A-Z, a-z, 0-9, '_', '.', '-'")) }
}

fn step_name(name: String) -> Result<String, String> {
    segment_name("step", &name).map(|()| name)
}

/// Step and capture names: they are segments of `{{steps.STEP.CAPTURE}}`.
fn segment_name(what: &str, name: &str) -> Result<(), String> {
    let ok =
        (1..=100).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok { Ok(()) } else { Err(format!("{what} name {name:?} must be 1-100 characters of A-Z, a-z, 0-9, '_', '-'")) }
}

fn input(file: &str, base_dir: Option<&Path>) -> Result<Input, String> {
    match file {
        "-" => Ok(Input::Stdin),
        "" => Err("give a file path, or \"-\" for stdin".into()),
        path => Ok(Input::File(match base_dir {
            Some(base) if Path::new(path).is_relative() => base.join(path),
            _ => PathBuf::from(path),
        })),
    }
}

/// `"50/s"`, `"3000/min"`, `"100/h"` as calls per second.
fn rate(s: &str) -> Result<f64, String> {
    let bad = || {
        format!("invalid rate {s:?}; write calls per second, minute or hour, e.g. \"50/s\", \"3000/min\", \"100/h\"")
    };
    let (count, unit) = s.split_once('/').ok_or_else(bad)?;
    let count: f64 = count.trim().parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(bad()),
    };
    if count.is_finite() && count > 0.0 { Ok(count / seconds) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;
    use crate::template::{Context, Escape};

    const SPEC_EXAMPLE: &str = r#"
flow = "orders-to-accounting"          # the scope prefix: records are "flow:step"
store = "sqlite://./idem.db"
retention = "7d"                       # a log entry older than this is forgotten: re-sent next run
concurrency = 8                        # records in flight
rate_limit = "50/s"                    # calls per second, all steps together
max_attempts = 5                       # retryable failures: backoff with jitter, Retry-After honoured

[source]
jsonl = "orders.jsonl"                 # or csv = "orders.csv", or "-" for stdin
# postgres = { url = "postgres://…", query = "SELECT … FROM orders WHERE paid" }
primary_key = ["order_id"]             # one or more fields

[[steps]]
name = "customer"
method = "PUT"                         # upsert by external id: naturally idempotent
url = "http://127.0.0.1:9000/customers/{{record.customer_id}}"
body = { name = "{{record.customer_name}}", email = "{{record.email}}" }
key_strategy = "primary_key"
capture = { ref = "/id" }              # JSON pointer into the answer -> ledger external id

[[steps]]
name = "invoice"
method = "POST"
url = "http://127.0.0.1:9000/invoices"
body = { order = "{{record.order_id}}", amount = "{{record.amount}}", customer = "{{steps.customer.ref}}" }
key_strategy = "primary_key_hash"      # key = primary key + SHA-256 of the exported fields
resend_on_change = true
idempotency_header = "Idempotency-Key" # "" = track internally only
capture = { invoice_id = "/id" }
when_known = { method = "PATCH", url = "http://127.0.0.1:9000/invoices/{{steps.invoice.invoice_id}}" }

[[steps]]
name = "email"
method = "POST"
url = "http://127.0.0.1:9000/emails"
body = { to = "{{record.email}}", invoice = "{{steps.invoice.invoice_id}}" }
guard = true                           # a non-idempotent side effect: at most once, ever
on_unknown = "review"                  # sent, never answered: "review" (default) or "retry"
"#;

    const MINIMAL: &str = "flow = \"f\"\n[source]\njsonl = \"in.jsonl\"\nprimary_key = [\"id\"]\n";

    /// One valid step.
    const STEP: &str = "[[steps]]\nname = \"s\"\nurl = \"http://x\"\n";

    /// A minimal valid flow with `steps` appended.
    fn with_steps(steps: &str) -> String {
        format!("{MINIMAL}{steps}")
    }

    /// A flow named "f" with the given `[source]` keys and one valid step.
    fn with_source(source: &str) -> String {
        format!("flow = \"f\"\n[source]\n{source}\n{STEP}")
    }

    /// TOML for a step named `name` with url `url` and more keys.
    fn step(name: &str, url: &str, more: &str) -> String {
        format!("[[steps]]\nname = {name:?}\nurl = {url:?}\n{more}\n")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn object(value: serde_json::Value) -> Map<String, serde_json::Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn the_spec_example_parses() {
        let flow = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(flow.name, "orders-to-accounting");
        assert_eq!(flow.store, "sqlite://./idem.db");
        assert_eq!(flow.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(flow.concurrency, 8);
        assert_eq!(flow.rate_limit, Some(50.0));
        assert_eq!(flow.max_attempts, 5);
        assert_eq!(flow.timeout, Duration::from_secs(30));
        assert_eq!(
            flow.source,
            SourceSpec {
                input: Source::Jsonl(Input::File("orders.jsonl".into())),
                primary_key: vec!["order_id".into()]
            }
        );
        let names: Vec<_> = flow.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["customer", "invoice", "email"]);
        assert_eq!(flow.scope(&flow.steps[1].name), "orders-to-accounting:invoice");

        let [customer, invoice, email] = &flow.steps[..] else { panic!("three steps") };
        assert_eq!(customer.method, Method::PUT);
        assert_eq!(customer.url.source(), "http://127.0.0.1:9000/customers/{{record.customer_id}}");
        assert_eq!(customer.key_strategy, KeyStrategy::PrimaryKey);
        assert_eq!(customer.capture, vec![("ref".to_owned(), "/id".to_owned())]);
        assert!(customer.when_known.is_none() && !customer.resend_on_change && !customer.guard);

        assert_eq!(invoice.method, Method::POST);
        assert_eq!(invoice.key_strategy, KeyStrategy::PrimaryKeyHash);
        assert!(invoice.resend_on_change);
        assert_eq!(invoice.idempotency_header, Some(HeaderName::from_static("idempotency-key")));
        assert_eq!(invoice.capture, vec![("invoice_id".to_owned(), "/id".to_owned())]);
        let when_known = invoice.when_known.as_ref().unwrap();
        assert_eq!(when_known.method, Method::PATCH);
        assert_eq!(when_known.url.source(), "http://127.0.0.1:9000/invoices/{{steps.invoice.invoice_id}}");
        assert!(when_known.body.is_none());

        assert!(email.guard);
        assert_eq!(email.on_unknown, OnUnknown::Review);
        assert_eq!(email.idempotency_header, Some(HeaderName::from_static("idempotency-key")));
        assert!(email.headers.is_empty() && email.capture.is_empty());

        // The bodies render with the types of what they name.
        let record = object(json!({"order_id": "o-1", "amount": 12.5, "customer_id": "c/7", "email": "a@x"}));
        let steps = HashMap::from([("customer".to_owned(), object(json!({"ref": "C-9"})))]);
        let ctx = Context { record: &record, steps: &steps, key: "o-1" };
        let body = invoice.body.as_ref().unwrap().render(&ctx).unwrap();
        assert_eq!(body, json!({"order": "o-1", "amount": 12.5, "customer": "C-9"}));
        assert_eq!(customer.url.render(&ctx, Escape::UrlComponent).unwrap(), "http://127.0.0.1:9000/customers/c%2F7");
    }

    #[test]
    fn defaults_fill_what_is_not_written() {
        let flow = parse(&with_steps("[[steps]]\nname = \"s\"\nurl = \"https://x/\"\n")).unwrap();
        assert_eq!(flow.store, DEFAULT_STORE);
        assert_eq!(flow.retention, Duration::from_secs(7 * 86_400));
        assert_eq!((flow.concurrency, flow.max_attempts, flow.rate_limit), (8, 5, None));
        let step = &flow.steps[0];
        assert_eq!(step.method, Method::POST);
        assert!(step.body.is_none(), "no body: the record itself is sent");
        assert_eq!(step.key_strategy, KeyStrategy::PrimaryKey);
        assert_eq!(step.idempotency_header, Some(HeaderName::from_static("idempotency-key")));
        assert_eq!(step.on_unknown, OnUnknown::Review);
    }

    #[test]
    fn every_step_key_is_read() {
        let flow = parse(&with_steps(
            r#"
            [[steps]]
            name = "a"
            url = "https://x/{{key}}"
            method = "patch"
            idempotency_header = ""
            headers = { "X-Tenant" = "t-{{record.tenant}}", Authorization = "Bearer abc" }
            capture = { id = "/data/id", etag = "/etag" }
            when_known = { method = "put", url = "https://x/{{steps.a.id}}", body = { n = "{{record.n}}" } }
            on_unknown = "retry"
            body = [1, "{{record.n}}", 1979-05-27]
            "#,
        ))
        .unwrap();
        let step = &flow.steps[0];
        assert_eq!(step.method, Method::PATCH);
        assert_eq!(step.idempotency_header, None);
        let headers: Vec<_> = step.headers.iter().map(|(h, t)| (h.as_str(), t.source())).collect();
        assert_eq!(headers, [("authorization", "Bearer abc"), ("x-tenant", "t-{{record.tenant}}")]);
        assert_eq!(step.capture.len(), 2);
        assert_eq!(step.when_known.as_ref().unwrap().method, Method::PUT);
        assert!(step.when_known.as_ref().unwrap().body.is_some());
        assert_eq!(step.on_unknown, OnUnknown::Retry);
        let record = object(json!({"n": 4}));
        let steps = HashMap::new();
        let body = step.body.as_ref().unwrap().render(&Context { record: &record, steps: &steps, key: "" });
        assert_eq!(body.unwrap(), json!([1, 4, "1979-05-27"]));
    }

    #[test]
    fn sources() {
        let csv = parse(&with_source("csv = \"-\"\nprimary_key = [\"a\", \"b\"]"));
        let source = csv.unwrap().source;
        assert_eq!(source.input, Source::Csv(Input::Stdin));
        assert_eq!(source.primary_key, ["a", "b"]);
        let pg = parse(&with_source(
            "postgres = { url = \"postgres://u@h/db\", query = \"SELECT 1\" }\nprimary_key = [\"id\"]",
        ));
        assert_eq!(
            pg.unwrap().source.input,
            Source::Postgres { url: "postgres://u@h/db".into(), query: "SELECT 1".into() }
        );
        let err = error(&with_source("postgres = { url = \"mysql://h\" }\nprimary_key = [\"id\"]"));
        assert!(err.contains("source.postgres.url: must start with postgres://"), "{err}");
        assert!(err.contains("source.postgres.query: required"), "{err}");
    }

    #[test]
    fn relative_paths_start_at_the_flow_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flow.toml");
        std::fs::write(&path, with_steps(STEP)).unwrap();
        let flow = load(&path).unwrap();
        assert_eq!(flow.source.input, Source::Jsonl(Input::File(dir.path().join("in.jsonl"))));

        let absolute = dir.path().join("abs.jsonl");
        let text = format!("flow = \"f\"\n[source]\njsonl = {:?}\nprimary_key = [\"id\"]\n{STEP}", absolute.display());
        std::fs::write(&path, text).unwrap();
        assert_eq!(load(&path).unwrap().source.input, Source::Jsonl(Input::File(absolute)));
    }

    #[test]
    fn load_names_the_file_in_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flow.toml");
        std::fs::write(&path, "flow = \"f\"\nconcurency = 3\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("{}: ", path.display())) && err.contains("concurency"), "{err}");
        let err = load(&dir.path().join("missing.toml")).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_path_and_line() {
        let err = error(&with_steps(
            "[[steps]]\nname = \"a\"\nurl = \"http://x\"\n\n[[steps]]\nname = \"b\"\nurl = \"http://x\"\nbdy = {}\n",
        ));
        assert!(err.contains("steps[1]"), "{err}");
        assert!(err.contains("bdy"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        let err = error(&with_steps("[[steps]]\nname = \"a\"\nurl = \"http://x\"\nwhen_known = { mthod = \"PUT\" }\n"));
        assert!(err.contains("steps[0].when_known") && err.contains("mthod"), "{err}");
        let err = error(&with_steps("[[steps]]\nname = \"a\"\nurl = \"http://x\"\nkey_strategy = \"hash\"\n"));
        assert!(err.contains("steps[0].key_strategy") && err.contains("primary_key_hash"), "{err}");
    }

    #[test]
    fn a_bad_duration_is_named() {
        let steps = with_steps("[[steps]]\nname = \"a\"\nurl = \"http://x\"\n");
        let err = error(&format!("retention = \"7 fortnights\"\ntimeout = \"0s\"\n{steps}"));
        assert!(err.contains("retention: invalid duration \"7 fortnights\""), "{err}");
        assert!(err.contains("timeout: \"0s\" must be more than zero"), "{err}");
    }

    #[test]
    fn the_toml_must_put_top_level_keys_first() {
        // A key written after [source] belongs to the source table, and is refused there.
        let err = error(&with_steps("retention = \"1d\"\n[[steps]]\nname = \"a\"\nurl = \"http://x\"\n"));
        assert!(err.contains("source") && err.contains("retention"), "{err}");
    }

    #[test]
    fn templates_must_name_earlier_steps_and_their_captures() {
        let steps = r#"
            [[steps]]
            name = "customer"
            url = "http://x/c"
            capture = { ref = "/id" }
            [[steps]]
            name = "email"
            url = "http://x/e/{{steps.invoice.invoice_id}}"
            body = { customer = "{{steps.customer.id}}", invoice = ["{{steps.invoice.invoice_id}}"] }
            headers = { X-Ref = "{{steps.ghost.id}}" }
            [[steps]]
            name = "invoice"
            url = "http://x/i/{{steps.invoice.invoice_id}}"
            capture = { invoice_id = "/id" }
        "#;
        let err = error(&with_steps(steps));
        for needle in [
            r#"steps[1].url: {{steps.invoice.invoice_id}} names step "invoice", which is not an earlier step"#,
            r#"steps[1].body.customer: {{steps.customer.id}} names step "customer", which captures no "id""#,
            r#"steps[1].body.invoice[0]: {{steps.invoice.invoice_id}} names step "invoice", which is not an earlier"#,
            r#"steps[1].headers.X-Ref: {{steps.ghost.id}} names step "ghost", which is not an earlier step"#,
            r#"steps[2].url: {{steps.invoice.invoice_id}} names step "invoice", which is not an earlier step (a step"#,
        ] {
            assert!(err.contains(needle), "{needle}\nmissing from\n{err}");
        }
    }

    #[test]
    fn when_known_may_name_the_steps_own_captures() {
        let steps = r#"
            [[steps]]
            name = "a"
            url = "http://x/a"
            capture = { id = "/id" }
            when_known = { method = "PUT", url = "http://x/a/{{steps.a.id}}", body = { other = "{{steps.a.nope}}" } }
        "#;
        let err = error(&with_steps(steps));
        assert!(
            err.contains(
                r#"steps[0].when_known.body.other: {{steps.a.nope}} names step "a", which captures no "nope""#
            ),
            "{err}"
        );
        assert!(!err.contains("when_known.url"), "{err}");
    }

    #[test]
    fn when_known_needs_a_capture() {
        let err =
            error(&with_steps(&step("a", "http://x", "when_known = { method = \"PUT\", url = \"http://x/{{key}}\" }")));
        assert!(err.contains("steps[0].when_known: needs capture"), "{err}");
        let err = error(&with_steps(
            "[[steps]]\nname = \"a\"\nurl = \"http://x\"\ncapture = { id = \"/id\" }\nwhen_known = { }\n",
        ));
        assert!(
            err.contains("steps[0].when_known.method: required") && err.contains("steps[0].when_known.url: required"),
            "{err}"
        );
    }

    #[test]
    fn bad_templates_are_named_where_they_are() {
        let err = error(&with_steps(&step(
            "a",
            "http://x/{{recod.id}}",
            "body = { a = { b = \"{{record}}\" } }\nheaders = { X = \"{{key\" }",
        )));
        assert!(err.contains("steps[0].url: \"{{recod.id}}\" is not a placeholder"), "{err}");
        assert!(err.contains("steps[0].body.a.b: \"{{record}}\" is not a placeholder"), "{err}");
        assert!(err.contains("steps[0].headers.X: \"{{\" is never closed"), "{err}");
    }

    #[test]
    fn urls_must_be_http_with_a_literal_scheme() {
        for (url, ok) in [
            ("https://api.example.com/v1/{{record.id}}", true),
            ("HTTP://api.example.com", true),
            ("http://{{record.host}}:{{record.port}}/x", true),
            ("{{record.url}}", false),
            ("ftp://x/y", false),
            ("api.example.com/x", false),
            ("http://", false),
            ("http:///path", false),
        ] {
            let result = parse(&with_steps(&format!("[[steps]]\nname = \"a\"\nurl = {url:?}\n")));
            match result {
                Ok(_) => assert!(ok, "{url} should be refused"),
                Err(e) => {
                    assert!(!ok, "{url} should be accepted: {e}");
                    assert!(e.to_string().contains("steps[0].url:"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_missing_primary_key_is_named() {
        let err = error(&with_source("jsonl = \"x\""));
        assert!(err.contains("source.primary_key: required"), "{err}");
        let err = error(&with_source("jsonl = \"x\"\nprimary_key = []"));
        assert!(err.contains("source.primary_key: name at least one field"), "{err}");
        let err = error(&with_source("jsonl = \"x\"\nprimary_key = [\"a\", \" \", \"a\"]"));
        assert!(err.contains("source.primary_key[1]: a field name must not be empty"), "{err}");
        assert!(err.contains("source.primary_key[2]: \"a\" is listed twice"), "{err}");
    }

    #[test]
    fn exactly_one_source() {
        let err = error(&with_source("jsonl = \"x\"\ncsv = \"y\"\nprimary_key = [\"id\"]"));
        assert!(err.contains("source: jsonl and csv are given together; give exactly one"), "{err}");
        let err = error(&with_source("primary_key = [\"id\"]"));
        assert!(err.contains("source: give one of jsonl"), "{err}");
        let err = error("flow = \"f\"\n[[steps]]\nname = \"s\"\nurl = \"http://x\"\n");
        assert!(err.contains("source: required"), "{err}");
        let err = error(&with_source("jsonl = \"\"\nprimary_key = [\"id\"]"));
        assert!(err.contains("source.jsonl: give a file path"), "{err}");
    }

    #[test]
    fn rate_limits() {
        for (text, per_second) in [("50/s", 50.0), ("3000/min", 50.0), ("100/h", 100.0 / 3600.0), ("0.5 / second", 0.5)]
        {
            let flow = parse(&format!("rate_limit = {text:?}\n{}", with_steps(STEP)));
            assert_eq!(flow.unwrap().rate_limit, Some(per_second), "{text}");
        }
        for text in ["10/ms", "0/s", "-1/s", "fast", "50", "inf/s", "NaN/s", "/s"] {
            let err = error(&format!("rate_limit = {text:?}\n{}", with_steps(STEP)));
            assert!(err.contains("rate_limit: invalid rate"), "{text}: {err}");
        }
        let err = error(&format!("rate_limit = 50\n{}", with_steps(STEP)));
        assert!(err.contains("rate_limit"), "{err}");
    }

    #[test]
    fn numbers_are_bounded() {
        let err = error(&format!("concurrency = 0\nmax_attempts = 101\n{}", with_steps(STEP)));
        assert!(err.contains("concurrency: 0 is not between 1 and 1024"), "{err}");
        assert!(err.contains("max_attempts: 101 is not between 1 and 100"), "{err}");
        let flow = parse(&format!("concurrency = 1024\nmax_attempts = 1\n{}", with_steps(STEP)));
        let flow = flow.unwrap();
        assert_eq!((flow.concurrency, flow.max_attempts), (1024, 1));
    }

    #[test]
    fn names_are_checked() {
        let err = error(&with_steps(
            &[
                step("a b", "http://x", ""),
                step("c", "http://x", ""),
                step("c", "http://x", ""),
                "[[steps]]\nurl = \"http://x\"\n".into(),
            ]
            .concat(),
        ));
        assert!(err.contains("steps[0].name: step name \"a b\""), "{err}");
        assert!(err.contains("steps[2].name: \"c\" is already the name of steps[1]"), "{err}");
        assert!(err.contains("steps[3].name: required"), "{err}");
        let err =
            error(&with_source("jsonl = \"x\"\nprimary_key = [\"id\"]").replace("flow = \"f\"", "flow = \"a:b\""));
        assert!(err.contains("flow: \"a:b\" must be"), "{err}");
        let err = error(&with_source("jsonl = \"x\"\nprimary_key = [\"id\"]").replace("flow = \"f\"\n", ""));
        assert!(err.contains("flow: required"), "{err}");
        let err = error(MINIMAL);
        assert!(err.contains("steps: a flow needs at least one [[steps]]"), "{err}");
    }

    #[test]
    fn methods_headers_and_captures_are_checked() {
        let err = error(&with_steps(
            r#"
            [[steps]]
            name = "a"
            url = "http://x"
            method = "GE T"
            headers = { "Bad Name" = "v", Idempotency-Key = "{{key}}", X-Ok = "line\nbreak" }
            capture = { "a.b" = "/id", id = "id" }
            "#,
        ));
        for needle in [
            "steps[0].method: invalid method \"GE T\"",
            "steps[0].headers.Bad Name: invalid header name",
            "steps[0].headers.Idempotency-Key: is the idempotency_header",
            "steps[0].headers.X-Ok: \"line\\nbreak\" holds characters",
            "steps[0].capture.a.b: capture name \"a.b\"",
            "steps[0].capture.id: invalid JSON pointer \"id\"",
        ] {
            assert!(err.contains(needle), "{needle}\nmissing from\n{err}");
        }
    }

    #[test]
    fn contradictory_step_settings_are_refused() {
        let err = error(&with_steps(
            &(step("a", "http://x", "resend_on_change = true")
                + &step("b", "http://x", "guard = true\non_unknown = \"retry\"")),
        ));
        assert!(err.contains("steps[0].resend_on_change: needs key_strategy = \"primary_key_hash\""), "{err}");
        assert!(err.contains("steps[1].on_unknown: \"retry\" contradicts guard = true"), "{err}");
    }

    #[test]
    fn several_mistakes_are_reported_together() {
        let err = parse(&format!(
            "retention = \"soon\"\nconcurrency = -1\nrate_limit = \"10/ms\"\n{}",
            with_steps(&(step("a", "ftp://x", "") + &step("b", "http://x/{{steps.c.id}}", "")))
        ))
        .unwrap_err();
        let paths: Vec<_> = err.0.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(paths, ["retention", "concurrency", "rate_limit", "steps[0].url", "steps[1].url"], "{err}");
        assert!(err.to_string().starts_with("invalid flow:\n  retention:"), "{err}");
    }

    #[test]
    fn a_mistake_in_a_step_does_not_hide_its_captures_from_later_steps() {
        let err = error(&with_steps(
            &(step("a", "ftp://x", "capture = { id = \"/id\" }") + &step("b", "http://x/{{steps.a.id}}", "")),
        ));
        assert!(err.contains("steps[0].url") && !err.contains("steps[1]"), "{err}");
    }

    #[test]
    fn a_pointer_must_name_a_field() {
        let err = error(&with_steps(&step("a", "http://x", "capture = { all = \"\", id = \"id\", ok = \"/id\" }")));
        assert!(
            err.contains("steps[0].capture.all: invalid JSON pointer \"\": it would name the whole document"),
            "{err}"
        );
        assert!(err.contains("steps[0].capture.id: invalid JSON pointer \"id\""), "{err}");
        assert!(!err.contains("capture.ok"), "{err}");
    }

    #[test]
    fn the_error_is_bad_input_about_a_flow() {
        let err = parse("flow = 1").unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(err.1, Kind::Flow);
        assert!(err.to_string().starts_with("invalid flow:\n  flow: invalid type: integer `1`"), "{err}");
    }
}
