//! The fault table (issue 6): one test per way the upstream or the store can fail, each
//! asserting what the client gets, the record's status, how often the upstream executed,
//! and what the client's retry with the same key does. SPEC §2 decides every row: what
//! failed before the request was sent is retryable (`failed_retryable`, the retry
//! executes); what failed after it was sent is ambiguous (`outcome_unknown`, the retry gets
//! `409 outcome-unknown` and nothing executes again); non-final answers are passed on and
//! leave the key retryable.
//!
//! | fault | client gets | record | upstream executed | the retry |
//! |---|---|---|---|---|
//! | connection refused (`failures.rs`) | `502 upstream-unavailable` | `failed_retryable` | 0 | executes |
//! | connect never completes within `upstream_timeout` | `502 upstream-unavailable` | `failed_retryable` | 0 | executes |
//! | reset as soon as the connection is accepted | by what the gateway saw: not sent → the row above; sent → the row below | | 0 | |
//! | reset once the request head arrived (`reset`) | `502 upstream-outcome-unknown` | `outcome_unknown` | 0 | `409 outcome-unknown` |
//! | closed after executing (`drop`, `failures.rs`) | `502 upstream-outcome-unknown` | `outcome_unknown` | 1 | `409 outcome-unknown` |
//! | reset after executing (`reset-after`) | `502 upstream-outcome-unknown` | `outcome_unknown` | 1 | `409 outcome-unknown` |
//! | reset mid-response (`reset-mid-response`) | `502 upstream-outcome-unknown` | `outcome_unknown` | 1 | `409 outcome-unknown` |
//! | no answer within `upstream_timeout` (`failures.rs`) | `504 upstream-timeout` | `outcome_unknown` | 1 | `409 outcome-unknown` |
//! | body slower than `upstream_timeout` (`slow-body`) | `504 upstream-timeout` | `outcome_unknown` | 1 | `409 outcome-unknown` |
//! | `5xx` (`decision.rs` has every status) | the upstream's answer, as sent | `failed_retryable` | 1 | executes |
//! | `429` + `Retry-After` | the upstream's answer with its `Retry-After` | `failed_retryable` | 1 | executes |
//! | store down (`shared_stores.rs`, `failures.rs`) | `503 store-unavailable` | none | 0 | executes once the store is back |
//! | PostgreSQL restarted mid-load (its sessions ended, connections refused) | a final answer or `503 store-unavailable` | `completed` for every `201` | once per `201`, never for a `503` | executes after the restart |
//!
//! Store faults inside one process (a claim or a finish that fails, latency, an owner lost
//! between claim and finish) are unit tests of `store::faulty`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::support::{
    Gateway, Relay, Reply, Upstream, assert_problem, client, postgres_store, postgres_url, send, service_address,
    try_send, unique_suffix,
};

/// One route with a short `upstream_timeout`, so the timing faults take a second at most.
const ROUTES: &str = r#"
    [[routes]]
    name = "orders"
    path = "/orders"
    upstream_timeout = "1s"
"#;

fn post(gateway: &Gateway, key: &str) -> reqwest::RequestBuilder {
    client().post(gateway.url("/orders")).header("Idempotency-Key", key).json(&json!({ "amount": 42 }))
}

/// The rows where the request was sent and no answer came: the record is `outcome_unknown`
/// and the retry neither executes nor replays.
async fn assert_ambiguous(gateway: &Gateway, upstream: &Upstream, key: &str, executed: u64) -> Value {
    let record = gateway.record("orders", key).await.expect("a record");
    assert_eq!(record["status"], "outcome_unknown", "{record}");
    assert!(record["error_summary"].as_str().is_some_and(|s| !s.is_empty()), "{record}");
    assert_eq!(upstream.calls_for(key).await, executed, "{record}");
    let retry = send(post(gateway, key)).await;
    assert_problem(&retry, 409, "outcome-unknown");
    assert_eq!(upstream.calls_for(key).await, executed, "the retry executed nothing");
    record
}

