//! The inner service of `idem gateway`: forwards every request it gets to the upstream —
//! a protected route's own upstream when the layer says which route matched
//! ([`MatchedRoute`]) — and tells the layer how a failed exchange failed ([`Failure`],
//! [`Delivery`]), since "sent or not" is what the record depends on.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::ConnectInfo;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper_util::client::legacy::connect::capture_connection;

use super::upstream::{Upstream, UpstreamError, strip_hop_by_hop};
use crate::layer::body::Body;
use crate::layer::problem::Problem;
use crate::layer::{Delivery, Failure, MatchedRoute, RouteTable};

/// The reverse proxy: one pooled client, a base URI per route.
#[derive(Clone)]
pub struct Proxy(Arc<Upstreams>);

struct Upstreams {
    /// Where requests no route protects go (the gateway's `upstream`).
    default: Upstream,
    /// Each route's upstream, by the route's position in the table.
    routes: Vec<Upstream>,
    /// `X-Forwarded-Proto` for the upstream: how clients reached this gateway.
    forwarded_proto: HeaderValue,
}

impl Proxy {
    /// A proxy to `default`, with each route's own `upstream` where it names one, sharing
    /// one connection pool. Fails only when the TLS roots cannot be loaded.
    pub fn new(
        default: http::Uri,
        routes: &RouteTable,
        forwarded_proto: HeaderValue,
    ) -> Result<Self, crate::tls::Error> {
        let default = Upstream::new(default)?;
        let routes =
            routes.iter().map(|r| r.upstream.clone().map_or_else(|| default.clone(), |u| default.at(u))).collect();
        Ok(Self(Arc::new(Upstreams { default, routes, forwarded_proto })))
    }

    /// Each route's upstream, in table order.
    pub fn route_upstreams(&self) -> &[Upstream] {
        &self.0.routes
    }
}

impl tower::Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let upstreams = self.0.clone();
        Box::pin(async move { Ok(upstreams.forward(request).await) })
    }
}

impl Upstreams {
    async fn forward(&self, mut request: Request<Body>) -> Response<Body> {
        let upstream = match request.extensions().get::<MatchedRoute>() {
            Some(matched) => &self.routes[matched.index],
            None => &self.default,
        };
        let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(peer)| *peer);
        upstream.prepare(&mut request, peer, &self.forwarded_proto);
        if let Some(delivery) = request.extensions().get::<Delivery>().cloned() {
            // A timeout before any connection was made for this request sent nothing.
            let connection = capture_connection(&mut request);
            delivery.report(move || connection.connection_metadata().is_none());
        }
        match upstream.send(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(UpstreamError::NotSent(error)) => failed(Problem::UpstreamUnavailable, Failure::NotSent(error)),
            Err(UpstreamError::Lost(error)) => failed(Problem::UpstreamBroken, Failure::Lost(error)),
        }
    }
}

fn failed(problem: Problem, failure: Failure) -> Response<Body> {
    let mut response = problem.response();
    response.extensions_mut().insert(failure);
    response
}
