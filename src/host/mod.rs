//! What every long-running entry point (`idem gateway`, `idem consume`, and `idem run`
//! for its store) needs around its own work, written once: opening the store (waiting for
//! a networked one that is not up yet), the retention purge, serving HTTP listeners with
//! their limits (the admin API among them), turning the shutdown signal into a token, and
//! the [`Error`] whose exit code the binary reports.
//!
//! **Boundary:** knows the store, the admin API and HTTP serving; never a product's
//! decisions (no route, flow or broker here), so `gateway`, `runner` and `consumer` all
//! depend on it and it depends on none of them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod error;
pub mod listener;
mod purge;

pub use error::Error;
pub use listener::Limits;
pub use purge::{PURGE_BATCH, purge_all, purge_loop};

use crate::backoff::Backoff;
use crate::store::{self, Store};

/// How many connections an admin listener takes at once by default: operators, probes
/// and scrapers, not traffic.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A token cancelled when `shutdown` resolves (SIGTERM, Ctrl-C, or a test's signal).
pub fn cancel_on(shutdown: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    token
}

/// Opens the store. A networked store that is down at start-up is waited for, with
/// backoff and a log line per attempt; `None` when `stopping` came first. A store that
/// cannot be opened for another reason is an error naming it (password redacted).
pub async fn open_store(url: &str, stopping: &CancellationToken) -> Result<Option<Arc<dyn Store>>, Error> {
    open_with(url, stopping, |url| async move { store::open(&url).await }).await
}

/// [`open_store`] with another opener (e.g. the transactional PostgreSQL store).
pub async fn open_with<T, F, Fut>(url: &str, stopping: &CancellationToken, open: F) -> Result<Option<T>, Error>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, store::Error>>,
{
    let mut pause = Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match open(url.to_owned()).await {
            Ok(store) => return Ok(Some(store)),
            Err(error) if error.is_retryable() && store::is_networked(url) => {
                tracing::warn!(store = %store::redact(url), %error, retry_in = ?pause.peek(), "store unreachable at start-up; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause.next_pause()) => {}
                    () = stopping.cancelled() => return Ok(None),
                }
            }
            Err(error) => return Err(Error::from(error).context(format!("cannot open store {}", store::redact(url)))),
        }
    }
}

/// Re-reads a listener's certificate and key on every SIGHUP until `stop`, so a renewed
/// certificate needs no restart. A file that cannot be used is logged and the certificate
/// in use stays in use.
pub async fn reload_on_hangup(tls: Arc<crate::tls::ServerTls>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return tracing::warn!("cannot listen for SIGHUP: the certificate is read at start-up only");
    };
    loop {
        tokio::select! {
            Some(()) = hangups.recv() => match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(error) => tracing::error!(%error, "SIGHUP: certificate not reloaded; the one in use stays"),
            },
            () = stop.cancelled() => return,
        }
    }
}

/// Binds a listener, naming what it is for in the error.
pub async fn bind(address: std::net::SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|e| Error::failed(format!("{what}: cannot listen on {address}"), e))
}

/// Serves the admin API on `listener` until `stop` is cancelled.
pub fn serve_admin(
    listener: TcpListener,
    admin: crate::admin::Admin,
    max_connections: usize,
    stop: CancellationToken,
) -> JoinHandle<()> {
    use tower::ServiceExt;
    let router = crate::admin::router(Arc::new(admin));
    let limits = Limits {
        max_connections,
        header_read_timeout: Duration::from_secs(30),
        // The admin API's calls are short; a stop does not wait long for them.
        grace: Duration::from_secs(5),
    };
    tokio::spawn(async move {
        let service = move |_peer| {
            let router = router.clone();
            hyper::service::service_fn(move |request| router.clone().oneshot(request))
        };
        listener::serve(listener, "admin", limits, None, service, stop.cancelled_owned()).await;
    })
}
