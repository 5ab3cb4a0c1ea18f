//! `idem gateway`: a reverse proxy that gives any HTTP API the idempotency of SPEC §2–§4.
//!
//! `config` turns TOML and flags into typed routes; `service` makes each request's
//! decision through the store and the core; `upstream` talks to the protected API;
//! `server` owns the listener; `problem` is every error answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod body;
pub mod config;
pub mod odata;
pub mod problem;
pub mod route;
pub mod server;
pub mod service;
pub mod upstream;

pub use config::Config;
pub use service::Gateway;

use crate::backoff::Backoff;
use crate::store::{self, Store, now_millis};

/// How many expired records one purge statement removes: small enough that the writer
/// is never held for long, so traffic does not stall behind retention.
pub const PURGE_BATCH: usize = 500;

/// Runs the gateway until `shutdown` resolves. With `demo`, a demo upstream is started
/// on the upstream address first. `ready` receives the bound addresses.
pub async fn run(
    config: Config,
    demo: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr, std::net::SocketAddr),
) -> anyhow::Result<()> {
    let metrics = crate::metrics::install();
    let stopping = CancellationToken::new();
    let on_signal = stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.cancel();
    });
    if demo {
        let address = config.upstream.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let listener =
            TcpListener::bind(&address).await.with_context(|| format!("demo upstream: cannot listen on {address}"))?;
        tokio::spawn(crate::demo::serve(listener));
    }
    let Some(store) = open_store(&config.store, &stopping).await? else { return Ok(()) };
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot listen on {}", config.admin.listen))?;
    let gateway = Arc::new(Gateway::new(
        route::RouteTable::new(config.routes.clone()),
        store.clone(),
        upstream::Upstream::new(config.upstream.clone()),
        config.odata,
        config.client_timeout,
    ));
    let admin_address = admin_listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(purge_loop(store.clone(), config.purge_interval, stop.clone()));
    let admin = crate::admin::Admin { store: store.clone(), metrics, token: config.admin.token.clone() };
    let admin_stop = stop.clone();
    let admin_server = tokio::spawn(async move {
        let router = crate::admin::router(Arc::new(admin));
        axum::serve(admin_listener, router).with_graceful_shutdown(admin_stop.cancelled_owned()).await
    });
    ready(listener.local_addr()?, admin_address);
    tracing::info!(
        listen = %listener.local_addr()?, upstream = %config.upstream, store = %store::redact(&config.store),
        admin = %admin_address, routes = config.routes.len(), "idem gateway ready"
    );
    server::serve(listener, gateway, config.client_timeout, config.shutdown_grace, stopping.cancelled_owned()).await;
    stop.cancel();
    let _ = admin_server.await;
    tracing::info!("idem gateway stopped");
    Ok(())
}

/// Opens the store. A networked store that is down at start-up is waited for, with
/// backoff and a log line per attempt; `None` when shutdown came first.
pub(crate) async fn open_store(url: &str, stopping: &CancellationToken) -> anyhow::Result<Option<Arc<dyn Store>>> {
    let mut pause = Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match store::open(url).await {
            Ok(store) => return Ok(Some(store)),
            Err(error) if error.is_retryable() && store::is_networked(url) => {
                tracing::warn!(store = %store::redact(url), %error, retry_in = ?pause.peek(), "store unreachable at start-up; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = stopping.cancelled() => return Ok(None),
                }
            }
            Err(error) => return Err(error).with_context(|| format!("cannot open store {}", store::redact(url))),
        }
    }
}

/// Removes expired records in small batches, then refreshes the record gauges. Counting
/// records can mean reading a whole table, so after a count the next one waits a hundred
/// times as long as it took: a count that takes 1 s runs at most every 100 s.
pub(crate) async fn purge_loop(store: Arc<dyn Store>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_count = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let removed = purge_all(store.as_ref(), &stop).await;
        if removed > 0 {
            tracing::info!(removed, "purged expired records");
        }
        if tokio::time::Instant::now() < next_count {
            continue;
        }
        let started = tokio::time::Instant::now();
        match store.stats().await {
            Ok(stats) => crate::metrics::set_records(&stats),
            Err(error) => tracing::warn!(%error, "could not read record counts"),
        }
        next_count = started + started.elapsed() * 100;
    }
}

/// Purges every expired record, one small batch at a time, yielding between batches.
pub async fn purge_all(store: &dyn Store, stop: &CancellationToken) -> u64 {
    let mut removed = 0;
    while !stop.is_cancelled() {
        match store.purge_expired(now_millis(), PURGE_BATCH).await {
            Ok(n) => {
                removed += n;
                if (n as usize) < PURGE_BATCH {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => {
                tracing::warn!(%error, "purge failed; will try again");
                break;
            }
        }
    }
    removed
}
