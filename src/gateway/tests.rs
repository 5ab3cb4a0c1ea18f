//! The gateway in process (`Gateway::handle`, no sockets on the client side): a store
//! outage fails closed, and a replay is served from the store.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::Gateway;
use crate::core::{ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution};
use crate::gateway::store_faults::{demo_upstream, gateway_with};
use crate::layer::answer::{EXPIRES, REPLAYED};
use crate::store::{Claim, Error, ListQuery, Page, StatRow, Store};

/// A store whose every operation fails, as when its server is unreachable.
struct DownStore;

fn down<T>() -> Result<T, Error> {
    Err(Error::Unavailable("connection refused".into()))
}

#[async_trait]
impl Store for DownStore {
    async fn claim(&self, _: &Intent, _: ClaimPolicy) -> Result<Claim, Error> {
        down()
    }
    async fn renew(&self, _: &RecordId, _: LeaseToken, _: Millis) -> Result<bool, Error> {
        down()
    }
    async fn finish(&self, _: &RecordId, _: LeaseToken, _: Outcome, _: Millis) -> Result<bool, Error> {
        down()
    }
    async fn get(&self, _: &RecordId) -> Result<Option<Record>, Error> {
        down()
    }
    async fn list(&self, _: &ListQuery) -> Result<Page, Error> {
        down()
    }
    async fn delete(&self, _: &RecordId) -> Result<bool, Error> {
        down()
    }
    async fn resolve(&self, _: &RecordId, _: Resolution, _: Millis) -> Result<Record, Error> {
        down()
    }
    async fn purge_expired(&self, _: Millis, _: usize) -> Result<u64, Error> {
        down()
    }
    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        down()
    }
}

fn gateway(store: Arc<dyn Store>, upstream: SocketAddr) -> Arc<Gateway> {
    gateway_with("client_timeout = \"5s\"", store, upstream)
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
        .unwrap()
}

async fn upstream_calls(upstream: SocketAddr) -> u64 {
    let stats: serde_json::Value =
        reqwest::get(format!("http://{upstream}/_demo/stats")).await.unwrap().json().await.unwrap();
    stats["calls"].as_u64().unwrap()
}

#[tokio::test]
async fn store_outage_fails_closed() {
    let upstream = demo_upstream().await;
    let response = gateway(Arc::new(DownStore), upstream).handle(post("k1"), None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["type"], "store-unavailable");
    assert_eq!(upstream_calls(upstream).await, 0, "nothing may be forwarded while the store is down");
}

#[tokio::test]
async fn replay_is_served_from_the_store() {
    let upstream = demo_upstream().await;
    let gateway = gateway(Arc::new(crate::store::memory::MemoryStore::default()), upstream);
    let first = gateway.handle(post("k1"), None).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body = first.into_body().collect().await.unwrap().to_bytes();
    let again = gateway.handle(post("k1"), None).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()[REPLAYED], "true");
    assert!(again.headers().contains_key(EXPIRES));
    assert!(!again.headers().contains_key(header::SET_COOKIE), "set-cookie is on the default denylist");
    assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), first_body);
    assert_eq!(upstream_calls(upstream).await, 1);
}
