//! The gateway's configuration: one serde tree read from TOML, overridden by flags and
//! environment, then validated into typed values with every mistake named by its path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};
use serde::Deserialize;

use super::route::{ForwardKey, InFlight, KeySource, Route, TenantSource};
use crate::core::key::Normalize;
use crate::core::units::{parse_duration, parse_size};
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
    pub max_connections: Option<u64>,
    /// The admin listener.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Protected routes; first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Admin listener, `HOST:PORT`.
    pub listen: Option<String>,
    /// Name of the environment variable that holds the bearer token.
    pub token_env: Option<String>,
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

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
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
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawInFlight {
    /// `"reject"`.
    Word(String),
    /// `{ wait = "5s" }`.
    Wait {
        /// How long to wait.
        wait: String,
    },
}

/// `forward_key = "as-is" | "strip" | "odata"` or `{ header = "…" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawForwardKey {
    /// A keyword.
    Word(String),
    /// Rename the header.
    Header {
        /// The header the upstream receives the key in.
        header: String,
    },
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

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Upstream base URI.
    pub upstream: Uri,
    /// Store URL.
    pub store: String,
    /// Honour OData `Repeatability-*` headers.
    pub odata: bool,
    /// Admin listener and token.
    pub admin: AdminConfig,
    /// Budget for a client to send its headers and body.
    pub client_timeout: Duration,
    /// How long graceful shutdown waits.
    pub shutdown_grace: Duration,
    /// How often expired records are purged.
    pub purge_interval: Duration,
    /// At most this many client connections at once.
    pub max_connections: usize,
    /// Whether to start the demo upstream.
    pub demo: Demo,
    /// Protected routes, in order.
    pub routes: Vec<Route>,
}

/// The admin listener.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token, when one is configured.
    pub token: Option<String>,
    /// The variable the token was read from, for messages.
    pub token_env: String,
}

/// A configuration that cannot be used: every problem, each with its path.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// Reads a TOML file into the raw tree; errors name the file, the key path and the line.
pub fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(vec![format!("{}: cannot read: {e}", path.display())]))?;
    parse_toml(&text).map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))
}

/// Parses TOML text into a raw tree (this config's, or a flow's), naming the path and line of
/// a bad key.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().to_owned();
        let position =
            inner.span().map(|span| line_of(text, span.start)).map(|l| format!(" (line {l})")).unwrap_or_default();
        if path == "." { format!("{message}{position}") } else { format!("{path}: {message}{position}") }
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Collects problems while validating, so all of them are reported at once.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| self.0.push(format!("{path}: {e}"))).ok()
    }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("invalid address {s:?}; write HOST:PORT with an IP, e.g. \"127.0.0.1:8080\""))
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

/// The default cap on client connections: far above what one gateway serves at once on
/// a few cores, and within the file descriptors a service is usually given.
pub const MAX_CONNECTIONS: usize = 4096;

fn connection_cap(value: Option<u64>) -> Result<usize, String> {
    match value {
        None => Ok(MAX_CONNECTIONS),
        Some(n @ 1..=1_000_000) => Ok(n as usize),
        Some(n) => Err(format!("{n} is not between 1 and 1000000")),
    }
}

fn header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(s).map_err(|_| format!("invalid header name {s:?}"))
}

fn pointer(s: &str) -> Result<String, String> {
    if s.is_empty() || s.starts_with('/') {
        Ok(s.to_owned())
    } else {
        Err(format!("invalid JSON pointer {s:?}; it must start with '/', e.g. \"/order_id\""))
    }
}

fn pointers(list: Vec<String>) -> Result<Vec<String>, String> {
    list.iter().map(|p| pointer(p)).collect()
}

