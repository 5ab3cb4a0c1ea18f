//! `idem gateway`: a reverse proxy that gives any HTTP API the idempotency of SPEC §2–§4.
//!
//! The gateway is the idem layer ([`crate::layer`]) over a proxy: `config` turns TOML and
//! flags into typed settings (the `[[routes]]` are the layer's); `proxy` is the inner
//! service that forwards to the protected API through `upstream`'s pooled client. The
//! listener is served by [`crate::host::listener`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

pub mod config;
pub mod proxy;
#[cfg(test)]
mod store_faults;
#[cfg(test)]
mod tests;
pub mod upstream;

pub use config::{Config, Demo};

use crate::host::{self, Error, Limits};
use crate::layer::body::{Body, BoxError};
use crate::layer::{Idem, IdemLayer, IdemService};
use crate::store::{self, Store};
use crate::tls::ServerTls;
use proxy::Proxy;

/// The gateway: the idem layer over the proxy, shared by every connection.
pub struct Gateway {
    layer: IdemLayer,
    service: IdemService<Proxy>,
    proxy: Proxy,
}

impl Gateway {
    /// The gateway `config` describes, on `store`. Fails only when the TLS roots cannot be
    /// loaded (an unreadable `SSL_CERT_FILE`).
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Result<Self, crate::tls::Error> {
        let layer = Idem::with_store(store)
            .layer()
            .routes(config.routes.iter().cloned())
            .odata(config.odata)
            .client_timeout(config.client_timeout)
            .build()
            .expect("a validated configuration has unique, non-empty routes");
        let proto = HeaderValue::from_static(if config.tls.is_some() { "https" } else { "http" });
        let proxy = Proxy::new(config.upstream.clone(), layer.routes(), proto)?;
        let service = tower::Layer::layer(&layer, proxy.clone());
        Ok(Self { layer, service, proxy })
    }

    /// Answers one client request (`peer`: the client's address, for `X-Forwarded-For`).
    pub async fn handle<B>(&self, mut request: Request<B>, peer: Option<SocketAddr>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some(peer) = peer {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        match self.service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    /// The route table as the admin API shows it (`GET /v1/routes`): each route's name,
    /// methods, path glob and upstream, in matching order. Also logs each route and
    /// publishes `idem_route_upstream`.
    pub fn publish_routes(&self) -> Vec<serde_json::Value> {
        self.layer
            .routes()
            .iter()
            .zip(self.proxy.route_upstreams())
            .map(|(route, upstream)| {
                let upstream = upstream.base().to_string();
                tracing::info!(route = %route.name, path = %route.path, upstream = %upstream, "route");
                crate::metrics::set_route_upstream(&route.name, &upstream);
                let methods: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
                serde_json::json!({ "name": route.name, "methods": methods, "path": route.path, "upstream": upstream })
            })
            .collect()
    }

    /// The detached executions, for graceful shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        self.layer.tasks()
    }
}

/// Runs the gateway until `shutdown` resolves: opens the store, binds the client and
/// admin listeners, prints the ready line, serves, and on shutdown stops accepting, lets
/// open requests finish (up to `shutdown_grace`) and waits for every detached execution
/// to record its outcome.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let metrics = crate::metrics::install();
    let stopping = host::cancel_on(shutdown);
    if config.demo == Demo::StartUpstream {
        start_demo_upstream(&config).await?;
    }
    let tls = listener_tls(&config)?;
    let Some(store) = host::open_store(&config.store, &stopping).await? else { return Ok(()) };
    let listener = host::bind(config.listen, "gateway").await?;
    let admin_listener = host::bind(config.admin.listen, "admin").await?;
    let listen = listener.local_addr().map_err(|e| Error::failed("gateway listener", e))?;
    let admin_address = admin_listener.local_addr().map_err(|e| Error::failed("admin listener", e))?;
    let gateway = Arc::new(Gateway::new(&config, store.clone()).map_err(|e| Error::BadInput(e.into()))?);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(host::purge_loop(store.clone(), config.purge_interval, stop.clone()));
    let routes = gateway.publish_routes();
    let lookups = gateway.layer.lookups();
    tokio::spawn(crate::layer::reconcile::reconcile(
        store.clone(),
        lookups.clone(),
        gateway.layer.clock(),
        stop.clone(),
    ));
    let admin = crate::admin::Admin { store, metrics, token: config.admin.token.clone(), routes, lookups };
    let admin_server = host::serve_admin(admin_listener, admin, host::ADMIN_MAX_CONNECTIONS, stop.clone());
    if let Some(tls) = &tls {
        tokio::spawn(host::reload_on_hangup(tls.clone(), stopping.clone()));
    }
    announce(&config, listen, admin_address);
    tracing::info!(
        listen = %listen, upstream = %config.upstream, store = %store::redact(&config.store),
        admin = %admin_address, routes = config.routes.len(), max_connections = config.max_connections,
        "idem gateway ready"
    );
    let limits = Limits {
        max_connections: config.max_connections,
        header_read_timeout: config.client_timeout,
        grace: config.shutdown_grace,
    };
    let serving = gateway.clone();
    let service = move |peer: SocketAddr| {
        let gateway = serving.clone();
        hyper::service::service_fn(move |request| {
            let gateway = gateway.clone();
            async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, Some(peer)).await) }
        })
    };
    host::listener::serve(listener, "gateway", limits, tls, service, stopping.cancelled_owned()).await;
    tracing::info!("shutting down: waiting for detached executions to record their outcomes");
    gateway.tasks().close();
    gateway.tasks().wait().await;
    stop.cancel();
    let _ = admin_server.await;
    tracing::info!("idem gateway stopped");
    Ok(())
}

/// `--demo`: the demo upstream on the upstream's address.
async fn start_demo_upstream(config: &Config) -> Result<(), Error> {
    let address = config.upstream.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|e| Error::failed(format!("demo upstream: cannot listen on {address}"), e))?;
    tokio::spawn(crate::demo::serve(listener));
    Ok(())
}

/// The client listener's certificate, read before anything starts: a file that cannot be
/// used is bad input.
fn listener_tls(config: &Config) -> Result<Option<Arc<ServerTls>>, Error> {
    let Some(files) = &config.tls else { return Ok(None) };
    let tls =
        ServerTls::load(&files.cert, &files.key).map_err(|e| Error::BadInput(anyhow::Error::new(e).context("tls")))?;
    Ok(Some(Arc::new(tls)))
}

/// The ready line (tests and scripts wait for it), and the quick start's hints.
fn announce(config: &Config, listen: SocketAddr, admin: SocketAddr) {
    let upstream = &config.upstream;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    println!("idem gateway listening on {scheme}://{listen} (admin http://{admin}), forwarding to {upstream}");
    if config.demo == Demo::StartUpstream {
        println!("demo upstream: {upstream} — try it:");
        println!(
            "  curl -si -X POST http://{listen}/orders -H 'Idempotency-Key: order-1' -H 'Content-Type: application/json' -d '{{\"amount\": 42}}'"
        );
        println!(
            "  (run it twice: the second answer is a replay; the demo counted one call: curl -s {upstream}_demo/stats)"
        );
    }
}
