//! idem makes retries safe for API integrations: every intended action is remembered
//! under a stable key and executed once, however often it is retried.
//!
//! [`core`] holds the record model and the decision table (no IO); [`store`] persists
//! records; [`gateway`] is the idempotency reverse proxy; [`admin`] and [`cli`] inspect
//! and settle records.

pub mod core;
pub mod store;
