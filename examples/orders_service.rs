//! A complete axum service on PostgreSQL with idem inside it (SPEC §7): `POST /orders`
//! inserts one row into `shop_orders` and answers `201`, and the claim of its
//! `Idempotency-Key`, that insert and the stored answer commit in one transaction. A retry
//! — after a timeout, a crash, a `kill -9` — gets the same order, never a second one, and no
//! outcome is ever unknown.
//!
//! ```sh
//! cargo run --release --example orders_service -- \
//!     --listen 127.0.0.1:3000 --database-url postgres://root@127.0.0.1:5432/test
//! curl -si -X POST http://127.0.0.1:3000/orders -H 'Idempotency-Key: order-1' \
//!     -H 'Content-Type: application/json' -d '{"sku": "book", "qty": 2}'
//! ```
//!
//! The records live in the same database, in schema `idem`. `--without-idem` serves the same
//! handler with no key and no layer, each insert in its own transaction: the baseline of
//! `bench/orders_service.sh`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::Parser;
use serde::Deserialize;
use serde_json::json;

use idem::layer::{Idem, RouteBuilder, Tx};

/// The service's flags.
#[derive(Parser)]
struct Args {
    /// Where to listen, `HOST:PORT`.
    #[arg(long)]
    listen: SocketAddr,
    /// The PostgreSQL database of the orders and of idem's records.
    #[arg(long)]
    database_url: String,
    /// Serve the handler without idem (no key, its own transaction): a baseline.
    #[arg(long)]
    without_idem: bool,
}

/// `POST /orders`'s body.
#[derive(Deserialize)]
struct Order {
    sku: String,
    qty: i64,
}

const CREATE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS shop_orders (id BIGSERIAL PRIMARY KEY, sku TEXT NOT NULL, qty BIGINT NOT NULL)";
const INSERT: &str = "INSERT INTO shop_orders (sku, qty) VALUES ($1, $2) RETURNING id";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let pool = pool(&args.database_url)?;
    pool.get().await?.batch_execute(CREATE_TABLE).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let app = if args.without_idem {
        axum::Router::new().route("/orders", post(create_order_alone)).with_state(pool)
    } else {
        // The claim, the insert and the answer in one transaction: `Idem::open` on a
        // `postgres://` URL makes the layer transactional.
        let idem = Idem::open(&args.database_url).await?;
        let orders = RouteBuilder::new("orders")
            .methods(["POST"])
            .path("/orders")
            .key_required()
            .in_flight_wait(Duration::from_secs(5))
            .build()?;
        axum::Router::new().route("/orders", post(create_order)).layer(idem.layer().route(orders).build()?)
    };
    println!("orders_service listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
    Ok(())
}

/// Behind idem: the insert runs in the claim's transaction.
async fn create_order(tx: Tx, Json(order): Json<Order>) -> Result<Response, Failed> {
    let row = tx.query_one(INSERT, &[&order.sku, &order.qty]).await?;
    Ok(created(row.get(0), order))
}

/// The baseline: the same insert in a transaction of its own, no key.
async fn create_order_alone(
    State(pool): State<deadpool_postgres::Pool>,
    Json(order): Json<Order>,
) -> Result<Response, Failed> {
    let mut client = pool.get().await.map_err(|e| Failed(e.to_string()))?;
    let tx = client.transaction().await?;
    let row = tx.query_one(INSERT, &[&order.sku, &order.qty]).await?;
    tx.commit().await?;
    Ok(created(row.get(0), order))
}

fn created(id: i64, order: Order) -> Response {
    (StatusCode::CREATED, Json(json!({ "order_id": id, "sku": order.sku, "qty": order.qty }))).into_response()
}

/// A database error: `500`, so idem rolls the transaction back and the retry runs again.
struct Failed(String);

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Self {
        Failed(e.to_string())
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        tracing::warn!(error = %self.0, "order not created");
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "the order could not be created" }))).into_response()
    }
}

/// A pool for the table and the baseline, with the TLS settings the URL names.
fn pool(url: &str) -> anyhow::Result<deadpool_postgres::Pool> {
    let (config, tls) = idem::store::postgres::connection(url)?;
    let manager = deadpool_postgres::Manager::new(config, tls);
    Ok(deadpool_postgres::Pool::builder(manager).max_size(16).build()?)
}

async fn shutdown() {
    let _ = tokio::signal::ctrl_c().await;
}
