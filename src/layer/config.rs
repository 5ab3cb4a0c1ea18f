//! The `[[routes]]` table, shared by `idem gateway`'s file and by a service that uses the
//! layer: the raw serde tree, one small validator per sub-table, and [`RouteBuilder`] for code
//! that would rather not write TOML. The builder fills the same raw tree and runs the same
//! validators, so a route means one thing however it was written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use globset::GlobMatcher;
use http::Method;
use http::header::HeaderName;
use serde::Deserialize;

use super::route::{ForwardKey, InFlight, KeySource, Route, TenantSource};
use crate::config::{self, Alternative, Kind, OneOrMany, Problems, WordOr, check, field};
use crate::core::FingerprintSpec;
use crate::core::OnUnknown;
use crate::core::key::Normalize;
use crate::template::Placeholder;
use crate::verify::RawVerify;

/// `[[routes]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// The route's name: the scope of its records.
    pub name: Option<String>,
    /// Methods protected on this route.
    pub methods: Option<Vec<String>>,
    /// Path glob.
    pub path: Option<String>,
    /// Record lifetime.
    pub ttl: Option<String>,
    /// Where the key comes from.
    pub key: Option<RawKey>,
    /// What the fingerprint covers.
    pub fingerprint: Option<RawFingerprint>,
    /// Where the tenant comes from.
    pub tenant: Option<RawTenant>,
    /// What a duplicate in flight gets.
    pub in_flight: Option<RawInFlight>,
    /// Lease length.
    pub lease: Option<String>,
    /// The route's own upstream.
    pub upstream: Option<String>,
    /// Budget for the whole upstream exchange.
    pub upstream_timeout: Option<String>,
    /// `review` or `retry`.
    pub on_unknown: Option<OnUnknown>,
    /// Store 5xx answers as final.
    pub store_server_errors: Option<bool>,
    /// How the key reaches the upstream.
    pub forward_key: Option<RawForwardKey>,
    /// Largest request body.
    pub max_body: Option<String>,
    /// Largest answer kept for replay.
    pub max_stored_response: Option<String>,
    /// Response headers never stored.
    pub replay_header_denylist: Option<Vec<String>>,
    /// The lookup that settles an unknown outcome.
    pub verify: Option<RawVerify>,
}

/// `key = { … }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// A header name.
    pub header: Option<String>,
    /// One or more JSON pointers into the body.
    pub body: Option<OneOrMany>,
    /// Use the fingerprint as the key.
    pub fingerprint: Option<bool>,
    /// Refuse requests without a key.
    pub required: Option<bool>,
    /// `none` or `lowercase`.
    pub normalize: Option<Normalize>,
}

/// `fingerprint = { … }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFingerprint {
    /// Pointers removed before hashing.
    pub exclude: Option<Vec<String>>,
    /// Only these pointers count.
    pub include: Option<Vec<String>>,
    /// Header allowlist.
    pub headers: Option<Vec<String>>,
}

/// `tenant = { header = "…" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// The tenant header.
    pub header: Option<String>,
}

/// `in_flight = "reject"` or `{ wait = "5s" }`.
pub type RawInFlight = WordOr<RawWait>;

/// `in_flight = { wait = "5s" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWait {
    /// How long to wait.
    pub wait: String,
}

impl Alternative for RawWait {
    const EXPECTED: &'static str = "\"reject\" or { wait = \"5s\" }";
}

/// `forward_key = "as-is" | "strip" | "odata"` or `{ header = "…" }`.
pub type RawForwardKey = WordOr<RawForwardHeader>;

/// `forward_key = { header = "…" }`: rename the header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForwardHeader {
    /// The header the upstream receives the key in.
    pub header: String,
}

impl Alternative for RawForwardHeader {
    const EXPECTED: &'static str = "\"as-is\", \"strip\", \"odata\" or { header = \"…\" }";
}

/// The routes in order (one default route when none is written); names must be unique.
pub fn validate_routes(raw: Vec<RawRoute>, p: &mut Problems) -> Vec<Route> {
    let raw = if raw.is_empty() { vec![RawRoute::default()] } else { raw };
    let mut routes = Vec::new();
    let mut names = BTreeMap::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let Some(route) = raw.validate(&at, p) else { continue };
        if let Some(first) = names.insert(route.name.clone(), i) {
            p.push(&field(&at, "name"), format_args!("{:?} is already the name of routes[{first}]", route.name));
        }
        routes.push(route);
    }
    routes
}

