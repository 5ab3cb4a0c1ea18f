//! The PostgreSQL store (under construction).

use std::sync::Arc;

use super::{Error, Store};

/// Opens a `postgres://` store.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    Err(Error::BadUrl { url: url.to_owned(), reason: "the PostgreSQL store is not built yet".into() })
}
