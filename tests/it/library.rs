//! idem inside a Rust service (SPEC §7), on the real PostgreSQL: the example service as a
//! process (its flags, ready line, `POST /orders` and table), killed with `-9` at random
//! moments under retrying clients; and the transactional layer and `run_once` in process,
//! where a handler that fails or panics must leave nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tower::ServiceExt;

use crate::support::{BIN, postgres_url, read, spawn_until_ready, unique_suffix};
use idem::core::Fingerprint;
use idem::layer::{Idem, RouteBuilder, RunOnceError, Tx};

/// A database of its own (the example's table name is fixed), dropped afterwards.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Database {
        let admin = postgres_url();
        let name = format!("idem_orders_{}", unique_suffix());
        run_sql(&admin, &format!("CREATE DATABASE {name}")).await;
        let (base, query) = admin.split_once('?').map_or((admin.as_str(), ""), |(b, q)| (b, q));
        let root = base.rsplit_once('/').map_or(base, |(root, _)| root);
        let url = if query.is_empty() { format!("{root}/{name}") } else { format!("{root}/{name}?{query}") };
        Database { admin, name, url }
    }

    async fn rows(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.expect("connects");
        tokio::spawn(connection);
        client.query(sql, &[]).await.expect("the query runs")
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = Command::new("psql").arg(&self.admin).args(["-q", "-c", &sql]).output();
    }
}

async fn run_sql(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connects");
    tokio::spawn(connection);
    client.batch_execute(sql).await.expect("the statement runs");
}

/// The example service (built by cargo with the tests), started and ready.
struct OrdersService {
    child: Option<Child>,
    addr: String,
    dir: tempfile::TempDir,
    starts: u32,
    database_url: String,
}

impl OrdersService {
    fn binary() -> PathBuf {
        let path = std::path::Path::new(BIN).parent().expect("a target dir").join("examples/orders_service");
        assert!(path.exists(), "{} is missing: cargo builds the examples with the tests", path.display());
        path
    }

    async fn start(database_url: &str) -> OrdersService {
        let mut service = OrdersService {
            child: None,
            addr: String::new(),
            dir: tempfile::tempdir().expect("a temp dir"),
            starts: 0,
            database_url: database_url.to_owned(),
        };
        service.spawn("127.0.0.1:0").await;
        service
    }

    async fn spawn(&mut self, listen: &str) {
        self.starts += 1;
        let stdout = self.dir.path().join(format!("orders-{}.stdout", self.starts));
        let stderr = self.dir.path().join(format!("orders-{}.stderr", self.starts));
        let mut command = Command::new(Self::binary());
        command.args(["--listen", listen, "--database-url", &self.database_url]);
        let prefix = "orders_service listening on http://";
        let (child, line) = spawn_until_ready(command, &stdout, &stderr, prefix).await;
        self.addr = line[prefix.len()..].trim().to_owned();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    async fn restart(&mut self) {
        self.kill();
        let listen = self.addr.clone();
        self.spawn(&listen).await;
    }

    fn url(&self) -> String {
        format!("http://{}/orders", self.addr)
    }

    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| read(&self.dir.path().join(format!("orders-{n}.stderr"))))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for OrdersService {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- orders_service logs ---\n{}", self.logs());
        }
        self.kill();
    }
}

async fn order(client: &reqwest::Client, url: &str, key: &str, sku: &str) -> reqwest::Result<(u16, bool, Value)> {
    let response = client
        .post(url)
        .header("idempotency-key", key)
        .json(&json!({ "sku": sku, "qty": 2 }))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    Ok((status, replayed, response.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn the_example_service_creates_one_order_per_key_and_replays_it() {
    let db = Database::create().await;
    let service = OrdersService::start(&db.url).await;
    let client = reqwest::Client::new();
    let (status, replayed, first) = order(&client, &service.url(), "order-1", "book").await.unwrap();
    assert_eq!((status, replayed), (201, false));
    assert_eq!((first["sku"].clone(), first["qty"].clone()), (json!("book"), json!(2)));
    let (status, replayed, again) = order(&client, &service.url(), "order-1", "book").await.unwrap();
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first, "the replay names the same order");
    let (status, _, problem) = order(&client, &service.url(), "order-1", "pen").await.unwrap();
    assert_eq!((status, problem["type"].as_str()), (422, Some("idempotency-key-reused")));
    let response = client.post(service.url()).json(&json!({ "sku": "pen", "qty": 1 })).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "the key is required");
    let rows = db.rows("SELECT id, sku, qty FROM shop_orders").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i64>(0), first["order_id"].as_i64().unwrap());
    let records = db.rows("SELECT scope, key, status FROM idem.records").await;
    let records: Vec<(String, String, String)> = records.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(records, [("orders".into(), "order-1".into(), "completed".into())]);
}

