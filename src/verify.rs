//! Settling unknown outcomes by asking the destination (SPEC §4): the `verify = { … }` table
//! shared by gateway routes, runner steps and consumer deliveries, the lookup call, and the
//! one way a lookup's finding reaches the store.
//!
//! A lookup is a read: `GET` or `HEAD`, or a `POST` search the config marks
//! `read_only = true`. It runs only under a [`Decision::Verify`] claim, so on shared stores one
//! verifier at a time holds the record's lease (a verifier that dies lets its lease run out,
//! like any owner), and a lookup that errors never settles anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{DEFAULT_LEASE, DEFAULT_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT, Problems, check, field};
use crate::core::{
    ClaimPolicy, Decision, Intent, LeaseToken, Lookup as LookupPolicy, Millis, OnChange, OnUnknown, Outcome, Record,
    Replays, StoredResponse, settled_by_lookup,
};
use crate::store::clock::Clock;
use crate::store::{self, Store, owner};
use crate::template::{Context, Escape, JsonTemplate, Placeholder, Template, url_template};

/// The header every answer settled by a lookup carries, replays included.
pub const VERIFIED_HEADER: &str = "idempotent-verified";

/// `verify = { method, url, headers, body, found, status, read_only }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// `GET` (default), `HEAD`, or `POST` with `read_only = true`.
    pub method: Option<String>,
    /// The lookup's URL, a template.
    pub url: Option<String>,
    /// Extra headers, templates.
    pub headers: Option<BTreeMap<String, String>>,
    /// A JSON body (a `POST` search), a template.
    pub body: Option<toml::Value>,
    /// JSON pointer into a `2xx` answer: present means found. Without it any `2xx` is found.
    pub found: Option<String>,
    /// The status the settled answer is stored with (default `200`).
    pub status: Option<i64>,
    /// Declares a `POST` lookup a read (a search endpoint).
    pub read_only: Option<bool>,
}

/// A validated lookup.
#[derive(Clone, Debug, PartialEq)]
pub struct Lookup {
    /// The lookup's method.
    pub method: Method,
    /// The URL, rendered with [`Escape::UrlComponent`].
    pub url: Template,
    /// Extra headers.
    pub headers: Vec<(HeaderName, Template)>,
    /// A JSON body, for a `POST` search.
    pub body: Option<JsonTemplate>,
    /// JSON pointer whose presence in a `2xx` answer means found.
    pub found: Option<String>,
    /// The status the settled answer is stored with.
    pub status: u16,
}

/// What a lookup learnt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The destination has it: this is the answer to store.
    Found(StoredResponse),
    /// A `404`, or a `2xx` without `found`: the action never happened.
    Absent,
    /// Anything else: nothing is settled.
    Failed(String),
}

/// What settling a record on demand came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The lookup ran and its finding was recorded (or the lease was lost meanwhile).
    Looked(Finding),
    /// The record was not unknown (or another verifier holds it): nothing was asked.
    NotUnknown(Decision),
}

impl RawVerify {
    /// The lookup, every mistake recorded under `at` (`routes[0].verify`).
    pub fn validate(self, at: &str, p: &mut Problems) -> Option<Lookup> {
        let problems_before = p.len();
        let method = self.method.unwrap_or_else(|| "GET".into());
        let method = p.check(&field(at, "method"), check::method(&method));
        match (&method, self.read_only) {
            (Some(m), _) if *m == Method::GET || *m == Method::HEAD => {}
            (Some(m), Some(true)) if *m == Method::POST => {}
            (Some(m), _) if *m == Method::POST => p.push(
                &field(at, "method"),
                "a POST lookup must be declared a read: add read_only = true (only for a search that changes nothing)",
            ),
            (Some(m), _) => p.push(&field(at, "method"), format_args!("{m} is not a read: a lookup is GET or HEAD")),
            (None, _) => {}
        }
        let url = p.required(&field(at, "url"), self.url, "url = \"https://api.example.com/orders?key={{key}}\"");
        let url = url.and_then(|u| p.check(&field(at, "url"), url_template(&u)));
        let mut headers = Vec::new();
        for (name, value) in self.headers.unwrap_or_default() {
            let at = format!("{at}.headers.{name}");
            let name = p.check(&at, check::header_name(&name));
            let value = p.check(&at, Template::parse(&value));
            if let (Some(name), Some(value)) = (name, value) {
                headers.push((name, value));
            }
        }
        let body = self.body.as_ref().and_then(|b| {
            JsonTemplate::from_toml(b)
                .map_err(|problems| problems.into_iter().for_each(|(inner, e)| p.push(&format!("{at}.body{inner}"), e)))
                .ok()
        });
        if let Some(found) = &self.found {
            p.check(&field(at, "found"), check::pointer(found));
        }
        let status = p.check(&field(at, "status"), check::bounded::<u16>(self.status.unwrap_or(200), 200, 299));
        if p.len() > problems_before {
            return None;
        }
        Some(Lookup { method: method?, url: url?, headers, body, found: self.found, status: status? })
    }
}

