//! idem makes retries safe for API integrations: every intended action is remembered
//! under a stable key and executed once, however often it is retried.
//!
//! The crate is the `idem` binary (`idem gateway`, `idem run`, `idem consume`, `idem log`)
//! and a library for Rust services. Inside a service, [`layer`] puts the gateway's request
//! handling in front of your own handlers as a tower [`Layer`](tower::Layer): the same
//! routes, keys, fingerprints, decisions, headers, problem types, metrics and stores.
//!
//! # Exactly once, in one PostgreSQL transaction
//!
//! On a PostgreSQL store the layer is transactional: the claim of the key, your handler's
//! writes (through the [`Tx`](layer::Tx) extractor) and the stored answer commit in one
//! transaction. A crash before the commit leaves nothing and the key free; after it, effect
//! and record both exist. No outcome is ever unknown.
//!
//! ```no_run
//! use axum::{Json, Router, http::StatusCode, routing::post};
//! use idem::layer::{Idem, RouteBuilder, Tx};
//! use serde_json::{Value, json};
//!
//! async fn create_order(tx: Tx, Json(order): Json<Value>) -> Result<(StatusCode, Json<Value>), StatusCode> {
//!     let sku = order["sku"].as_str().unwrap_or_default();
//!     let row = tx
//!         .query_one("INSERT INTO shop_orders (sku, qty) VALUES ($1, 1) RETURNING id", &[&sku])
//!         .await
//!         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?; // a 5xx rolls everything back
//!     Ok((StatusCode::CREATED, Json(json!({ "order_id": row.get::<_, i64>(0) }))))
//! }
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let idem = Idem::open("postgres://app@db.internal/shop").await?;
//! let orders = RouteBuilder::new("orders").methods(["POST"]).path("/orders").key_required().build()?;
//! let app = Router::new().route("/orders", post(create_order)).layer(idem.layer().route(orders).build()?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! On any other store the layer gives the gateway's guarantee — at most once, or an explicit
//! `outcome_unknown` — since your handler's writes and idem's record cannot share a
//! transaction there:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Router, body::Body, routing::post};
//! use http::Request;
//! use tower::ServiceExt;
//!
//! let idem = idem::layer::Idem::open("memory://").await?;
//! let routes = idem::layer::routes_from_toml(r#"
//!     [[routes]]
//!     name = "payments"
//!     methods = ["POST"]
//!     path = "/payments"
//!     key = { required = true }
//! "#)?;
//! let app = Router::new().route("/payments", post(|| async { "paid" })).layer(idem.layer().routes(routes).build()?);
//!
//! let pay = || Request::post("/payments").header("Idempotency-Key", "pay-1").body(Body::empty()).unwrap();
//! let first = app.clone().oneshot(pay()).await?;
//! let again = app.clone().oneshot(pay()).await?;
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! # Ok(())
//! # }
//! ```
//!
//! For work that is not an HTTP handler (a job, a worker), [`Idem::run_once`](layer::Idem::run_once)
//! runs a closure once per key in the same transactional way.
//!
//! # Modules
//!
//! [`core`] holds the record model and the decision table (no IO); [`store`] persists
//! records; [`layer`] is the request handling as a tower layer; [`gateway`] is that layer
//! over a reverse proxy; [`runner`] runs exports and workflows (`idem run`); [`consumer`]
//! is the idempotent broker consumer (`idem consume`); [`config`] reads and checks the
//! files of all three; [`admin`] and [`cli`] inspect and settle records; [`metrics`] names
//! what is measured; [`demo`] is an upstream to try it against.

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
pub mod template;
pub mod tls;
pub mod verify;