/// Concurrent retrying clients while the service is killed with `-9` at random moments:
/// every intent ends with exactly one row, every answer a client saw names that row, and
/// no record is left in any state but `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_the_example_service_creates_each_order_exactly_once() {
    const INTENTS: usize = 150;
    const CLIENTS: usize = 4;
    let db = Database::create().await;
    let service = Arc::new(Mutex::new(OrdersService::start(&db.url).await));
    let url = service.lock().await.url();
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<i64>>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (service, done) = (service.clone(), done.clone());
        tokio::spawn(async move {
            let mut kills = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || kills < 3 {
                tokio::time::sleep(Duration::from_millis(rand::random_range(100..400))).await;
                service.lock().await.restart().await;
                kills += 1;
            }
            kills
        })
    };
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (url, seen) = (url.clone(), seen.clone());
        clients.spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
            // Every client sends every intent: the same key from several clients at once.
            for i in (0..INTENTS).map(|i| (i + c * 7) % INTENTS) {
                let (key, sku) = (format!("intent-{i}"), format!("sku-{i}"));
                loop {
                    match order(&client, &url, &key, &sku).await {
                        Ok((201, _, body)) => {
                            let id = body["order_id"].as_i64().expect("an order id");
                            seen.lock().await.entry(sku.clone()).or_default().insert(id);
                            break;
                        }
                        // Refused while the first is in flight, or the service is restarting.
                        Ok((409 | 500 | 503, _, _)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Ok((status, _, body)) => panic!("unexpected answer {status} {body}"),
                    }
                }
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client.expect("a client finishes");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.await.unwrap();
    assert!(kills >= 3, "the service was killed {kills} times");
    let rows = db.rows("SELECT sku, id FROM shop_orders").await;
    let mut stored: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in &rows {
        stored.entry(row.get(0)).or_default().push(row.get(1));
    }
    let seen = seen.lock().await;
    assert_eq!(stored.len(), INTENTS, "one row per intent, and every intent answered");
    for (sku, ids) in &stored {
        assert_eq!(ids.len(), 1, "{sku} has {} rows", ids.len());
        let answers: Vec<i64> = seen[sku].iter().copied().collect();
        assert_eq!(answers, *ids, "every answer for {sku} names its one row");
    }
    assert_eq!(rows.len(), INTENTS, "no row without an intent");
    let statuses = db.rows("SELECT status, count(*) FROM idem.records GROUP BY status").await;
    let statuses: Vec<(String, i64)> = statuses.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(statuses, [("completed".to_owned(), INTENTS as i64)], "after {kills} kills");
}

/// A transactional layer in process over handlers that insert into `things`.
async fn transactional_app(db: &Database, timeout: Duration) -> axum::Router {
    run_sql(&db.url, "CREATE TABLE things (name TEXT NOT NULL)").await;
    let idem = Idem::open(&db.url).await.expect("the store opens");
    assert!(idem.is_transactional());
    let route = RouteBuilder::new("things").methods(["POST"]).path("/**").key_required().timeout(timeout).build();
    let layer = idem.layer().route(route.unwrap()).build().unwrap();
    async fn insert(tx: &Tx, name: &str) {
        tx.execute("INSERT INTO things (name) VALUES ($1)", &[&name]).await.expect("inserts");
    }
    axum::Router::new()
        .route(
            "/ok",
            post(|tx: Tx| async move {
                insert(&tx, "ok").await;
                (StatusCode::CREATED, "made")
            }),
        )
        .route(
            "/fails",
            post(|tx: Tx| async move {
                insert(&tx, "fails").await;
                StatusCode::INTERNAL_SERVER_ERROR
            }),
        )
        .route(
            "/panics",
            post(|tx: Tx| async move {
                insert(&tx, "panics").await;
                if !tx.is_closed() {
                    panic!("the handler panics after its insert");
                }
                StatusCode::CREATED
            }),
        )
        .route(
            "/hangs",
            post(|tx: Tx| async move {
                insert(&tx, "hangs").await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                StatusCode::CREATED
            }),
        )
        .route(
            "/slow",
            post(|tx: Tx, Json(body): Json<Value>| async move {
                insert(&tx, "slow").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                (StatusCode::CREATED, Json(body))
            }),
        )
        .layer(layer)
}

async fn call(app: &axum::Router, path: &str, key: &str) -> (StatusCode, bool, String) {
    let request = Request::post(path)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{}"));
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8_lossy(&body).into_owned())
}

