//! The claim's transaction as an axum extractor: a handler behind a transactional layer
//! takes a [`Tx`] argument and writes through it.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use super::problem::Problem;
use crate::store::postgres::transaction::Tx;

/// The rejection when a handler asks for a [`Tx`] but the request holds none: the route is
/// not protected by a transactional idem layer, or the request had no key on a route where
/// the key is optional. Answered `500 handler-failed` and logged, since it is a wiring
/// mistake, not the client's.
#[derive(Debug)]
pub struct TxMissing;

impl IntoResponse for TxMissing {
    fn into_response(self) -> Response {
        tracing::error!(
            "a handler asked for idem's transaction, but this request has none: put the route behind a \
             transactional idem layer (Idem::open on a postgres:// store) and make its key required"
        );
        Problem::HandlerFailed.response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tx {
    type Rejection = TxMissing;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Tx>().cloned().ok_or(TxMissing)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Tx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Tx>().cloned())
    }
}
