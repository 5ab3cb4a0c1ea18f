//! The gateway's configuration: one serde tree read from TOML, overridden by flags and
//! environment, then validated into typed values with every mistake named by its path.
//!
//! The reading, the checks and the `[admin]` table are the shared [`crate::config`] toolkit's;
//! the `[[routes]]` are the layer's ([`crate::layer::config`]); this file holds what only
//! the gateway has: its listener, upstream, store and timing keys and their defaults.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::config::{self, Admin, Kind, Problems, RawAdmin, check};
use crate::layer::config::{RawRoute, validate_routes};
use crate::layer::odata;
use crate::layer::route::Route;

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
    pub odata: odata::Repeatable,
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
            p.check("upstream", check::upstream(&text(&overrides.upstream, self.upstream, "http://127.0.0.1:9000")));
        let store = text(&overrides.store, self.store, "sqlite://./idem.db");
        let admin = RawAdmin { listen: overrides.admin_listen.clone().or(self.admin.listen), ..self.admin };
        let admin = admin.validate(Some("127.0.0.1:8081"), env, &mut p);
        let client_timeout = p.duration("client_timeout", self.client_timeout.as_deref(), "30s");
        let shutdown_grace = p.duration("shutdown_grace", self.shutdown_grace.as_deref(), "30s");
        let purge_interval = p.duration("purge_interval", self.purge_interval.as_deref(), "60s");
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
                    odata::Repeatable::Honoured
                } else {
                    odata::Repeatable::Ignored
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;
    use http::header::HeaderName;

    use super::*;
    use crate::config::parse_toml;
    use crate::core::OnUnknown;
    use crate::core::key::Normalize;
    use crate::layer::route::{ForwardKey, InFlight, KeySource};

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
        assert_eq!(config.odata, crate::layer::odata::Repeatable::Honoured);
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