impl RawRoute {
    /// One route; `None` when any of its keys is wrong (every mistake is recorded).
    fn validate(self, at: &str, p: &mut Problems) -> Option<Route> {
        let problems_before = p.len();
        let name = route_name(self.name.unwrap_or_else(|| "default".into()), &field(at, "name"), p);
        let methods = methods(self.methods.unwrap_or_else(|| vec!["POST".into(), "PATCH".into()]), at, p);
        let path = self.path.unwrap_or_else(|| "/**".into());
        let matcher = p.check(&field(at, "path"), glob(&path));
        let ttl = p.duration(&field(at, "ttl"), self.ttl.as_deref(), "24h");
        let lease = lease(p, &field(at, "lease"), self.lease);
        let upstream = match self.upstream {
            Some(url) => p.check(&field(at, "upstream"), check::upstream(&url)).map(Some),
            None => Some(None),
        };
        let upstream_timeout = p.duration(
            &field(at, "upstream_timeout"),
            self.upstream_timeout.as_deref(),
            config::DEFAULT_UPSTREAM_TIMEOUT,
        );
        let max_body = p.size(&field(at, "max_body"), self.max_body.as_deref(), "1MiB");
        let max_stored_response =
            p.size(&field(at, "max_stored_response"), self.max_stored_response.as_deref(), "1MiB");
        let raw_key = self.key.unwrap_or_default();
        let (required, normalize) = (raw_key.required.unwrap_or(false), raw_key.normalize.unwrap_or_default());
        let key = raw_key.validate(&field(at, "key"), p);
        let fingerprint = self.fingerprint.unwrap_or_default().validate(&field(at, "fingerprint"), p);
        let tenant = tenant(self.tenant, &field(at, "tenant"), p);
        let in_flight = in_flight(self.in_flight, &field(at, "in_flight"), p);
        let forward_key = forward_key(self.forward_key, &field(at, "forward_key"), p);
        let denylist = self.replay_header_denylist.unwrap_or_else(|| vec!["set-cookie".into()]);
        let replay_denylist = header_names(&denylist, &field(at, "replay_header_denylist"), p);
        let verify = self.verify.and_then(|raw| lookup(raw, &field(at, "verify"), p));
        if p.len() > problems_before {
            return None;
        }
        Some(Route {
            name,
            methods,
            path,
            matcher: matcher?,
            ttl: ttl?,
            key: key?,
            required,
            normalize,
            fingerprint: fingerprint?,
            tenant: tenant?,
            in_flight: in_flight?,
            lease: lease?,
            upstream: upstream?,
            upstream_timeout: upstream_timeout?,
            on_unknown: self.on_unknown.unwrap_or_default(),
            store_server_errors: self.store_server_errors.unwrap_or(false),
            forward_key: forward_key?,
            max_body: max_body?,
            max_stored_response: max_stored_response?,
            replay_denylist,
            verify: verify.map(Arc::new),
        })
    }
}

/// A route's lookup: a gateway has no earlier steps, so `{{steps.…}}` names nothing.
/// `{{record.F}}` names a field of the request's JSON body (present on a retry's lookup;
/// a background lookup has no body, so it fails and waits for the retry).
fn lookup(raw: RawVerify, at: &str, p: &mut Problems) -> Option<crate::verify::Lookup> {
    let lookup = raw.validate(at, p)?;
    for (place, placeholder) in lookup.placeholders() {
        if matches!(placeholder, Placeholder::Step { .. }) {
            p.push(
                &field(at, place),
                format_args!("{placeholder}: a route has no steps; use {{{{key}}}} or {{{{record.FIELD}}}}"),
            );
        }
    }
    Some(lookup)
}

impl RawKey {
    /// Where the key comes from: exactly one of a header, body pointers or the fingerprint
    /// (the `Idempotency-Key` header when none is given).
    fn validate(self, at: &str, p: &mut Problems) -> Option<KeySource> {
        match (self.header, self.body, self.fingerprint) {
            (Some(h), None, None | Some(false)) => {
                p.check(&field(at, "header"), check::header_name(&h)).map(KeySource::Header)
            }
            (None, Some(b), None | Some(false)) => {
                p.check(&field(at, "body"), check::pointers(b.into_vec())).map(KeySource::Body)
            }
            (None, None, Some(true)) => Some(KeySource::Fingerprint),
            (None, None, None | Some(false)) => Some(KeySource::Header(HeaderName::from_static("idempotency-key"))),
            _ => {
                p.push(at, "give exactly one of header, body or fingerprint = true");
                None
            }
        }
    }
}

