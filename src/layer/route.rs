//! Protected routes: which requests are claimed, and how each route derives its key,
//! tenant and fingerprint.

use std::sync::Arc;
use std::time::Duration;

use globset::GlobMatcher;
use http::Method;
use http::header::HeaderName;

use crate::core::key::Normalize;
use crate::core::{ClaimPolicy, FingerprintSpec, OnUnknown};

/// One protected route: the scope of its records and every per-route policy.
#[derive(Clone, Debug)]
pub struct Route {
    /// The scope of the route's records.
    pub name: String,
    /// Protected methods (never GET or HEAD).
    pub methods: Vec<Method>,
    /// The path glob as written (for messages).
    pub path: String,
    /// The compiled glob: `*` stays within a path segment, `**` crosses segments.
    pub matcher: GlobMatcher,
    /// How long a record is remembered.
    pub ttl: Duration,
    /// Where the key comes from.
    pub key: KeySource,
    /// Refuse requests without a key (`400`) instead of passing them through.
    pub required: bool,
    /// Key normalisation.
    pub normalize: Normalize,
    /// What the fingerprint covers.
    pub fingerprint: FingerprintSpec,
    /// Where the tenant comes from.
    pub tenant: TenantSource,
    /// What a duplicate gets while the first is in flight.
    pub in_flight: InFlight,
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// The route's own upstream; `None` forwards to the gateway's `upstream`.
    pub upstream: Option<http::Uri>,
    /// Budget for the upstream exchange, body included.
    pub upstream_timeout: Duration,
    /// What an unknown outcome turns into.
    pub on_unknown: OnUnknown,
    /// Treat `5xx` answers as final.
    pub store_server_errors: bool,
    /// How the key reaches the upstream.
    pub forward_key: ForwardKey,
    /// Largest request body accepted (`413` above).
    pub max_body: u64,
    /// Largest answer kept for replay; a larger one is delivered once, then `410`.
    pub max_stored_response: u64,
    /// Response headers never stored or replayed.
    pub replay_denylist: Vec<HeaderName>,
    /// The lookup that settles this route's unknown outcomes (`verify = { … }`).
    pub verify: Option<Arc<crate::verify::Lookup>>,
}

impl Route {
    /// The decision policy of this route.
    pub fn policy(&self) -> ClaimPolicy {
        ClaimPolicy {
            on_unknown: self.on_unknown,
            on_change: crate::core::OnChange::Reject,
            replays: crate::core::Replays::Count,
            lookup: if self.verify.is_some() { crate::core::Lookup::Configured } else { crate::core::Lookup::None },
        }
    }

    /// True when this route protects the request.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.matcher.is_match(path)
    }
}

/// Where a route's key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A request header (default `Idempotency-Key`).
    Header(HeaderName),
    /// JSON pointers into the body: a natural business key or an event id.
    Body(Vec<String>),
    /// The request fingerprint itself: identical requests are one intent.
    Fingerprint,
}

/// Where a route's tenant comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantSource {
    /// A header; without it, the credential hash is used.
    Header(HeaderName),
    /// A hash of `Authorization`.
    Credential,
}

/// What a duplicate gets while the first request is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InFlight {
    /// `409` with `Retry-After`.
    Reject,
    /// Wait up to this long for the first to finish, then replay (or `409`).
    Wait(Duration),
}

/// How the key reaches the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardKey {
    /// Headers go upstream unchanged.
    AsIs,
    /// The key header (and `Repeatability-*`) are removed.
    Strip,
    /// The key is sent in this header instead.
    Rename(HeaderName),
    /// The key becomes `Repeatability-Request-ID` + `Repeatability-First-Sent`.
    OData,
}

/// The routes in order; the first that matches method and path wins.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// A table over routes in configuration order.
    pub fn new(routes: Vec<Route>) -> Self {
        Self { routes: routes.into_iter().map(Arc::new).collect() }
    }

    /// The route protecting a request, if any, with its position in the table.
    pub fn find(&self, method: &Method, path: &str) -> Option<(usize, &Arc<Route>)> {
        if method == Method::GET || method == Method::HEAD {
            return None;
        }
        self.routes.iter().enumerate().find(|(_, r)| r.matches(method, path))
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().map(|r| r.as_ref())
    }
}