async fn count(db: &Database, sql: &str) -> i64 {
    db.rows(sql).await[0].get(0)
}

#[tokio::test]
async fn a_handler_that_fails_panics_or_hangs_rolls_back_its_writes_and_the_claim() {
    let db = Database::create().await;
    let app = transactional_app(&db, Duration::from_millis(500)).await;
    for (path, status) in [
        ("/fails", StatusCode::INTERNAL_SERVER_ERROR),
        ("/panics", StatusCode::INTERNAL_SERVER_ERROR),
        ("/hangs", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let (got, _, body) = call(&app, path, &format!("key{path}")).await;
        assert_eq!(got, status, "{path}: {body}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM things").await, 0, "every insert was rolled back");
    assert_eq!(count(&db, "SELECT count(*) FROM idem.records").await, 0, "and every claim with it");
    // The keys are free: a handler that succeeds under the same key executes, once.
    let (status, replayed, _) = call(&app, "/ok", "key/fails").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let (status, replayed, body) = call(&app, "/ok", "key/fails").await;
    assert_eq!((status, replayed, body.as_str()), (StatusCode::CREATED, true, "made"));
    assert_eq!(count(&db, "SELECT count(*) FROM things").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM idem.records WHERE status = 'completed'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_waits_for_the_first_transaction_then_replays() {
    let db = Database::create().await;
    let app = transactional_app(&db, Duration::from_secs(5)).await;
    // Without an in_flight wait the route rejects a duplicate whose first is still open.
    let first = tokio::spawn({
        let app = app.clone();
        async move { call(&app, "/slow", "same").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, body) = call(&app, "/slow", "same").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("request-in-flight"), "{body}");
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    let (status, replayed, _) = call(&app, "/slow", "same").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(count(&db, "SELECT count(*) FROM things").await, 1);
}

#[tokio::test]
async fn run_once_commits_the_work_with_its_record_and_replays_its_value() {
    let db = Database::create().await;
    run_sql(&db.url, "CREATE TABLE jobs (n BIGINT NOT NULL)").await;
    let idem = Idem::open(&db.url).await.unwrap();
    let fingerprint = Fingerprint::of(b"export invoices for 2026-11");
    let work = |n: i64| {
        move |tx: Tx| async move {
            tx.execute("INSERT INTO jobs (n) VALUES ($1)", &[&n]).await?;
            Ok::<_, tokio_postgres::Error>(json!({ "exported": n }))
        }
    };
    let done = idem.run_once("exports", "2026-11", fingerprint, work(7)).await.unwrap();
    assert_eq!((done.value.clone(), done.replayed), (json!({ "exported": 7 }), false));
    let again = idem.run_once("exports", "2026-11", fingerprint, work(8)).await.unwrap();
    assert_eq!((again.value, again.replayed), (json!({ "exported": 7 }), true), "the stored value, not run again");
    let other = Fingerprint::of(b"something else");
    let reused = idem.run_once("exports", "2026-11", other, work(9)).await.unwrap_err();
    assert!(matches!(reused, RunOnceError::KeyReused), "{reused}");
    let failed = idem
        .run_once("exports", "2026-12", fingerprint, |tx: Tx| async move {
            tx.execute("INSERT INTO jobs (n) VALUES (99)", &[]).await.unwrap();
            Err::<Value, _>("the export broke")
        })
        .await
        .unwrap_err();
    assert!(matches!(failed, RunOnceError::Failed("the export broke")), "{failed}");
    assert_eq!(count(&db, "SELECT count(*) FROM jobs").await, 1, "only the first run's insert is kept");
    let retried = idem.run_once("exports", "2026-12", fingerprint, work(12)).await.unwrap();
    assert!(!retried.replayed, "the failed run left the key free");
    assert_eq!(count(&db, "SELECT count(*) FROM jobs").await, 2);
}
