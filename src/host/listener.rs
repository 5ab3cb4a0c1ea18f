//! Serving HTTP on a listener, for the gateway and every admin API: HTTP/1.1 and HTTP/2
//! (prior knowledge, or ALPN under TLS) on one port, TLS when a certificate is given, a
//! cap on open connections, a header read timeout against slow clients (it also bounds a
//! TLS handshake), and graceful shutdown.
//!
//! Past `max_connections` the listener stops accepting: a new connection waits in the
//! kernel's listen backlog (its TCP handshake completes, its request is not read) until an
//! open one closes, and is then served. Nothing is refused, so a burst costs latency, not
//! errors, and the process never runs out of file descriptors mid-request. Whenever the
//! cap is reached after a time below it, a warning names the listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::tls::ServerTls;

/// A listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// At most this many client connections at once; see the module docs for what
    /// happens past it.
    pub max_connections: usize,
    /// How long a client may take to send a request's head.
    pub header_read_timeout: Duration,
    /// How long open requests may take to finish once shutdown began.
    pub grace: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves `listener` until `shutdown` resolves, over TLS when `tls` is given; `service`
/// makes the service of each connection from its peer's address. Then it stops accepting
/// and lets the open connections finish their requests, for up to `limits.grace`.
pub async fn serve<S, B>(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    tls: Option<Arc<ServerTls>>,
    service: impl Fn(SocketAddr) -> S,
    shutdown: impl Future<Output = ()>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Set while the cap is reached, so that each time it is reached is logged once.
    let mut at_cap = false;
    tokio::pin!(shutdown);
    loop {
        let slot = match open.clone().try_acquire_owned() {
            Ok(slot) => {
                at_cap = false;
                slot
            }
            Err(_) => {
                if !at_cap {
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection cap reached: new connections wait until one closes"
                    );
                    at_cap = true;
                }
                tokio::select! {
                    slot = open.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service(peer);
        match &tls {
            None => {
                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(listener = name, %error, "client connection ended with an error");
                    }
                    drop(slot);
                });
            }
            Some(tls) => {
                // The handshake runs in the connection's task, so a slow client never holds
                // up the accept loop; it gets the header read timeout to finish.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            return tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                        }
                        Err(_) => return tracing::debug!(listener = name, %peer, "TLS handshake timed out"),
                    };
                    let connection =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                    if let Err(error) = connection.await {
                        tracing::debug!(listener = name, %error, "client connection ended with an error");
                    }
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = name, "some connections were still open after the grace period");
    }
}