impl RawFingerprint {
    /// The header allowlist (default `content-type`) and the include/exclude pointers.
    fn validate(self, at: &str, p: &mut Problems) -> Option<FingerprintSpec> {
        let headers = self.headers.unwrap_or_else(|| vec!["content-type".into()]);
        let headers = header_names(&headers, &field(at, "headers"), p);
        let include = p.check(&field(at, "include"), check::pointers(self.include.unwrap_or_default()));
        let exclude = p.check(&field(at, "exclude"), check::pointers(self.exclude.unwrap_or_default()));
        Some(FingerprintSpec {
            headers: headers.iter().map(|h| h.as_str().to_owned()).collect(),
            include: include?,
            exclude: exclude?,
        })
    }
}

/// 1–128 visible ASCII characters: the name is the scope of the route's records.
fn route_name(name: String, at: &str, p: &mut Problems) -> String {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_graphic()) {
        p.push(at, format_args!("{name:?} must be 1-128 visible ASCII characters"));
    }
    name
}

/// The protected methods; GET and HEAD are safe by definition and never claimed.
fn methods(raw: Vec<String>, at: &str, p: &mut Problems) -> Vec<Method> {
    let protected = |m: &String| {
        let method = check::method(m)?;
        if method == Method::GET || method == Method::HEAD {
            return Err(format!("{method} is never claimed: GET and HEAD are safe and pass through"));
        }
        Ok(method)
    };
    raw.iter().enumerate().filter_map(|(i, m)| p.check(&format!("{at}.methods[{i}]"), protected(m))).collect()
}

/// A path glob: `*` stays within a segment, `**` crosses segments.
fn glob(glob: &str) -> Result<GlobMatcher, String> {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("invalid glob {glob:?}: {e}"))
}

/// The lease: renewed every third of it, so a shorter one would renew faster than a store
/// round trip.
fn lease(p: &mut Problems, at: &str, value: Option<String>) -> Option<Duration> {
    let lease = p.duration(at, value.as_deref(), config::DEFAULT_LEASE)?;
    if lease < Duration::from_millis(100) {
        p.push(at, "must be at least 100ms");
        return None;
    }
    Some(lease)
}

/// `tenant = { header = "…" }`, or the hash of the credential when none is given.
fn tenant(raw: Option<RawTenant>, at: &str, p: &mut Problems) -> Option<TenantSource> {
    match raw.and_then(|t| t.header) {
        Some(h) => p.check(&field(at, "header"), check::header_name(&h)).map(TenantSource::Header),
        None => Some(TenantSource::Credential),
    }
}

fn in_flight(raw: Option<RawInFlight>, at: &str, p: &mut Problems) -> Option<InFlight> {
    match raw {
        None => Some(InFlight::Reject),
        Some(WordOr::Word(w)) if w == "reject" => Some(InFlight::Reject),
        Some(WordOr::Word(w)) => {
            p.push(at, format_args!("{w:?} is not {}", RawWait::EXPECTED));
            None
        }
        Some(WordOr::Table(RawWait { wait })) => p.duration(&field(at, "wait"), Some(&wait), "").map(InFlight::Wait),
    }
}

fn forward_key(raw: Option<RawForwardKey>, at: &str, p: &mut Problems) -> Option<ForwardKey> {
    match raw {
        None => Some(ForwardKey::AsIs),
        Some(WordOr::Word(w)) => match w.as_str() {
            "as-is" => Some(ForwardKey::AsIs),
            "strip" => Some(ForwardKey::Strip),
            "odata" => Some(ForwardKey::OData),
            _ => {
                p.push(at, format_args!("{w:?} is not {}", RawForwardHeader::EXPECTED));
                None
            }
        },
        Some(WordOr::Table(RawForwardHeader { header })) => {
            p.check(&field(at, "header"), check::header_name(&header)).map(ForwardKey::Rename)
        }
    }
}

