//! The gateway's configuration: one serde tree read from TOML, overridden by flags and
//! environment, then validated into typed values with every mistake named by its path.
//!
//! The reading, the checks and the `[admin]` table are the shared [`crate::config`] toolkit's;
//! this file holds what only the gateway has: its keys, their defaults, and one small
//! validator per table of a route.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use globset::GlobMatcher;
use http::header::HeaderName;
use http::{Method, Uri};
use serde::Deserialize;

use super::route::{ForwardKey, InFlight, KeySource, Route, TenantSource};
use crate::config::{self, Admin, Alternative, Kind, OneOrMany, Problems, RawAdmin, WordOr, check, field};
use crate::core::key::Normalize;
use crate::core::{FingerprintSpec, OnUnknown};

/// The config file as written. Every table refuses unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Client listener, `HOST:PORT`.
    pub listen: Option<String>,
    /// The protected API, `http[s]://HOST[:PORT][/prefix]`.
    pub upstream: Option<String>,
    /// Store URL.
    pub store: Option<String>,
    /// Honour OData `Repeatability-*` headers.
    pub odata: Option<bool>,
    /// How long a client may take to send its request.
    pub client_timeout: Option<String>,
    /// How long graceful shutdown waits for in-flight requests.
    pub shutdown_grace: Option<String>,
    /// How often expired records are purged.
    pub purge_interval: Option<String>,
    /// At most this many client connections at once.
    pub max_connections: Option<i64>,
    /// Serve the client listener over TLS.
    pub tls: Option<RawTls>,
    /// The admin listener.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Protected routes; first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `tls = { cert = "PEM", key = "PEM" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The certificate chain, PEM, leaf first.
    pub cert: Option<String>,
    /// Its private key, PEM.
    pub key: Option<String>,
}

/// The listener's certificate and key files (read at start-up and again on SIGHUP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// The private key.
    pub key: std::path::PathBuf,
}

