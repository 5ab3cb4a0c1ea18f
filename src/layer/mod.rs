//! idem as a tower [`Layer`]: the gateway's request handling — routes, keys, fingerprints,
//! the decision table, headers, problem types, metrics and stores — in front of any HTTP
//! [`Service`](tower::Service) (an axum router, a hyper service). `idem gateway` is this
//! layer over its proxy; a Rust service puts it over its own handlers.
//!
//! [`Idem`] is the entry: a store, a clock and, on PostgreSQL, the means to claim inside a
//! transaction. [`Idem::layer`] builds an [`IdemLayer`] from [`Route`]s (written with
//! [`RouteBuilder`] or read from `[[routes]]` TOML by [`routes_from_toml`]); [`Idem::run_once`]
//! serves code that is not an HTTP handler. This file holds the configuration; the logic
//! is in `service.rs`, as tower-http lays its middlewares out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tower::Layer;

pub mod answer;
pub mod body;
pub mod config;
mod extract;
mod identify;
pub mod odata;
pub mod problem;
pub mod reconcile;
pub mod route;
mod run_once;
mod service;
#[cfg(test)]
mod tests;
mod verify;

pub use config::{RouteBuilder, routes_from_toml};
pub use extract::TxMissing;
pub use route::{Route, RouteTable};
pub use run_once::{Done, Jobs, RunOnceError};
pub use service::{Delivery, Failure, IdemService, MatchedRoute};

pub use crate::store::postgres::transaction::Tx;

use crate::metrics::{RouteMetrics, StoreMetrics};
use crate::store::clock::Clock;
use crate::store::postgres::transaction::Transactional;
use crate::store::{self, Store};
use identify::Unmatched;

/// idem for one service: where records live and how "now" is read. Cheap to clone.
#[derive(Clone)]
pub struct Idem {
    store: Arc<dyn Store>,
    /// Present on PostgreSQL: claims then run inside a transaction the handler writes in.
    transactional: Option<Transactional>,
    clock: Clock,
    jobs: Jobs,
}

impl Idem {
    /// Opens the store `url` names (`postgres://…`, `sqlite://…`, `redis://…`, `memory://`).
    /// On PostgreSQL the layer and [`Self::run_once`] are transactional: the claim, the
    /// handler's writes and the answer commit together. Elsewhere the layer gives the
    /// gateway's guarantee (at most once, or an explicit `outcome_unknown`).
    pub async fn open(url: &str) -> Result<Self, store::Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let (transactional, store) = Transactional::open(url).await?;
            return Ok(Self { transactional: Some(transactional), ..Self::with_store(store) });
        }
        Ok(Self::with_store(store::open(url).await?))
    }

    /// idem on a store already open; never transactional.
    pub fn with_store(store: Arc<dyn Store>) -> Self {
        Self { store, transactional: None, clock: Clock::System, jobs: Jobs::default() }
    }

    /// Reads time from `clock` (e.g. [`Clock::tokio`] in tests under `tokio::time::pause`).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The settings [`Self::run_once`] claims with.
    pub fn with_jobs(mut self, jobs: Jobs) -> Self {
        self.jobs = jobs;
        self
    }

    /// True when claims run inside a PostgreSQL transaction.
    pub fn is_transactional(&self) -> bool {
        self.transactional.is_some()
    }

    /// The record store, for reads and for the admin API.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// A layer over this store; add routes, then [`LayerBuilder::build`].
    pub fn layer(&self) -> LayerBuilder {
        LayerBuilder {
            idem: self.clone(),
            routes: Vec::new(),
            odata: odata::Repeatable::Ignored,
            client_timeout: Duration::from_secs(30),
        }
    }
}

/// Builds an [`IdemLayer`].
pub struct LayerBuilder {
    idem: Idem,
    routes: Vec<Route>,
    odata: odata::Repeatable,
    client_timeout: Duration,
}

