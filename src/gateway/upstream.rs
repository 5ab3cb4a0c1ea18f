//! The connection to the protected API: a pooled client (HTTP/1.1, or HTTP/2 where an
//! `https://` upstream offers it by ALPN; TLS from [`crate::tls`], always verified), URI
//! rewriting, hop-by-hop header handling, and the one distinction idempotency depends on —
//! was the request sent or not? A TLS handshake that fails is "not sent": the request
//! never left.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use crate::layer::answer::strip_hop_by_hop;
use crate::layer::body::Body;

/// How an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The request never left: the connection could not be made. Retrying is safe.
    #[error("upstream not reached: {0}")]
    NotSent(String),
    /// The request was (or may have been) sent, but no complete answer came back.
    #[error("upstream answer lost: {0}")]
    Lost(String),
}

/// A request hyper handed back without writing it (its pooled connection closed first).
fn never_written(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The pooled upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    base: Uri,
    /// The base URI's path without a trailing slash ("" for none), prefixed to every path.
    prefix: String,
}

impl Upstream {
    /// A client for `base` (`http://` or `https://HOST[:PORT][/prefix]`). Fails only when
    /// the TLS roots cannot be loaded (an unreadable `SSL_CERT_FILE`).
    pub fn new(base: Uri) -> Result<Self, crate::tls::Error> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        // The TCP connector must accept https:// URIs; the TLS layer wraps them.
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config()?.as_ref().clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let prefix = base.path().trim_end_matches('/').to_owned();
        Ok(Self { client, base, prefix })
    }

    /// The same pooled client in front of another base URI (a route's own upstream).
    pub fn at(&self, base: Uri) -> Upstream {
        let prefix = base.path().trim_end_matches('/').to_owned();
        Upstream { client: self.client.clone(), base, prefix }
    }

    /// The base URI.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The upstream URI for a request URI.
    pub fn target(&self, uri: &Uri) -> Uri {
        let path_and_query = uri.path_and_query().map(PathAndQuery::as_str).unwrap_or("/");
        let joined = format!("{}{}", self.prefix, path_and_query);
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = joined.parse().ok();
        Uri::from_parts(parts).unwrap_or_else(|_| self.base.clone())
    }

    /// Sends a request whose URI and headers are already prepared.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        self.client.request(request).await.map_err(|e| {
            let detail = error_chain(&e);
            if e.is_connect() || never_written(&e) {
                UpstreamError::NotSent(detail)
            } else {
                UpstreamError::Lost(detail)
            }
        })
    }

    /// Rewrites a client's request for the upstream: target URI (which names the host), hop-by-hop
    /// headers removed, `X-Forwarded-For`/`-Host` and `-Proto` (`proto`) added.
    pub fn prepare(&self, request: &mut Request<Body>, peer: Option<SocketAddr>, proto: &HeaderValue) {
        let original_host = request
            .headers()
            .get(header::HOST)
            .cloned()
            .or_else(|| request.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        *request.uri_mut() = self.target(request.uri());
        *request.version_mut() = http::Version::HTTP_11;
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        // The client's Host goes; the upstream's comes from the target URI: as `Host` over
        // HTTP/1.1 (the client adds it) and as `:authority` over HTTP/2, where a `Host`
        // header beside it is a duplicate that servers such as nginx before 1.25 refuse.
        headers.remove(header::HOST);
        if let Some(host) = original_host {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        headers.insert(HeaderName::from_static("x-forwarded-proto"), proto.clone());
        if let Some(peer) = peer {
            let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prior) => format!("{prior}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
                headers.insert(HeaderName::from_static("x-forwarded-for"), value);
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_path_and_query_under_the_prefix() {
        let up = Upstream::new("http://127.0.0.1:9000/api/".parse().unwrap()).unwrap();
        let t = up.target(&"/v1/orders?x=1".parse().unwrap());
        assert_eq!(t.to_string(), "http://127.0.0.1:9000/api/v1/orders?x=1");
        let bare = Upstream::new("http://127.0.0.1:9000".parse().unwrap()).unwrap();
        assert_eq!(bare.target(&"/a".parse().unwrap()).to_string(), "http://127.0.0.1:9000/a");
    }

    #[test]
    fn the_upstream_host_comes_from_the_target_uri_not_a_header() {
        let up = Upstream::new("https://api.example.com:8443/v2/".parse().unwrap()).unwrap();
        let mut request = Request::post("/orders")
            .header(header::HOST, "gateway.local")
            .body(crate::layer::body::full(bytes::Bytes::new()))
            .unwrap();
        up.prepare(&mut request, None, &HeaderValue::from_static("https"));
        assert_eq!(request.uri().to_string(), "https://api.example.com:8443/v2/orders");
        assert!(request.headers().get(header::HOST).is_none(), "no Host beside HTTP/2's :authority");
        assert_eq!(request.headers()["x-forwarded-host"], "gateway.local");
        assert_eq!(request.headers()["x-forwarded-proto"], "https");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = http::HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }
}