impl Lookup {
    /// Every placeholder the lookup uses, with where it is written (for a file whose
    /// records have no steps to refuse `{{steps.…}}`).
    pub fn placeholders(&self) -> Vec<(&'static str, &Placeholder)> {
        let mut all: Vec<(&'static str, &Placeholder)> = self.url.placeholders().map(|p| ("url", p)).collect();
        all.extend(self.headers.iter().flat_map(|(_, t)| t.placeholders().map(|p| ("headers", p))));
        all.extend(self.body.iter().flat_map(|b| b.placeholders().into_iter().map(|(_, p)| ("body", p))));
        all
    }

    /// Asks the destination, within `timeout`.
    pub async fn ask(&self, client: &reqwest::Client, ctx: &Context<'_>, timeout: Duration) -> Finding {
        let rendered = self.url.render(ctx, Escape::UrlComponent).map_err(|e| format!("url: {e}"));
        let url = match rendered {
            Ok(url) => url,
            Err(why) => return Finding::Failed(format!("cannot render the lookup: {why}")),
        };
        let mut request = client.request(self.method.clone(), &url).timeout(timeout);
        for (name, template) in &self.headers {
            let value = template.render(ctx, Escape::None).map_err(|e| e.to_string());
            match value.and_then(|v| HeaderValue::try_from(v).map_err(|e| e.to_string())) {
                Ok(value) => request = request.header(name, value),
                Err(why) => return Finding::Failed(format!("cannot render the lookup's header {name}: {why}")),
            }
        }
        if let Some(body) = &self.body {
            match body.render(ctx) {
                Ok(body) => request = request.json(&body),
                Err(why) => return Finding::Failed(format!("cannot render the lookup's body: {why}")),
            }
        }
        let answer = match request.send().await {
            Ok(answer) => answer,
            Err(e) if e.is_timeout() => return Finding::Failed(format!("no answer within {timeout:?}")),
            Err(e) => return Finding::Failed(format!("the lookup failed: {}", root_cause(&e))),
        };
        let status = answer.status().as_u16();
        match answer.bytes().await {
            Ok(body) => self.judge(status, &body),
            Err(e) => Finding::Failed(format!("the lookup's answer broke off: {}", root_cause(&e))),
        }
    }

    /// What an answer means (SPEC §4): a `2xx` whose `found` pointer exists is found (its
    /// value becomes the stored body), a `404` or a `2xx` without it is absent, anything
    /// else is a failure.
    pub fn judge(&self, status: u16, body: &[u8]) -> Finding {
        match status {
            404 => Finding::Absent,
            200..=299 => match &self.found {
                None => Finding::Found(self.answer(Bytes::copy_from_slice(body))),
                Some(pointer) => match serde_json::from_slice::<Value>(body) {
                    Ok(document) => match document.pointer(pointer) {
                        Some(value) => Finding::Found(self.answer(Bytes::from(value.to_string()))),
                        None => Finding::Absent,
                    },
                    Err(_) => Finding::Failed(format!("the lookup answered {status} with a body that is not JSON")),
                },
            },
            _ => Finding::Failed(format!("the lookup answered {status}")),
        }
    }

    fn answer(&self, body: Bytes) -> StoredResponse {
        let json = self.found.is_some();
        let mut headers = vec![(VERIFIED_HEADER.to_owned(), "true".to_owned())];
        if json {
            headers.insert(0, ("content-type".to_owned(), "application/json".to_owned()));
        }
        StoredResponse { status: self.status, headers, body, retained: true }
    }
}

impl Finding {
    /// The `result` label of `idem_verifications_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Finding::Found(_) => "found",
            Finding::Absent => "absent",
            Finding::Failed(_) => "failed",
        }
    }

    /// How the verifier ends its lease: found completes with a note saying so, absent
    /// releases (the next claim executes), failed leaves the outcome unknown.
    pub fn outcome(&self, now: Millis) -> Outcome {
        match self {
            Finding::Found(response) => Outcome::Verified { response: response.clone(), note: settled_by_lookup(now) },
            Finding::Absent => {
                Outcome::Retryable { error: "released: the lookup found nothing at the destination".into() }
            }
            Finding::Failed(why) => Outcome::Unknown { error: format!("outcome unknown; {why}") },
        }
    }
}