impl RawTls {
    fn validate(self, p: &mut Problems) -> Option<TlsFiles> {
        let cert = p.check(
            "tls.cert",
            self.cert.filter(|c| !c.is_empty()).ok_or("is required: the certificate chain (PEM)".to_owned()),
        );
        let key = p.check(
            "tls.key",
            self.key.filter(|k| !k.is_empty()).ok_or("is required: the private key (PEM)".to_owned()),
        );
        Some(TlsFiles { cert: cert?.into(), key: key?.into() })
    }
}

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

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--demo`.
    pub demo: Demo,
}

/// Whether the gateway starts the demo upstream itself (`--demo`, for the quick start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Demo {
    /// Forward to the configured upstream.
    #[default]
    Off,
    /// Start the demo upstream on the upstream's address first.
    StartUpstream,
}

/// The default cap on client connections: far above what one gateway serves at once on
/// a few cores, and within the file descriptors a service is usually given.
pub const MAX_CONNECTIONS: usize = 4096;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Upstream base URI.
    pub upstream: Uri,
    /// Store URL.
    pub store: String,
    /// Whether OData `Repeatability-*` headers are honoured.
    pub odata: super::odata::Repeatable,
    /// Admin listener and token.
    pub admin: Admin,
    /// Budget for a client to send its headers and body.
    pub client_timeout: Duration,
    /// How long graceful shutdown waits.
    pub shutdown_grace: Duration,
    /// How often expired records are purged.
    pub purge_interval: Duration,
    /// At most this many client connections at once.
    pub max_connections: usize,
    /// The client listener's certificate, when it serves TLS.
    pub tls: Option<TlsFiles>,
    /// Whether to start the demo upstream.
    pub demo: Demo,
    /// Protected routes, in order.
    pub routes: Vec<Route>,
}

/// Reads a TOML file into the raw tree; errors name the file, the key path and the line.
pub fn read_file(path: &Path) -> Result<RawConfig, config::Error> {
    config::read_toml(path, Kind::Gateway)
}

impl RawConfig {
    /// Validates the tree (after overrides) into a [`Config`].
    pub fn validate(
        self,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, config::Error> {
        let mut p = Problems::default();
        let text = |flag: &Option<String>, file: Option<String>, default: &str| {
            flag.clone().or(file).unwrap_or_else(|| default.to_owned())
        };
        let listen = p.check("listen", check::socket_addr(&text(&overrides.listen, self.listen, "127.0.0.1:8080")));
        let upstream =
            p.check("upstream", upstream_uri(&text(&overrides.upstream, self.upstream, "http://127.0.0.1:9000")));
        let store = text(&overrides.store, self.store, "sqlite://./idem.db");
        let admin = RawAdmin { listen: overrides.admin_listen.clone().or(self.admin.listen), ..self.admin };
        let admin = admin.validate(Some("127.0.0.1:8081"), env, &mut p);
        let client_timeout = duration(&mut p, "client_timeout", self.client_timeout, "30s");
        let shutdown_grace = duration(&mut p, "shutdown_grace", self.shutdown_grace, "30s");
        let purge_interval = duration(&mut p, "purge_interval", self.purge_interval, "60s");
        let max_connections = match self.max_connections {
            None => Some(MAX_CONNECTIONS),
            Some(n) => p.check("max_connections", check::bounded(n, 1, 1_000_000)),
        };
        let tls = self.tls.map(|tls| tls.validate(&mut p));
        let routes = validate_routes(self.routes, &mut p);
        let config = || {
            Some(Config {
                listen: listen?,
                upstream: upstream?,
                store,
                odata: if self.odata.unwrap_or(false) {
                    super::odata::Repeatable::Honoured
                } else {
                    super::odata::Repeatable::Ignored
                },
                admin: admin?,
                client_timeout: client_timeout?,
                shutdown_grace: shutdown_grace?,
                purge_interval: purge_interval?,
                max_connections: max_connections?,
                tls: tls.unwrap_or_default(),
                demo: overrides.demo,
                routes,
            })
        };
        p.finish(Kind::Gateway, config())
    }
}

/// The routes in order (one default route when none is written); names must be unique.
fn validate_routes(raw: Vec<RawRoute>, p: &mut Problems) -> Vec<Route> {
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
        let ttl = duration(p, &field(at, "ttl"), self.ttl, "24h");
        let lease = lease(p, &field(at, "lease"), self.lease);
        let upstream = match self.upstream {
            Some(url) => p.check(&field(at, "upstream"), upstream_uri(&url)).map(Some),
            None => Some(None),
        };
        let upstream_timeout = duration(p, &field(at, "upstream_timeout"), self.upstream_timeout, "30s");
        let max_body = size(p, &field(at, "max_body"), self.max_body, "1MiB");
        let max_stored_response = size(p, &field(at, "max_stored_response"), self.max_stored_response, "1MiB");
        let raw_key = self.key.unwrap_or_default();
        let (required, normalize) = (raw_key.required.unwrap_or(false), raw_key.normalize.unwrap_or_default());
        let key = raw_key.validate(&field(at, "key"), p);
        let fingerprint = self.fingerprint.unwrap_or_default().validate(&field(at, "fingerprint"), p);
        let tenant = tenant(self.tenant, &field(at, "tenant"), p);
        let in_flight = in_flight(self.in_flight, &field(at, "in_flight"), p);
        let forward_key = forward_key(self.forward_key, &field(at, "forward_key"), p);
        let denylist = self.replay_header_denylist.unwrap_or_else(|| vec!["set-cookie".into()]);
        let replay_denylist = header_names(&denylist, &field(at, "replay_header_denylist"), p);
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
        })
    }
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
    let lease = duration(p, at, value, "30s")?;
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
        Some(WordOr::Table(RawWait { wait })) => duration(p, &field(at, "wait"), Some(wait), "").map(InFlight::Wait),
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

fn duration(p: &mut Problems, at: &str, value: Option<String>, default: &str) -> Option<Duration> {
    p.check(at, check::duration(value.as_deref().unwrap_or(default)))
}

fn size(p: &mut Problems, at: &str, value: Option<String>, default: &str) -> Option<u64> {
    p.check(at, check::size(value.as_deref().unwrap_or(default)))
}

fn upstream_uri(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        (Some(other), Some(_)) => {
            Err(format!("scheme {other:?} is not supported; the upstream must be http:// or https://HOST[:PORT]"))
        }
        _ => Err(format!("invalid URL {s:?}; write e.g. \"http://127.0.0.1:9000\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::parse_toml;

    fn validate(text: &str) -> Result<Config, String> {
        let raw: RawConfig = parse_toml(text)?;
        raw.validate(&Overrides::default(), &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn zero_config_protects_post_and_patch_everywhere() {
        let config = validate("").unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.store, "sqlite://./idem.db");
        let route = &config.routes[0];
        assert_eq!(route.methods, vec![Method::POST, Method::PATCH]);
        assert!(route.matcher.is_match("/any/path/at/all"));
        assert_eq!(route.ttl, Duration::from_secs(86_400));
        assert!(!route.required);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let err = validate("[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nttll = \"1h\"\n").unwrap_err();
        assert!(err.contains("routes[1]"), "{err}");
        assert!(err.contains("ttll"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let err = validate(
            "listen = \"nowhere\"\n[[routes]]\nname = \"a\"\nttl = \"24x\"\nmax_body = \"1XB\"\nkey = { body = \"order_id\" }\n",
        )
        .unwrap_err();
        for needle in ["listen:", "routes[0].ttl", "routes[0].max_body", "routes[0].key.body"] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        let text = "[admin]\nlisten = \"0.0.0.0:8081\"\n";
        let err = validate(text).unwrap_err();
        assert!(err.contains("IDEM_ADMIN_TOKEN"), "{err}");
        let raw: RawConfig = parse_toml(text).unwrap();
        let ok = raw.validate(&Overrides::default(), &|name| (name == "IDEM_ADMIN_TOKEN").then(|| "s3cret".into()));
        assert_eq!(ok.unwrap().admin.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn flags_override_the_file() {
        let raw: RawConfig = parse_toml("listen = \"127.0.0.1:1\"\nstore = \"memory://\"\n").unwrap();
        let overrides = Overrides { listen: Some("127.0.0.1:2".into()), ..Default::default() };
        let config = raw.validate(&overrides, &|_| None).unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.store, "memory://");
    }

    #[test]
    fn full_route_parses() {
        let config = validate(
            r#"
            odata = true
            [[routes]]
            name = "orders"
            methods = ["post"]
            path = "/v1/orders/*"
            ttl = "1h"
            key = { header = "X-Idempotency-Key", required = true, normalize = "lowercase" }
            fingerprint = { exclude = ["/client_sent_at"] }
            tenant = { header = "X-Tenant-ID" }
            in_flight = { wait = "5s" }
            lease = "10s"
            on_unknown = "retry"
            forward_key = { header = "X-Request-Id" }
            "#,
        )
        .unwrap();
        let route = &config.routes[0];
        assert_eq!(config.odata, crate::gateway::odata::Repeatable::Honoured);
        assert!(route.matcher.is_match("/v1/orders/1"));
        assert!(!route.matcher.is_match("/v1/orders/1/items"));
        assert_eq!(route.in_flight, InFlight::Wait(Duration::from_secs(5)));
        assert_eq!(route.on_unknown, OnUnknown::Retry);
        assert_eq!(route.normalize, Normalize::Lowercase);
        assert_eq!(route.forward_key, ForwardKey::Rename(HeaderName::from_static("x-request-id")));
    }

    #[test]
    fn two_key_sources_are_refused() {
        let err = validate("[[routes]]\nkey = { header = \"A\", body = \"/a\" }\n").unwrap_err();
        assert!(err.contains("routes[0].key"), "{err}");
    }

    #[test]
    fn the_word_or_table_keys_refuse_unknown_keys() {
        let err = validate("[[routes]]\nin_flight = { wait = \"5s\", typo = 1 }\n").unwrap_err();
        assert!(err.contains("routes[0].in_flight.typo: unknown field `typo`, expected `wait` (line 2)"), "{err}");
        let err = validate("[[routes]]\nforward_key = { header = \"X-Key\", as = \"strip\" }\n").unwrap_err();
        assert!(err.contains("routes[0].forward_key.as: unknown field `as`, expected `header`"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_shape_names_the_shapes_it_may_take() {
        let err = validate("[[routes]]\nin_flight = 5\n").unwrap_err();
        assert!(
            err.contains(r#"routes[0].in_flight: invalid type: integer `5`, expected "reject" or { wait = "5s" }"#),
            "{err}"
        );
        let err = validate("[[routes]]\nforward_key = true\n").unwrap_err();
        assert!(err.contains(r#"expected "as-is", "strip", "odata" or { header = "…" }"#), "{err}");
        let err = validate("[[routes]]\nkey = { body = { a = \"/a\" } }\n").unwrap_err();
        assert!(err.contains("routes[0].key.body: invalid type: map, expected a string or a list of strings"), "{err}");
        let err = validate("[[routes]]\nin_flight = \"queue\"\n").unwrap_err();
        assert!(err.contains(r#"routes[0].in_flight: "queue" is not "reject" or { wait = "5s" }"#), "{err}");
    }

    #[test]
    fn a_pointer_must_name_a_field() {
        // The gateway used to take "" (RFC 6901's whole document) where the runner and the
        // consumer refused it; a key or a fingerprint over the whole body is a mistake.
        for route in ["key = { body = \"\" }", "key = { body = [\"/a\", \"\"] }", "fingerprint = { include = [\"\"] }"]
        {
            let err = validate(&format!("[[routes]]\n{route}\n")).unwrap_err();
            assert!(err.contains("invalid JSON pointer \"\": it would name the whole document"), "{route}: {err}");
        }
        let err = validate("[[routes]]\nfingerprint = { exclude = [\"/a\", \"b\"] }\n").unwrap_err();
        assert!(err.contains("routes[0].fingerprint.exclude: invalid JSON pointer \"b\""), "{err}");
        let config = validate("[[routes]]\nkey = { body = [\"/tenant\", \"/id\"] }\n").unwrap();
        assert_eq!(config.routes[0].key, KeySource::Body(vec!["/tenant".into(), "/id".into()]));
    }

    #[test]
    fn a_duration_must_be_more_than_zero() {
        // `purge_interval = "0s"` used to validate and then panic the purge loop's timer.
        let err = validate("purge_interval = \"0s\"\nshutdown_grace = \"0ms\"\n[[routes]]\nttl = \"0s\"\nin_flight = { wait = \"0s\" }\n")
            .unwrap_err();
        for needle in [
            "purge_interval: \"0s\" must be more than zero",
            "shutdown_grace: \"0ms\" must be more than zero",
            "routes[0].ttl: \"0s\" must be more than zero",
            "routes[0].in_flight.wait: \"0s\" must be more than zero",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        let err = validate("[[routes]]\nlease = \"50ms\"\n").unwrap_err();
        assert!(err.contains("routes[0].lease: must be at least 100ms"), "{err}");
    }
}
