//! The PostgreSQL store against a real server (`IDEM_TEST_POSTGRES_URL`, by default
//! `postgres://root@127.0.0.1:5432/test`): the conformance suite, migrations, URL
//! mistakes, races between separately opened stores, and an outage. Every test works in
//! a fresh schema of its own and drops it afterwards; nothing else is touched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::*;
use crate::core::{Decision, OnUnknown};
use tokio_postgres::NoTls;

const URL_VAR: &str = "IDEM_TEST_POSTGRES_URL";
const DEFAULT_URL: &str = "postgres://root@127.0.0.1:5432/test";

crate::conformance_tests!(Scratch::open().await);
crate::rule_tests!(Scratch::open().await);

fn base_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| DEFAULT_URL.into())
}

fn with_params(base: &str, params: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}{params}")
}

/// CI treats a missing service as a failure: say loudly what is missing and how to fix it.
fn no_server(base: &str, error: &Error) -> ! {
    panic!(
        "these tests need PostgreSQL at {} ({URL_VAR}), which failed: {error}. \
         Start it, or point {URL_VAR} at a server where this role may create schemas.",
        options::redact(base)
    )
}

/// A fresh schema, dropped (with everything in it) when this is dropped.
struct SchemaGuard {
    base: String,
    name: String,
}

impl SchemaGuard {
    fn new() -> Self {
        Self { base: base_url(), name: format!("idem_t_{:016x}", rand::random::<u64>()) }
    }

    /// A store URL for this schema.
    fn url(&self) -> String {
        with_params(&self.base, &format!("schema={}&pool_size=8", self.name))
    }

    async fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.url()).await.unwrap_or_else(|e| no_server(&self.base, &e))
    }

    /// A plain connection for looking behind the store's back.
    async fn raw(&self) -> tokio_postgres::Client {
        let options = Options::parse(&self.base).expect("the test URL parses");
        let (client, connection) =
            options.pg.connect(NoTls).await.unwrap_or_else(|e| no_server(&self.base, &db_error(&options.target, &e)));
        tokio::spawn(connection);
        client
    }

    /// Returns once a statement on this schema waits for a row lock: the sign that a
    /// claim is blocked behind a transaction the test holds open. Asked on a connection
    /// of its own, since a transaction keeps one view of the server's activity.
    async fn until_blocked(&self) {
        let observer = self.raw().await;
        let waiting =
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while observer.query_one(waiting, &[&self.name]).await.unwrap().get::<_, i64>(0) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no statement on {} ever waited for a lock", self.name);
            // The server offers no notification of lock waits; poll briefly.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        // The test's runtime may be shutting down (or unwinding from a panic), so the
        // schema is dropped from a thread with a runtime of its own.
        let (base, name) = (self.base.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let options = Options::parse(&base)?;
                let (client, connection) = options.pg.connect(NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                // A test that panicked may leave a transaction open on a connection that
                // nobody drives any more: give up rather than wait for it forever.
                let drop = format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                client.batch_execute(&drop).await.map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("test schema {} was not dropped: {error}", self.name);
        }
    }
}

/// A store in a fresh schema that disappears with it. Fields drop in order: the store's
/// connections close before the schema is dropped.
struct Scratch {
    store: PostgresStore,
    _schema: SchemaGuard,
}

impl Scratch {
    async fn open() -> Self {
        let schema = SchemaGuard::new();
        Self { store: schema.open().await, _schema: schema }
    }
}

#[async_trait]
impl crate::store::conformance::Seed for Scratch {
    async fn seed(&self, record: &Record) {
        let client = self.store.client().await.unwrap();
        let seen = self.store.insert_or_load(&client, record).await.unwrap();
        assert!(matches!(seen, Seen::Inserted), "{} was taken", record.id);
    }
}

#[async_trait]
impl Store for Scratch {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.store.claim(intent, policy).await
    }
    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        self.store.renew(id, token, locked_until).await
    }
    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        self.store.finish(id, token, outcome, now).await
    }
    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.store.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        self.store.list(query).await
    }
    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        self.store.delete(id).await
    }
    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        self.store.resolve(id, resolution, now).await
    }
    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        self.store.purge_expired(now, limit).await
    }
    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        self.store.stats().await
    }
}

fn intent(key: &str, now: Millis) -> Intent {
    Intent {
        id: RecordId::new("orders", "t1", key),
        fingerprint: crate::core::Fingerprint([7; 32]),
        now,
        ttl_ms: 3_600_000,
        lease_ms: 30_000,
        correlation_id: None,
    }
}

const REVIEW: ClaimPolicy = ClaimPolicy {
    on_unknown: OnUnknown::Review,
    on_change: crate::core::OnChange::Reject,
    replays: crate::core::Replays::Count,
    lookup: crate::core::Lookup::None,
};