/// The lookups an entry point knows, by scope, each with its time budget: what the
/// reconciler, the admin API and `idem log verify` settle records with.
#[derive(Clone, Debug, Default)]
pub struct Lookups(BTreeMap<String, Scoped>);

/// One scope's lookup.
#[derive(Clone, Debug)]
pub struct Scoped {
    /// The lookup.
    pub lookup: Arc<Lookup>,
    /// How long it may take (a route's `upstream_timeout`, a flow's `timeout`).
    pub timeout: Duration,
    /// The lease a verifier holds, renewed while it asks: the scope's own (a route's
    /// `lease`), so a verifier that dies blocks retries no longer than an owner would.
    pub lease: Duration,
}

impl Lookups {
    /// Adds `scope`'s lookup.
    pub fn insert(&mut self, scope: impl Into<String>, lookup: Arc<Lookup>, timeout: Duration, lease: Duration) {
        self.0.insert(scope.into(), Scoped { lookup, timeout, lease });
    }

    /// The lookup of `scope`; an OData client's scope (`ROUTE#CLIENT-ID`) uses its route's.
    pub fn get(&self, scope: &str) -> Option<&Scoped> {
        self.0.get(scope).or_else(|| self.0.get(scope.split_once('#')?.0))
    }

    /// Every scope with a lookup.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Scoped)> {
        self.0.iter().map(|(scope, scoped)| (scope.as_str(), scoped))
    }

    /// True when no scope has a lookup.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The lookups a config file names: a gateway's `[[routes]]` (scope = the route's
    /// name), a flow's `[[steps]]` (`FLOW:STEP`) or a consumer's `[deliver]`
    /// (`consumer:SUBSCRIBER`). Only the `verify` tables and what names and times them are
    /// read; each is validated as its own file validates it.
    pub fn from_file(text: &str, file: &str) -> Result<Lookups, crate::config::Error> {
        let mut p = Problems::default();
        let mut lookups = Lookups::default();
        let doc: toml::Table = match toml::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                p.push(file, e.message());
                return p.finish(crate::config::Kind::Gateway, None);
            }
        };
        let text_of = |t: &toml::Table, k: &str| t.get(k).and_then(toml::Value::as_str).map(str::to_owned);
        // A time the file gives, or the default its own file's validation applies.
        let budget = |t: &toml::Table, k: &str, default: &str| {
            text_of(t, k)
                .and_then(|d| check::duration(&d).ok())
                .unwrap_or_else(|| check::duration(default).expect("the defaults are valid durations"))
        };
        let mut add = |scope: String, table: &toml::Table, at: String, timeout: Duration, lease, p: &mut Problems| {
            let Some(raw) = table.get("verify") else { return };
            match RawVerify::deserialize(raw.clone()) {
                Ok(raw) => {
                    if let Some(lookup) = raw.validate(&at, p) {
                        lookups.insert(scope, Arc::new(lookup), timeout, lease);
                    }
                }
                Err(e) => p.push(&at, e.message()),
            }
        };
        let tables = |k: &str| doc.get(k).and_then(toml::Value::as_array).cloned().unwrap_or_default();
        for (i, route) in tables("routes").iter().filter_map(toml::Value::as_table).enumerate() {
            let name = text_of(route, "name").unwrap_or_else(|| "default".into());
            let timeout = budget(route, "upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT);
            let lease = budget(route, "lease", DEFAULT_LEASE);
            add(name, route, format!("routes[{i}].verify"), timeout, lease, &mut p);
        }
        let flow_timeout = budget(&doc, "timeout", DEFAULT_TIMEOUT);
        let flow_lease = lease_for(flow_timeout);
        if let Some(flow) = text_of(&doc, "flow") {
            for (i, step) in tables("steps").iter().filter_map(toml::Value::as_table).enumerate() {
                let name = text_of(step, "name").unwrap_or_default();
                add(format!("{flow}:{name}"), step, format!("steps[{i}].verify"), flow_timeout, flow_lease, &mut p);
            }
        }
        if let (Some(subscriber), Some(deliver)) =
            (text_of(&doc, "subscriber"), doc.get("deliver").and_then(toml::Value::as_table))
        {
            let at = "deliver.verify".into();
            add(format!("consumer:{subscriber}"), deliver, at, flow_timeout, flow_lease, &mut p);
        }
        p.finish(crate::config::Kind::Gateway, Some(lookups))
    }

    /// Settles `record` by its scope's lookup (see [`settle`]); `None` when its scope has none.
    pub async fn settle(
        &self,
        store: &Arc<dyn Store>,
        record: &Record,
        client: &reqwest::Client,
        clock: Clock,
    ) -> Result<Option<Settled>, store::Error> {
        let Some(scoped) = self.get(&record.id.scope) else { return Ok(None) };
        settle(store, record, scoped, client, clock).await.map(Some)
    }
}