/// The rows where nothing was sent, or the answer was not final: the record is
/// `failed_retryable`, and the retry executes (once) and is replayed from then on.
async fn assert_retry_executes(gateway: &Gateway, upstream: &Upstream, key: &str, executed_before: u64) {
    let record = gateway.record("orders", key).await.expect("a record");
    assert_eq!(record["status"], "failed_retryable", "{record}");
    assert_eq!(upstream.calls_for(key).await, executed_before, "{record}");
    let retry = send(post(gateway, key)).await;
    assert_eq!(retry.status, 201, "the retry executes: {retry:?}");
    assert!(!retry.replayed(), "{retry:?}");
    let replay = send(post(gateway, key)).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, retry.body);
    assert_eq!(upstream.calls_for(key).await, executed_before + 1);
    let record = gateway.record("orders", key).await.expect("a record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["attempt_count"], 2, "{record}");
}

/// What the door does with the connections the gateway opens to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Accepts nothing, and its one-place accept queue is held full: the kernel drops the
    /// gateway's SYN, so its connect never completes (an overloaded or firewalled host).
    Jammed,
    /// Resets each connection (TCP RST) as soon as it is accepted.
    Reset,
    /// Relays each connection to the demo upstream.
    Open,
}

/// A TCP door between the gateway and the demo upstream, for the faults that happen before
/// any HTTP request exists and that no HTTP server (the demo upstream included) can
/// produce: a connect that never completes, a connection reset the moment it is accepted.
/// Once opened, it relays to the real demo upstream, so the retry runs against it.
struct Door {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
    /// How many connections the door accepted (reset or relayed).
    accepted: watch::Receiver<u64>,
    /// Holds the accept queue full while the door is jammed.
    _filler: Option<TcpStream>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Door {
    async fn start(upstream: &Upstream, mode: Mode) -> Door {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.bind("127.0.0.1:0".parse().expect("an address")).expect("the door binds");
        // Backlog 0: Linux queues one connection, and drops the SYNs that come after it.
        let listener = socket.listen(0).expect("the door listens");
        let address = listener.local_addr().expect("an address");
        let filler = match mode {
            Mode::Jammed => Some(TcpStream::connect(address).await.expect("the filler takes the queue's one place")),
            Mode::Reset | Mode::Open => None,
        };
        let (mode_tx, mut mode_rx) = watch::channel(mode);
        let (accepted_tx, accepted) = watch::channel(0);
        let target = service_address(&upstream.url());
        let acceptor = tokio::spawn(async move {
            loop {
                if mode_rx.wait_for(|m| *m != Mode::Jammed).await.is_err() {
                    return;
                }
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                accepted_tx.send_modify(|n| *n += 1);
                if *mode_rx.borrow() == Mode::Reset {
                    inbound.set_zero_linger().expect("SO_LINGER");
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Door { address, mode: mode_tx, accepted, _filler: filler, acceptor }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Relays from now on. Returns once a jammed door has taken the filler off its queue,
    /// so the next connect is accepted at once.
    async fn open(&mut self) {
        let was = self.mode.send_replace(Mode::Open);
        if was == Mode::Jammed {
            let seen = *self.accepted.borrow();
            self.accepted.wait_for(|n| *n > seen).await.expect("the door's acceptor runs");
        }
    }

    fn accepted(&self) -> u64 {
        *self.accepted.borrow()
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

#[tokio::test]
async fn a_connect_that_never_completes_was_not_sent_and_the_retry_executes() {
    let upstream = Upstream::start().await;
    let mut door = Door::start(&upstream, Mode::Jammed).await;
    let gateway = Gateway::start(&door.url(), ROUTES).await;

    // No connection, so no request left the gateway: SPEC §2 makes this retryable, however
    // long the connect was waited for.
    let jammed = send(post(&gateway, "jammed-1")).await;
    let record = gateway.record("orders", "jammed-1").await.expect("a record");
    let seen = (jammed.status, jammed.json()["type"].clone(), record["status"].clone());
    assert_eq!(seen, (502, json!("upstream-unavailable"), json!("failed_retryable")), "{jammed:?}\n{record}");
    assert_problem(&jammed, 502, "upstream-unavailable");

    door.open().await;
    assert_retry_executes(&gateway, &upstream, "jammed-1", 0).await;
}

#[tokio::test]
async fn a_reset_as_the_connection_is_accepted_is_classified_by_whether_the_request_left() {
    let upstream = Upstream::start().await;
    let mut door = Door::start(&upstream, Mode::Reset).await;
    let gateway = Gateway::start(&door.url(), ROUTES).await;

    // The RST races the gateway's first write. On loopback it nearly always lands while the
    // connect is being completed (not sent: retryable); on a loaded machine it can land just
    // after the request was written (sent: ambiguous, the gateway cannot know the upstream
    // did not read it). Either way the classification must match what the gateway saw.
    let reset = send(post(&gateway, "reset-1")).await;
    assert!(door.accepted() >= 1, "the gateway connected: {reset:?}");
    assert_eq!(upstream.calls().await, 0, "the door relayed nothing");
    door.open().await;
    let kind = reset.json()["type"].as_str().map(str::to_owned);
    match kind.as_deref() {
        Some("upstream-unavailable") => {
            assert_problem(&reset, 502, "upstream-unavailable");
            assert_retry_executes(&gateway, &upstream, "reset-1", 0).await;
        }
        _ => {
            assert_problem(&reset, 502, "upstream-outcome-unknown");
            assert_ambiguous(&gateway, &upstream, "reset-1", 0).await;
        }
    }
}

#[tokio::test]
async fn a_reset_once_the_request_head_arrived_is_ambiguous_though_nothing_executed() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    // The demo resets before reading the body and executes nothing; but the gateway has
    // written its request, and a reset after executing (next test) looks the same to it.
    let reset = send(post(&gateway, "reset-2").header("X-Demo-Fault", "reset")).await;
    assert_problem(&reset, 502, "upstream-outcome-unknown");
    assert_ambiguous(&gateway, &upstream, "reset-2", 0).await;
    assert_eq!(upstream.calls().await, 0);
}

#[tokio::test]
async fn a_reset_after_executing_is_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    let reset = send(post(&gateway, "reset-3").header("X-Demo-Fault", "reset-after")).await;
    assert_problem(&reset, 502, "upstream-outcome-unknown");
    assert_ambiguous(&gateway, &upstream, "reset-3", 1).await;
}

#[tokio::test]
async fn a_reset_mid_response_is_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    // The status line said 201 and half the body came: an answer the gateway never had
    // whole is neither passed on nor stored.
    let broken = send(post(&gateway, "partial-1").header("X-Demo-Fault", "reset-mid-response")).await;
    assert_problem(&broken, 502, "upstream-outcome-unknown");
    let record = assert_ambiguous(&gateway, &upstream, "partial-1", 1).await;
    assert!(record["response"].is_null(), "no partial answer is stored: {record}");
}

#[tokio::test]
async fn a_body_slower_than_the_upstream_timeout_is_504_and_an_unknown_outcome() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    // The head arrives at once; the body would take 5 s, past the route's 1 s (had the
    // timeout not covered the body, the client would get the 201 after 5 s).
    let slow =
        send(post(&gateway, "slow-body-1").header("X-Demo-Fault", "slow-body").header("X-Demo-Delay", "5s")).await;
    assert_problem(&slow, 504, "upstream-timeout");
    assert_ambiguous(&gateway, &upstream, "slow-body-1", 1).await;
}

#[tokio::test]
async fn a_server_error_is_passed_on_as_sent_and_the_retry_executes() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    let failed = send(post(&gateway, "boom-1").header("X-Demo-Status", "500")).await;
    assert_eq!(failed.status, 500, "{failed:?}");
    assert_eq!(failed.header("content-type"), Some("application/json"), "the upstream's answer: {failed:?}");
    assert_eq!(failed.json()["id"], "demo_1", "{failed:?}");
    assert!(!failed.replayed(), "{failed:?}");
    assert_retry_executes(&gateway, &upstream, "boom-1", 1).await;
}

#[tokio::test]
async fn a_429_is_passed_on_with_its_retry_after_and_the_retry_executes() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), ROUTES).await;