impl RawConfig {
    /// Validates the tree (after overrides) into a [`Config`].
    pub fn validate(self, overrides: &Overrides, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let text = |flag: &Option<String>, file: Option<String>, default: &str| {
            flag.clone().or(file).unwrap_or_else(|| default.to_owned())
        };
        let listen = p.check("listen", socket_addr(&text(&overrides.listen, self.listen, "127.0.0.1:8080")));
        let upstream =
            p.check("upstream", upstream_uri(&text(&overrides.upstream, self.upstream, "http://127.0.0.1:9000")));
        let store = text(&overrides.store, self.store, "sqlite://./idem.db");
        let admin_listen =
            p.check("admin.listen", socket_addr(&text(&overrides.admin_listen, self.admin.listen, "127.0.0.1:8081")));
        let token_env = self.admin.token_env.unwrap_or_else(|| "IDEM_ADMIN_TOKEN".into());
        let token = env(&token_env).filter(|t| !t.is_empty());
        if let Some(addr) = admin_listen {
            if !addr.ip().is_loopback() && token.is_none() {
                p.0.push(format!(
                    "admin.listen: {addr} is not a loopback address, so the admin API needs a bearer token: set {token_env}"
                ));
            }
        }
        let duration = |p: &mut Problems, path: &str, value: Option<String>, default: &str| {
            p.check(path, parse_duration(value.as_deref().unwrap_or(default)))
        };
        let client_timeout = duration(&mut p, "client_timeout", self.client_timeout, "30s");
        let shutdown_grace = duration(&mut p, "shutdown_grace", self.shutdown_grace, "30s");
        let purge_interval = duration(&mut p, "purge_interval", self.purge_interval, "60s");
        let max_connections = p.check("max_connections", connection_cap(self.max_connections));
        let raw_routes = if self.routes.is_empty() { vec![RawRoute::default()] } else { self.routes };
        let mut routes = Vec::new();
        let mut names = BTreeMap::new();
        for (i, raw) in raw_routes.into_iter().enumerate() {
            let path = format!("routes[{i}]");
            if let Some(route) = raw.validate(&path, &mut p) {
                if let Some(first) = names.insert(route.name.clone(), i) {
                    p.0.push(format!("{path}.name: {:?} is already the name of routes[{first}]", route.name));
                }
                routes.push(route);
            }
        }
        if !p.0.is_empty() {
            return Err(ConfigError(p.0));
        }
        match (listen, upstream, admin_listen, client_timeout, shutdown_grace, purge_interval, max_connections) {
            (
                Some(listen),
                Some(upstream),
                Some(admin_listen),
                Some(client_timeout),
                Some(shutdown_grace),
                Some(purge_interval),
                Some(max_connections),
            ) => Ok(Config {
                listen,
                upstream,
                store,
                odata: self.odata.unwrap_or(false),
                admin: AdminConfig { listen: admin_listen, token, token_env },
                client_timeout,
                shutdown_grace,
                purge_interval,
                max_connections,
                demo: overrides.demo,
                routes,
            }),
            _ => Err(ConfigError(vec!["invalid configuration".into()])),
        }
    }
}