/// The claim policy of an on-demand verification: the stored payload, so `on_change`
/// plays no part; replays are not counted (nobody asked for the answer).
pub const ON_DEMAND: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Review,
    on_change: OnChange::Reject,
    replays: Replays::Ignore,
    lookup: LookupPolicy::Configured,
};

/// Runs the lookup under the `Verify` lease `token` the caller holds, renewing it (`lease`
/// long) while the lookup runs, so a verifier that dies holds the record no longer than
/// an owner would; then records its finding (fenced by `token`) and counts it. A lost
/// lease (the record was taken over) records nothing.
pub async fn conclude(
    store: &Arc<dyn Store>,
    record: &Record,
    token: LeaseToken,
    lease: Duration,
    clock: Clock,
    ask: impl Future<Output = Finding>,
) -> Result<Finding, store::Error> {
    let renewal = owner::keep_alive(store.clone(), record.id.clone(), token, lease, clock);
    let finding = ask.await;
    drop(renewal);
    crate::metrics::verification(&record.id.scope, finding.label());
    tracing::info!(scope = %record.id.scope, key_hash = %crate::core::key::hash_for_logs(&record.id.key), result = finding.label(), "verified an unknown outcome");
    let now = clock.now();
    store.finish(&record.id, token, finding.outcome(now), now).await?;
    Ok(finding)
}

/// Settles `record` on demand (the reconciler, the admin API, `idem log verify`): claims it
/// for verification with its own fingerprint under the scope's lease, then [`conclude`]s.
/// Nothing is asked unless the record is unknown and no other verifier holds it.
pub async fn settle(
    store: &Arc<dyn Store>,
    record: &Record,
    scoped: &Scoped,
    client: &reqwest::Client,
    clock: Clock,
) -> Result<Settled, store::Error> {
    let intent = Intent {
        id: record.id.clone(),
        fingerprint: record.fingerprint,
        now: clock.now(),
        // Read by an execution's transition only; a verification keeps the record's expiry.
        ttl_ms: 0,
        lease_ms: crate::core::units::millis(scoped.lease),
        correlation_id: None,
    };
    let claim = store.claim(&intent, ON_DEMAND).await?;
    let (Decision::Verify, Some(token)) = (claim.decision, claim.token) else {
        return Ok(Settled::NotUnknown(claim.decision));
    };
    let (fields, steps) = (Map::new(), HashMap::new());
    let ctx = Context { record: &fields, steps: &steps, key: &record.id.key };
    let ask = scoped.lookup.ask(client, &ctx, scoped.timeout);
    let finding = conclude(store, record, token, scoped.lease, clock, ask).await?;
    Ok(Settled::Looked(finding))
}