    let limited = send(post(&gateway, "limited-1").header("X-Demo-Status", "429")).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.header("retry-after"), Some("1"), "the upstream's Retry-After reaches the client: {limited:?}");
    assert_eq!(limited.header("content-type"), Some("application/json"), "{limited:?}");
    assert!(!limited.replayed(), "{limited:?}");
    assert_retry_executes(&gateway, &upstream, "limited-1", 1).await;
}

/// What one client of the load saw.
struct Sent {
    key: String,
    reply: Reply,
    /// Sent after the store was back.
    after_restart: bool,
}

/// Sends orders with fresh keys, one after another, until `stop`.
async fn steady_client(
    gateway: Arc<String>,
    name: String,
    stop: Arc<AtomicBool>,
    back: Arc<AtomicBool>,
    refused: Arc<AtomicBool>,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    for n in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("{name}-{n}");
        let after_restart = back.load(Ordering::SeqCst);
        let request = client().post(gateway.as_str()).header("Idempotency-Key", &key).json(&json!({ "n": n }));
        let reply = try_send(request).await.unwrap_or_else(|e| panic!("{key}: the gateway gave no answer: {e:?}"));
        if reply.status == 503 {
            refused.store(true, Ordering::SeqCst);
        }
        sent.push(Sent { key, reply, after_restart });
    }
    sent
}

