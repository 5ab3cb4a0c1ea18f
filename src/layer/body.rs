//! Body types: requests and answers are streamed on unprotected routes and buffered
//! (bounded) on protected ones, behind one boxed body type — axum's, so the layer sits
//! in front of an axum router without converting anything.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the layer hands its inner service and answers with.
pub type Body = axum::body::Body;

/// A body from bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::from(bytes.into())
}

/// A streamed body, boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body::new(body)
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Over the limit.
    TooLarge,
    /// Not received in time.
    TimedOut,
    /// The stream failed (client went away, malformed chunking, …).
    Broken,
}

/// Reads a whole body, refusing more than `limit` bytes and waiting at most `timeout`.
pub async fn read_limited<B>(body: B, limit: u64, timeout: Duration) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    match collected {
        Err(_) => Err(ReadError::TimedOut),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(_)) => Err(ReadError::Broken),
    }
}