/// The lease of a runner's steps and a consumer's deliveries: the whole budget and a
/// margin, so a live owner's lease never runs out under it.
pub fn lease_for(timeout: Duration) -> Duration {
    timeout * 2 + Duration::from_secs(1)
}

/// The HTTP client lookups use: [`crate::tls::http_client_builder`]'s, `SSL_CERT_FILE`
/// included.
pub fn client() -> Result<reqwest::Client, String> {
    crate::tls::http_client_builder().map_err(|e| e.to_string())?.build().map_err(|e| e.to_string())
}

/// The innermost cause of an error, which says what actually went wrong (the runner's calls
/// say it the same way).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(toml_text: &str) -> Result<Lookup, String> {
        let raw: RawVerify = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        let mut p = Problems::default();
        let lookup = raw.validate("routes[0].verify", &mut p);
        lookup.ok_or_else(|| format!("{p:?}"))
    }

    #[test]
    fn only_reads_are_lookups() {
        assert!(lookup(r#"url = "http://h/orders?key={{key}}""#).is_ok());
        assert!(
            lookup(
                r#"method = "HEAD"
url = "http://h/orders/{{key}}""#
            )
            .is_ok()
        );
        assert!(
            lookup(
                r#"method = "POST"
read_only = true
url = "http://h/search""#
            )
            .is_ok()
        );
        let post = lookup(
            r#"method = "POST"
url = "http://h/search""#,
        )
        .unwrap_err();
        assert!(post.contains("routes[0].verify.method") && post.contains("read_only = true"), "{post}");
        let delete = lookup(
            r#"method = "DELETE"
url = "http://h/x""#,
        )
        .unwrap_err();
        assert!(delete.contains("routes[0].verify.method") && delete.contains("not a read"), "{delete}");
        let missing = lookup("found = \"/data/0\"").unwrap_err();
        assert!(missing.contains("routes[0].verify.url"), "{missing}");
        let pointer = lookup("url = \"http://h/x\"\nfound = \"data\"").unwrap_err();
        assert!(pointer.contains("routes[0].verify.found"), "{pointer}");
        let status = lookup("url = \"http://h/x\"\nstatus = 500").unwrap_err();
        assert!(status.contains("routes[0].verify.status"), "{status}");
    }

    #[test]
    fn answers_are_judged_as_the_spec_says() {
        let lookup = lookup("url = \"http://h/x\"\nfound = \"/data/0\"\nstatus = 201").unwrap();
        let Finding::Found(found) = lookup.judge(200, br#"{"data":[{"id":7}]}"#) else { panic!("found") };
        assert_eq!((found.status, found.body.as_ref()), (201, br#"{"id":7}"#.as_slice()));
        assert!(found.headers.contains(&(VERIFIED_HEADER.into(), "true".into())));
        assert_eq!(lookup.judge(200, br#"{"data":[]}"#), Finding::Absent);
        assert_eq!(lookup.judge(404, b""), Finding::Absent);
        assert!(matches!(lookup.judge(500, b""), Finding::Failed(why) if why.contains("500")));
        assert!(matches!(lookup.judge(200, b"<html>"), Finding::Failed(_)));
        assert!(matches!(Finding::Failed("x".into()).outcome(0), Outcome::Unknown { .. }));
        assert!(matches!(Finding::Absent.outcome(0), Outcome::Retryable { .. }));
        let Outcome::Verified { note, .. } = Finding::Found(found).outcome(0) else { panic!("verified") };
        assert!(note.starts_with("settled by lookup at 1970-01-01T00:00:00.000Z"));
    }
}