#[tokio::test]
async fn newer_schema_is_refused_untouched() {
    let schema = SchemaGuard::new();
    let raw = schema.raw().await;
    let name = &schema.name;
    raw.batch_execute(&format!(
        "CREATE SCHEMA {name};
         CREATE TABLE {name}.idem_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
             applied_by TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO {name}.idem_migrations (version, description, applied_by) VALUES (99, 'from the future', 'idem 9')"
    ))
    .await
    .expect("the future schema is set up");
    let refused = PostgresStore::open(&schema.url()).await.err();
    assert!(
        matches!(refused, Some(Error::TooNew { found: 99, supported }) if supported == schema::latest()),
        "{refused:?}"
    );
    let tables: Vec<String> = raw
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1", &[name])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["idem_migrations"], "nothing was created");
    let versions = raw.query(&format!("SELECT version FROM {name}.idem_migrations"), &[]).await.unwrap();
    assert_eq!(versions.len(), 1);
}

#[tokio::test]
async fn concurrent_starters_migrate_once() {
    let schema = SchemaGuard::new();
    let url = schema.url();
    let starters: Vec<_> = (0..4).map(|_| tokio::spawn(PostgresStore::open_owned(url.clone()))).collect();
    for starter in starters {
        if let Err(e) = starter.await.unwrap() {
            no_server(&schema.base, &e);
        }
    }
    let raw = schema.raw().await;
    let rows =
        raw.query(&format!("SELECT version FROM {}.idem_migrations ORDER BY 1", schema.name), &[]).await.unwrap();
    let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=schema::latest()).collect::<Vec<_>>());
}

impl PostgresStore {
    /// `open` with an owned URL, for spawning.
    async fn open_owned(url: String) -> Result<Self, Error> {
        Self::open(&url).await
    }
}

#[tokio::test]
async fn two_processes_race_and_one_executes() {
    let schema = SchemaGuard::new();
    // Two pools are two processes as far as the server can tell.
    let stores: [Arc<dyn Store>; 2] = [Arc::new(schema.open().await), Arc::new(schema.open().await)];
    crate::store::conformance::race_has_one_winner(&stores).await;
}

#[tokio::test]
async fn a_claim_that_waited_for_a_concurrent_insert_sees_the_winner() {
    let schema = SchemaGuard::new();
    let store = schema.open().await;
    let mut raw = schema.raw().await;
    let other = raw.transaction().await.unwrap();
    other
        .execute(
            &format!(
                "INSERT INTO {}.records (version, scope, tenant, key, fingerprint, status, lease_token, locked_until,
                     created_at, last_seen_at, expires_at, replay_count, attempt_count)
                 VALUES (1, 'orders', 't1', 'k', $1, 'in_progress', 42, 100000, 1000, 1000, 3601000, 0, 1)",
                schema.name
            ),
            &[&[7u8; 32].as_slice()],
        )
        .await
        .unwrap();
    let claim = tokio::spawn(async move { store.claim(&intent("k", 1_000), REVIEW).await });
    // The claim's insert must wait for the other transaction.
    schema.until_blocked().await;
    other.commit().await.unwrap();
    // The insert then finds the key taken, and the statement's snapshot predates the
    // winner's commit: the claim must look again rather than report the key free.
    let claim = claim.await.unwrap().unwrap();
    assert_eq!(claim.decision, Decision::InFlight);
    assert_eq!(claim.record.unwrap().lease.unwrap().token, 42);
}

#[tokio::test]
async fn a_claim_whose_swap_lost_decides_again() {
    let schema = SchemaGuard::new();
    let store = schema.open().await;
    let first = store.claim(&intent("k", 1_000), REVIEW).await.unwrap();
    let failed = Outcome::Retryable { error: "upstream answered 503".into() };
    assert!(store.finish(&first.record.unwrap().id, first.token.unwrap(), failed, 1_001).await.unwrap());
    // Another process claims the retryable record and has not committed yet.
    let mut raw = schema.raw().await;
    let other = raw.transaction().await.unwrap();
    let taken = format!(
        "UPDATE {}.records SET version = version + 1, status = 'in_progress', lease_token = 42, locked_until = 100000
         WHERE key = 'k'",
        schema.name
    );
    assert_eq!(other.execute(&taken, &[]).await.unwrap(), 1);
    let claim = tokio::spawn(async move { store.claim(&intent("k", 2_000), REVIEW).await });
    schema.until_blocked().await;
    other.commit().await.unwrap();
    // The claim read the record as retryable (a retry recovery), but the other process got
    // there first: its swap fails, and deciding again finds the record in flight.
    let claim = claim.await.unwrap().unwrap();
    assert_eq!(claim.decision, Decision::InFlight);
    assert_eq!(claim.record.unwrap().lease.unwrap().token, 42);
}