impl LayerBuilder {
    /// Protects the requests `route` matches; routes are tried in the order added.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Protects several routes, in order.
    pub fn routes(mut self, routes: impl IntoIterator<Item = Route>) -> Self {
        self.routes.extend(routes);
        self
    }

    /// Whether OData `Repeatability-*` headers are honoured (off by default).
    pub fn odata(mut self, odata: odata::Repeatable) -> Self {
        self.odata = odata;
        self
    }

    /// How long a client may take to send a protected request's body (30 s by default).
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = timeout;
        self
    }

    /// The layer; refused when there is no route or two routes share a name.
    pub fn build(self) -> Result<IdemLayer, crate::config::Error> {
        let mut p = crate::config::Problems::default();
        if self.routes.is_empty() {
            p.push("routes", "give at least one route");
        }
        let mut names = BTreeMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(first) = names.insert(route.name.as_str(), i) {
                p.push(
                    &format!("routes[{i}].name"),
                    format_args!("{:?} is already the name of routes[{first}]", route.name),
                );
            }
        }
        p.finish(crate::config::Kind::Gateway, Some(()))?;
        let routes = RouteTable::new(self.routes);
        let shared = Shared {
            route_metrics: routes.iter().map(|r| RouteMetrics::new(&r.name)).collect(),
            unmatched: Unmatched::new(&routes),
            routes,
            unrouted: RouteMetrics::new(""),
            store_metrics: StoreMetrics::default(),
            store: self.idem.store,
            transactional: self.idem.transactional,
            odata: self.odata,
            client_timeout: self.client_timeout,
            clock: self.idem.clock,
            tasks: TaskTracker::new(),
        };
        Ok(IdemLayer { shared: Arc::new(shared) })
    }
}

/// The idem middleware's configuration, shared by every [`IdemService`] it makes.
#[derive(Clone)]
pub struct IdemLayer {
    shared: Arc<Shared>,
}

impl IdemLayer {
    /// The protected routes, in matching order.
    pub fn routes(&self) -> &RouteTable {
        &self.shared.routes
    }

    /// The lookups of the routes that have one (`verify`), by route name, each with its
    /// route's `upstream_timeout` and `lease`: what [`reconcile::reconcile`] and the admin API settle with.
    pub fn lookups(&self) -> crate::verify::Lookups {
        let mut lookups = crate::verify::Lookups::default();
        for route in self.shared.routes.iter() {
            if let Some(lookup) = &route.verify {
                lookups.insert(route.name.clone(), lookup.clone(), route.upstream_timeout, route.lease);
            }
        }
        lookups
    }

    /// The clock the layer's records are written with.
    pub fn clock(&self) -> crate::store::clock::Clock {
        self.shared.clock
    }

    /// Where claimed requests run, detached from their client's connection. For a graceful
    /// shutdown, `close` it and `wait` for it after the listener stopped accepting: every
    /// claimed request then has its outcome recorded.
    pub fn tasks(&self) -> &TaskTracker {
        &self.shared.tasks
    }
}

impl<S> Layer<S> for IdemLayer {
    type Service = IdemService<S>;

    fn layer(&self, inner: S) -> IdemService<S> {
        IdemService::new(inner, self.shared.clone())
    }
}

/// Everything a request needs, built once.
struct Shared {
    routes: RouteTable,
    /// Metric handles, one per route in table order.
    route_metrics: Vec<RouteMetrics>,
    /// Metric handles for requests no route protects.
    unrouted: RouteMetrics,
    store_metrics: StoreMetrics,
    store: Arc<dyn Store>,
    transactional: Option<Transactional>,
    odata: odata::Repeatable,
    client_timeout: Duration,
    clock: Clock,
    /// Claimed requests run here, detached from their client's connection, so a client
    /// that goes away never cancels the inner call or leaves its record unfinished.
    tasks: TaskTracker,
    /// Keyed requests that matched no route, warned about once per pattern.
    unmatched: Unmatched,
}
