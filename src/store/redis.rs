//! The Redis store (under construction).

use std::sync::Arc;

use super::{Error, Store};

/// Opens a `redis://` store.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    Err(Error::BadUrl { url: url.to_owned(), reason: "the Redis store is not built yet".into() })
}
