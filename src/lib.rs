//! idem makes retries safe for API integrations: every intended action is remembered
//! under a stable key and executed once, however often it is retried.
//!
//! [`core`] holds the record model and the decision table (no IO); [`store`] persists
//! records; [`gateway`] is the idempotency reverse proxy; [`runner`] runs exports and
//! workflows (`idem run`); [`consumer`] is the idempotent broker consumer (`idem consume`);
//! [`config`] reads and checks the files of all three; [`admin`] and [`cli`] inspect and
//! settle records; [`metrics`] names what is measured; [`demo`] is an upstream to try it against.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod core;
pub mod demo;
pub mod gateway;
pub mod host;
pub mod layer;
pub mod metrics;
pub mod runner;
pub mod store;
pub mod tls;