/// Header names, each mistake named by its index (`headers[1]`).
fn header_names(raw: &[String], at: &str, p: &mut Problems) -> Vec<HeaderName> {
    raw.iter().enumerate().filter_map(|(i, h)| p.check(&format!("{at}[{i}]"), check::header_name(h))).collect()
}

/// A file (or a string) holding only `[[routes]]` tables, as a service that uses the layer
/// may keep them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    routes: Vec<RawRoute>,
}

/// Routes from TOML text holding `[[routes]]` tables, exactly as in `idem gateway`'s
/// configuration file (at least one route; the gateway's one default route is not assumed).
pub fn routes_from_toml(text: &str) -> Result<Vec<Route>, config::Error> {
    let raw: RawRoutes = config::parse_toml(text).map_err(|problem| config::Error(vec![problem], Kind::Gateway))?;
    let mut p = Problems::default();
    if raw.routes.is_empty() {
        p.push("routes", "give at least one [[routes]] table");
    }
    let routes = validate_routes(raw.routes, &mut p);
    p.finish(Kind::Gateway, Some(routes))
}

/// A route written in code: the same keys as a `[[routes]]` table, checked by the same
/// validators when [`build`](Self::build) is called.
///
/// ```
/// use std::time::Duration;
/// let route = idem::layer::RouteBuilder::new("orders")
///     .methods(["POST"])
///     .path("/orders")
///     .key_required()
///     .in_flight_wait(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// assert!(route.matches(&http::Method::POST, "/orders"));
/// assert!(route.required);
/// ```
#[derive(Debug, Default)]
pub struct RouteBuilder(RawRoute);

impl RouteBuilder {
    /// A route named `name` (the scope of its records) with every other key at its default:
    /// `POST` and `PATCH` on every path, the key in `Idempotency-Key`, optional.
    pub fn new(name: impl Into<String>) -> Self {
        Self(RawRoute { name: Some(name.into()), ..RawRoute::default() })
    }

    /// The protected methods (`methods`).
    pub fn methods<M: Into<String>>(mut self, methods: impl IntoIterator<Item = M>) -> Self {
        self.0.methods = Some(methods.into_iter().map(Into::into).collect());
        self
    }

    /// The path glob (`path`): `*` stays within a segment, `**` crosses segments.
    pub fn path(mut self, glob: impl Into<String>) -> Self {
        self.0.path = Some(glob.into());
        self
    }

    /// How long a record is remembered (`ttl`).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.0.ttl = Some(text(ttl));
        self
    }

    /// How long a claim holds without renewal (`lease`).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.0.lease = Some(text(lease));
        self
    }

    /// The budget for the inner service's answer (`upstream_timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.0.upstream_timeout = Some(text(timeout));
        self
    }

    /// The key comes from this header instead of `Idempotency-Key` (`key.header`).
    pub fn key_header(mut self, name: impl Into<String>) -> Self {
        self.0.key.get_or_insert_with(RawKey::default).header = Some(name.into());
        self
    }

    /// Requests without a key are refused with `400` (`key.required = true`).
    pub fn key_required(mut self) -> Self {
        self.0.key.get_or_insert_with(RawKey::default).required = Some(true);
        self
    }

    /// A duplicate waits this long for the first request to finish (`in_flight = { wait }`).
    pub fn in_flight_wait(mut self, wait: Duration) -> Self {
        self.0.in_flight = Some(WordOr::Table(RawWait { wait: text(wait) }));
        self
    }

    /// Unknown outcomes are settled by this lookup (`verify = { … }`), checked by `build`
    /// as the TOML table is.
    pub fn verify(mut self, lookup: RawVerify) -> Self {
        self.0.verify = Some(lookup);
        self
    }

    /// What an unknown outcome turns into (`on_unknown`).
    pub fn on_unknown(mut self, on_unknown: OnUnknown) -> Self {
        self.0.on_unknown = Some(on_unknown);
        self
    }

    /// The largest request body accepted, in bytes (`max_body`).
    pub fn max_body(mut self, bytes: u64) -> Self {
        self.0.max_body = Some(bytes.to_string());
        self
    }

    /// The route, or every mistake in it.
    pub fn build(self) -> Result<Route, config::Error> {
        let mut p = Problems::default();
        let route = self.0.validate("route", &mut p);
        p.finish(Kind::Gateway, route)
    }
}

/// A duration as the config text the validators read.
fn text(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}