impl RawRoute {
    fn validate(self, at: &str, p: &mut Problems) -> Option<Route> {
        let problems_before = p.0.len();
        let name = self.name.unwrap_or_else(|| "default".into());
        if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_graphic()) {
            p.0.push(format!("{at}.name: {name:?} must be 1-128 visible ASCII characters"));
        }
        let methods: Vec<Method> = self
            .methods
            .unwrap_or_else(|| vec!["POST".into(), "PATCH".into()])
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let upper = m.to_ascii_uppercase();
                let method = Method::from_bytes(upper.as_bytes()).map_err(|_| format!("invalid method {m:?}"));
                let method = method.and_then(|m| {
                    if m == Method::GET || m == Method::HEAD {
                        Err(format!("{m} is never claimed: GET and HEAD are safe and pass through"))
                    } else {
                        Ok(m)
                    }
                });
                p.check(&format!("{at}.methods[{i}]"), method)
            })
            .collect();
        let glob = self.path.unwrap_or_else(|| "/**".into());
        let matcher = p.check(
            &format!("{at}.path"),
            globset::GlobBuilder::new(&glob)
                .literal_separator(true)
                .build()
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("invalid glob {glob:?}: {e}")),
        );
        let duration = |p: &mut Problems, key: &str, value: Option<String>, default: &str| {
            p.check(&format!("{at}.{key}"), parse_duration(value.as_deref().unwrap_or(default)))
        };
        let ttl = duration(p, "ttl", self.ttl, "24h");
        let lease = duration(p, "lease", self.lease, "30s");
        let upstream_timeout = duration(p, "upstream_timeout", self.upstream_timeout, "30s");
        if lease.is_some_and(|l| l < Duration::from_millis(100)) {
            p.0.push(format!("{at}.lease: must be at least 100ms"));
        }
        let size = |p: &mut Problems, key: &str, value: Option<String>, default: &str| {
            p.check(&format!("{at}.{key}"), parse_size(value.as_deref().unwrap_or(default)))
        };
        let max_body = size(p, "max_body", self.max_body, "1MiB");
        let max_stored_response = size(p, "max_stored_response", self.max_stored_response, "1MiB");
        let raw_key = self.key.unwrap_or_default();
        let required = raw_key.required.unwrap_or(false);
        let normalize = raw_key.normalize.unwrap_or_default();
        let key = match (raw_key.header, raw_key.body, raw_key.fingerprint) {
            (Some(h), None, None | Some(false)) => {
                p.check(&format!("{at}.key.header"), header_name(&h)).map(KeySource::Header)
            }
            (None, Some(b), None | Some(false)) => {
                p.check(&format!("{at}.key.body"), pointers(b.into_vec())).map(KeySource::Body)
            }
            (None, None, Some(true)) => Some(KeySource::Fingerprint),
            (None, None, None | Some(false)) => Some(KeySource::Header(HeaderName::from_static("idempotency-key"))),
            _ => {
                p.0.push(format!("{at}.key: give exactly one of header, body or fingerprint = true"));
                None
            }
        };
        let raw_fp = self.fingerprint.unwrap_or_default();
        let fp_headers = raw_fp.headers.unwrap_or_else(|| vec!["content-type".into()]);
        let fp_headers: Vec<String> = fp_headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                p.check(&format!("{at}.fingerprint.headers[{i}]"), header_name(h)).map(|h| h.as_str().to_owned())
            })
            .collect();
        let include = p.check(&format!("{at}.fingerprint.include"), pointers(raw_fp.include.unwrap_or_default()));
        let exclude = p.check(&format!("{at}.fingerprint.exclude"), pointers(raw_fp.exclude.unwrap_or_default()));
        let tenant = match self.tenant.and_then(|t| t.header) {
            Some(h) => p.check(&format!("{at}.tenant.header"), header_name(&h)).map(TenantSource::Header),
            None => Some(TenantSource::Credential),
        };
        let in_flight = match self.in_flight {
            None => Some(InFlight::Reject),
            Some(RawInFlight::Word(w)) if w == "reject" => Some(InFlight::Reject),
            Some(RawInFlight::Word(w)) => {
                p.0.push(format!("{at}.in_flight: {w:?} is not \"reject\" or {{ wait = \"5s\" }}"));
                None
            }
            Some(RawInFlight::Wait { wait }) => duration(p, "in_flight.wait", Some(wait), "").map(InFlight::Wait),
        };
        let forward_key = match self.forward_key {
            None => Some(ForwardKey::AsIs),
            Some(RawForwardKey::Word(w)) => match w.as_str() {
                "as-is" => Some(ForwardKey::AsIs),
                "strip" => Some(ForwardKey::Strip),
                "odata" => Some(ForwardKey::OData),
                _ => {
                    p.0.push(format!(
                        "{at}.forward_key: {w:?} is not \"as-is\", \"strip\", \"odata\" or {{ header = \"…\" }}"
                    ));
                    None
                }
            },
            Some(RawForwardKey::Header { header }) => {
                p.check(&format!("{at}.forward_key.header"), header_name(&header)).map(ForwardKey::Rename)
            }
        };
        let denylist: Vec<HeaderName> = self
            .replay_header_denylist
            .unwrap_or_else(|| vec!["set-cookie".into()])
            .iter()
            .enumerate()
            .filter_map(|(i, h)| p.check(&format!("{at}.replay_header_denylist[{i}]"), header_name(h)))
            .collect();
        if p.0.len() > problems_before {
            return None;
        }
        Some(Route {
            name,
            methods,
            path: glob,
            matcher: matcher?,
            ttl: ttl?,
            key: key?,
            required,
            normalize,
            fingerprint: FingerprintSpec { headers: fp_headers, include: include?, exclude: exclude? },
            tenant: tenant?,
            in_flight: in_flight?,
            lease: lease?,
            upstream_timeout: upstream_timeout?,
            on_unknown: self.on_unknown.unwrap_or_default(),
            store_server_errors: self.store_server_errors.unwrap_or(false),
            forward_key: forward_key?,
            max_body: max_body?,
            max_stored_response: max_stored_response?,
            replay_denylist: denylist,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(config.odata);
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
}