#[tokio::test]
async fn replay_counts_reach_the_table() {
    let store = Scratch::open().await;
    let claim = store.claim(&intent("k", 1_000), REVIEW).await.unwrap();
    let done = Outcome::Completed(crate::core::StoredResponse {
        status: 201,
        headers: vec![],
        body: bytes::Bytes::from_static(b"{}"),
        retained: true,
    });
    let id = claim.record.unwrap().id;
    assert!(store.finish(&id, claim.token.unwrap(), done, 1_001).await.unwrap());
    for now in [1_002, 1_003, 1_004] {
        assert_eq!(store.claim(&intent("k", now), REVIEW).await.unwrap().decision, Decision::Replay);
    }
    // Counts are flushed once a second; nothing signals the flush, so poll for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let record = store.get(&id).await.unwrap().unwrap();
        if record.replay_count == 3 {
            assert_eq!(record.last_seen_at, 1_004);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "replay counts never written: {record:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn purge_collects_what_its_mark_skipped() {
    let store = Scratch::open().await;
    let ttl = intent("k", 0).ttl_ms;
    let complete = |key: &'static str, now: Millis| {
        let store = &store;
        async move {
            let claim = store.claim(&intent(key, now), REVIEW).await.unwrap();
            let done = Outcome::Retryable { error: "upstream answered 503".into() };
            assert!(store.finish(&claim.record.unwrap().id, claim.token.unwrap(), done, now).await.unwrap());
        }
    };
    complete("early", 10_000).await;
    assert_eq!(store.purge_expired(10_000 + ttl, 10).await.unwrap(), 1);
    // Created after that batch with an expiry below its mark (a clock behind the purger's).
    complete("skewed", 5_000).await;
    assert_eq!(store.purge_expired(20_000 + ttl, 10).await.unwrap(), 0, "batches start at the mark");
    store.store.purge_from.lock().unwrap().rescan_at = std::time::Instant::now();
    assert_eq!(store.purge_expired(20_000 + ttl, 10).await.unwrap(), 1, "a rescan collects it");
}

#[tokio::test]
async fn url_mistakes_are_bad_urls_that_name_them() {
    let cases = [
        ("postgres://root:s3cret@127.0.0.1/test?bogus=1", "bogus"),
        ("postgres://root:s3cret@127.0.0.1/test?schema=No-Such", "schema=No-Such"),
        ("postgres://root:s3cret@127.0.0.1/test?pool_size=0", "pool_size=0"),
        ("postgres://root:s3cret@127.0.0.1:99999/test", "port"),
    ];
    for (url, named) in cases {
        match PostgresStore::open(url).await {
            Err(error @ Error::BadUrl { .. }) => {
                let message = error.to_string();
                assert!(message.contains(named), "{url}: {message}");
                assert!(!message.contains("s3cret"), "the password leaked: {message}");
            }
            other => panic!("{url}: expected BadUrl, got {:?}", other.err()),
        }
    }
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_without_the_password() {
    // Port 1 on the loopback refuses at once.
    let result = PostgresStore::open("postgres://root:s3cret@127.0.0.1:1/test?connect_timeout=2").await;
    match result {
        Err(error @ Error::Unavailable(_)) => {
            let message = error.to_string();
            assert!(message.contains("127.0.0.1:1/test"), "{message}");
            assert!(!message.contains("s3cret"), "the password leaked: {message}");
        }
        other => panic!("expected Unavailable, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn operations_recover_after_an_outage() {
    let schema = SchemaGuard::new();
    let options = Options::parse(&schema.base).expect("the test URL parses");
    let relay = Relay::start(&options).await;
    let mut url = url::Url::parse(&schema.url()).expect("the test URL is a URL");
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(relay.address.port())).unwrap();
    let store = PostgresStore::open(url.as_str()).await.unwrap_or_else(|e| no_server(&schema.base, &e));
    assert!(store.claim(&intent("before", 1_000), REVIEW).await.unwrap().decision.executes());

    relay.cut();
    let down = store.claim(&intent("during", 1_000), REVIEW).await;
    assert!(matches!(down, Err(Error::Unavailable(_))), "{down:?}");

    relay.restore();
    // Recovery needs no signal from the store: poll until a claim goes through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        match store.claim(&intent("during", 1_001), REVIEW).await {
            Ok(claim) => break claim,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "never recovered: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(recovered.decision.executes(), "{recovered:?}");
    let before = store.get(&RecordId::new("orders", "t1", "before")).await.unwrap();
    assert!(before.is_some(), "records written before the outage are still there");
}

/// A TCP relay between a store and the server: `cut` breaks every connection and
/// refuses new ones; `restore` lets them through again.
struct Relay {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Relay {
    async fn start(server: &Options) -> Relay {
        let host = match server.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => panic!("the outage test needs a TCP host in {URL_VAR}"),
        };
        let target = format!("{host}:{}", server.pg.get_ports().first().copied().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("the relay listens");
        let address = listener.local_addr().expect("an address");
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (refusing, tasks) = (cut.clone(), connections.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(task);
            }
        });
        Relay { address, cut, connections, acceptor }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}