/// What a PostgreSQL restart does to the sessions it ends: "terminating connection due to
/// administrator command" (SQLSTATE 57P01), then the socket closes.
async fn terminate_sessions(application_name: &str) -> i64 {
    let (admin, connection) =
        tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await.expect("a PostgreSQL session");
    tokio::spawn(connection);
    let row = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .expect("pg_terminate_backend");
    row.get(0)
}

/// PostgreSQL goes away under a steady stream of requests and comes back. A real
/// `pg_ctlcluster 15 main restart` would break every other test using the shared server
/// at the same time, so the restart is played on this gateway's own sessions only: they
/// are terminated as a restart terminates them, and new connections are refused (the
/// relay is cut) while the server would be starting.
#[tokio::test]
async fn postgres_restarted_mid_load_fails_closed_and_recovers_without_a_gateway_restart() {
    let store = postgres_store();
    let application_name = format!("idem_it_{}", unique_suffix());
    let relay = Relay::start(&service_address(&store.url)).await;
    let through_relay = format!("{}&application_name={application_name}", store.url).replacen(
        &service_address(&store.url),
        &relay.address(),
        1,
    );
    let upstream = Upstream::start().await;
    let gateway = Gateway::builder(&upstream.url(), ROUTES).store(&through_relay).start().await;

    let (stop, back) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let refused = Arc::new(AtomicBool::new(false));
    let url = Arc::new(gateway.url("/orders"));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let name = format!("load-{c}");
            tokio::spawn(steady_client(url.clone(), name, stop.clone(), back.clone(), refused.clone()))
        })
        .collect();
    // Let the load settle, then restart: nothing can be awaited but the clock here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // On a loaded machine no request may happen to reach the store during one short outage:
    // the restart is played again until a client was refused (at most eight times).
    for restart in 0..8 {
        let ended = terminate_sessions(&application_name).await;
        assert!(restart > 0 || ended > 0, "the gateway had sessions to end");
        relay.cut();
        // Down for less than owner::finish retries (about 1.5 s), so every answer a client
        // got during the outage is also recorded once the store is back.
        tokio::time::sleep(Duration::from_millis(700)).await;
        relay.restore();
        if refused.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    back.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for client in clients {
        let seen = client.await.expect("a load client");
        let last = seen.last().map(|s| (s.after_restart, s.reply.status));
        assert_eq!(last, Some((true, 201)), "every client ends on a success after the restart");
        sent.extend(seen);
    }

    let stats = upstream.stats().await;
    let mut executed = 0;
    for Sent { key, reply, .. } in &sent {
        let calls = stats["by_key"][key].as_u64().unwrap_or(0);
        match reply.status {
            201 => {
                assert!(!reply.replayed(), "{key}: {reply:?}");
                assert_eq!(calls, 1, "{key} answered 201 executes exactly once");
                let record = gateway.record("orders", key).await.expect("a record");
                assert_eq!(record["status"], "completed", "{key}: the answer was recorded after the outage: {record}");
                executed += 1;
            }
            503 => {
                assert_problem(reply, 503, "store-unavailable");
                assert_eq!(calls, 0, "{key} was refused with 503 and must not have been forwarded");
            }
            _ => panic!("{key}: neither a final answer nor 503 store-unavailable: {reply:?}"),
        }
    }
    assert_eq!(stats["calls"], executed, "the upstream executed only what answered 201: {stats}");
    assert!(sent.iter().any(|s| s.reply.status == 503), "the outage was seen by clients");
    let recovered = sent.iter().filter(|s| s.after_restart && s.reply.status == 201).count();
    assert!(recovered > 0, "requests succeed again after the restart, with the same gateway process");
}
