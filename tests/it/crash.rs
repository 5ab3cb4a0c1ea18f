//! The crash-and-history harness (issue 6): concurrent clients send intents through
//! gateways that are `kill -9`ed and restarted at random moments, retrying each intent
//! with the same key and body (as Stripe's SDKs do) until a final answer. Every client
//! operation is logged; a checker then proves, on that history, the upstream's effects and
//! the store's records, that no key took effect twice, that every final answer a client
//! received is the one effect's answer and still replays after a crash, and that every
//! in-flight loss ended as an explicit `outcome_unknown` (SPEC §1, §2) — or, with a
//! `verify` lookup on the route, that none is left unknown (SPEC §4).
//!
//! Short by default, for CI. `IDEM_CRASH_KILLS=60` makes a long run (`bench/crash.sh`);
//! `IDEM_CRASH_CLIENTS` sets the number of clients; `IDEM_CRASH_SEED` repeats a run's
//! random choices (bodies, upstream delays, kill moments; the interleaving stays the
//! machine's). Each run writes its history, one JSON object a line, to
//! `target/tmp/crash-STORE.jsonl`, and on failure the gateways' logs next to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::error::Error as _;
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::{Gateway, Reply, Upstream, client_with_timeout, idem_log, postgres_store, try_send};

/// A short lease, so the request of a killed gateway turns into `outcome_unknown` quickly.
const ROUTES: &str = r#"
    [[routes]]
    name = "orders"
    methods = ["POST"]
    path = "/orders"
    lease = "1s"
    key = { header = "Idempotency-Key", required = true }
"#;

/// Kills per store in the short (CI) mode.
const SHORT_KILLS: usize = 10;
/// Concurrent clients unless `IDEM_CRASH_CLIENTS` says otherwise.
const CLIENTS: usize = 16;
/// How long a gateway runs between its restart and the next kill, in milliseconds.
const KILL_EVERY_MS: std::ops::Range<u64> = 100..700;
/// How late the upstream answers (`X-Demo-Delay`), in milliseconds, so kills land while
/// requests are in flight; one intent in `SLOW_ONE_IN` is slower still.
const DELAY_MS: std::ops::Range<u64> = 0..40;
const SLOW_DELAY_MS: std::ops::Range<u64> = 100..400;
const SLOW_ONE_IN: u32 = 10;
/// One intent in `IMPATIENT_ONE_IN` has a client timeout in `PATIENCE_MS`, often shorter
/// than its upstream delay: the client hangs up, the gateway finishes the call anyway and
/// a retry gets the answer replayed.
const IMPATIENT_ONE_IN: u32 = 10;
const PATIENCE_MS: std::ops::Range<u64> = 20..200;
/// One attempt's budget otherwise: far above any upstream delay, so a timeout means a
/// hung gateway.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// An intent's budget: many leases (1 s) and restarts long.
const INTENT_DEADLINE: Duration = Duration::from_secs(30);
/// Pauses before a retry: after a transport error (the gateway may be restarting), after
/// `409 request-in-flight` (a lease must run out) and after a retryable error answer.
const TRANSPORT_PAUSE: Duration = Duration::from_millis(20);
const IN_FLIGHT_PAUSE: Duration = Duration::from_millis(100);
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Whether the run may end with intents `outcome_unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unknowns {
    /// Without a lookup, a loss in flight is an explicit `outcome_unknown`.
    Explicit,
    /// With a `verify` lookup on the route, every one is settled: none is left.
    Settled,
}

#[tokio::test]
async fn a_sqlite_gateway_killed_at_random_moments_never_duplicates_nor_loses() {
    let upstream = Upstream::start().await;
    // The gateway's own SQLite file in its temp dir, with the default synchronous=full.
    let gateway = Gateway::builder(&upstream.url(), ROUTES).start().await;
    run("sqlite", &upstream, vec![gateway], Unknowns::Explicit).await;
}

/// The same, with a lookup on the route (SPEC §4, "Settling unknown outcomes"): a retry
/// that meets an unknown outcome asks the demo upstream whether it executed the key, so no
/// intent is left unknown, still without a duplicate or a lost answer.
#[tokio::test]
async fn a_sqlite_gateway_with_a_lookup_killed_at_random_moments_leaves_nothing_unknown() {
    let upstream = Upstream::start().await;
    let lookup = format!(
        "verify = {{ url = \"{}/_demo/lookup?idempotency_key={{{{key}}}}\", found = \"/data/0\", status = 201 }}\n",
        upstream.url()
    );
    let gateway = Gateway::builder(&upstream.url(), &format!("{ROUTES}{lookup}")).start().await;
    run("sqlite-verify", &upstream, vec![gateway], Unknowns::Settled).await;
}

#[tokio::test]
async fn two_postgres_gateways_killed_in_turn_never_duplicate_nor_lose() {
    let store = postgres_store();
    let upstream = Upstream::start().await;
    let a = Gateway::builder(&upstream.url(), ROUTES).store(&store.url).start().await;
    let b = Gateway::builder(&upstream.url(), ROUTES).store(&store.url).start().await;
    run("postgres", &upstream, vec![a, b], Unknowns::Explicit).await;
}

/// What a run does, from the environment.
struct Settings {
    kills: usize,
    clients: usize,
    seed: u64,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            kills: env_number("IDEM_CRASH_KILLS").unwrap_or(SHORT_KILLS),
            clients: env_number("IDEM_CRASH_CLIENTS").unwrap_or(CLIENTS),
            seed: env_number("IDEM_CRASH_SEED").unwrap_or_else(rand::random),
        }
    }
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let text = std::env::var(name).ok()?;
    Some(text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

/// One intended action of a client: a key and a body, sent until a final answer.
struct Intent {
    key: String,
    body: Value,
    /// `X-Demo-Delay` in milliseconds, the same on every retry.
    delay_ms: u64,
    /// The client's timeout per attempt, when shorter than `ATTEMPT_TIMEOUT`.
    patience: Option<Duration>,
    ops: Vec<Op>,
    end: End,
}

impl Intent {
    /// The `n`th intent of client `index`, not sent yet.
    fn new(index: usize, n: usize, rng: &mut StdRng) -> Intent {
        let delay = if rng.random_ratio(1, SLOW_ONE_IN) { SLOW_DELAY_MS } else { DELAY_MS };
        // The nonce makes every body unique: an answer echoing it belongs to this intent.
        let (amount, nonce) = (rng.random_range(1..100_000), rng.random::<u64>());
        Intent {
            key: format!("c{index}-{n}"),
            body: json!({ "client": index, "intent": n, "amount": amount, "nonce": nonce }),
            delay_ms: rng.random_range(delay),
            patience: rng
                .random_ratio(1, IMPATIENT_ONE_IN)
                .then(|| Duration::from_millis(rng.random_range(PATIENCE_MS))),
            ops: Vec::new(),
            end: End::GaveUp,
        }
    }
}

/// One attempt, as its client saw it.
struct Op {
    /// Milliseconds since the run started, when the request was sent.
    sent_ms: u64,
    /// Milliseconds since the run started, when the answer (or the error) came.
    at_ms: u64,
    attempt: u32,
    /// Which gateway it was sent to.
    gateway: usize,
    result: String,
}

/// How an intent ended for its client.
enum End {
    /// A final answer (`201`, executed or replayed).
    Final { body: Vec<u8>, replayed: bool },
    /// `409 outcome-unknown`: executed or not, nobody knows; nothing will execute it again.
    Unknown,
    /// An answer no retry of an unchanged intent may get.
    Unexpected(String),
    /// No final answer before `INTENT_DEADLINE`.
    GaveUp,
}

/// A `kill -9` the harness did.
struct Kill {
    at_ms: u64,
    gateway: usize,
    /// When the restarted gateway was ready again.
    ready_ms: u64,
}

/// What the harness shares with its clients.
#[derive(Clone)]
struct World {
    /// The client URL of each gateway; a killed gateway's stays until it is back on new ports.
    urls: watch::Receiver<Vec<String>>,
    /// Set when the last kill is done: clients finish the intent they are on, then stop.
    stop: Arc<AtomicBool>,
    started: Instant,
}

/// One run of the harness on `gateways` (which share a store): traffic and kills, a final
/// crash and restart, a replay of every intent, then the checker.
async fn run(store: &str, upstream: &Upstream, mut gateways: Vec<Gateway>, unknowns: Unknowns) {
    let settings = Settings::from_env();
    let started = Instant::now();
    let (intents, kills) = traffic_and_kills(&settings, &mut gateways, started).await;
    // A last crash with every intent settled: what survives is what the store made durable.
    for gateway in &mut gateways {
        gateway.kill9();
        gateway.restart().await;
    }
    let urls: Vec<String> = gateways.iter().map(|g| g.url("/orders")).collect();
    let replays = replay_all(&intents, &urls, settings.clients).await;
    let stats = upstream.stats().await;
    let records = records_by_key(gateways[0].store_url());
    let mut report = check(&intents, &stats, &records, &replays);
    report.figures.kills = kills.len();
    if unknowns == Unknowns::Settled {
        let left: Vec<&String> =
            records.iter().filter(|(_, r)| r["status"] == "outcome_unknown").map(|(k, _)| k).collect();
        if report.figures.unknown > 0 || !left.is_empty() {
            let what = format!("{} intents ended unknown; records left unknown: {left:?}", report.figures.unknown);
            report.violations.push(("*".into(), what));
        }
    }
    let history = write_history(store, &intents, &kills, &stats, &records);
    println!(
        "crash harness ({store}): {}, seed {}, clients {}, wall {:.1}s (history: {})",
        report.figures,
        settings.seed,
        settings.clients,
        started.elapsed().as_secs_f64(),
        history.display()
    );
    if !report.violations.is_empty() {
        keep_gateway_logs(store, &gateways);
    }
    drop(gateways);
    assert!(report.violations.is_empty(), "{}", report.explain(&intents, &kills, store, settings.seed));
}

/// Runs the clients while `kill_at_random` does its kills; then lets each client settle
/// the intent it is on. Returns every intent and every kill.
async fn traffic_and_kills(
    settings: &Settings,
    gateways: &mut [Gateway],
    started: Instant,
) -> (Vec<Intent>, Vec<Kill>) {
    let (urls, urls_rx) = watch::channel(gateways.iter().map(|g| g.url("/orders")).collect::<Vec<_>>());
    let world = World { urls: urls_rx, stop: Arc::new(AtomicBool::new(false)), started };
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..settings.clients {
        let seed = settings.seed.wrapping_add(1 + index as u64);
        clients.spawn(client(index, seed, world.clone()));
    }
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let kills = kill_at_random(gateways, &urls, settings.kills, &mut rng, started).await;
    world.stop.store(true, Ordering::SeqCst);
    let mut intents = Vec::new();
    while let Some(done) = clients.join_next().await {
        intents.extend(done.expect("a client task"));
    }
    (intents, kills)
}

/// Kills a gateway (in turn, when there are several) `count` times, each after a random
/// while, and starts it again on the same store at once. Returns the kills.
async fn kill_at_random(
    gateways: &mut [Gateway],
    urls: &watch::Sender<Vec<String>>,
    count: usize,
    rng: &mut StdRng,
    started: Instant,
) -> Vec<Kill> {
    let mut kills = Vec::with_capacity(count);
    for n in 0..count {
        // The pace of the harness, not an assertion: traffic runs until the next kill.
        tokio::time::sleep(Duration::from_millis(rng.random_range(KILL_EVERY_MS))).await;
        let victim = n % gateways.len();
        gateways[victim].kill9();
        let at_ms = millis_since(started);
        gateways[victim].restart().await;
        let url = gateways[victim].url("/orders");
        urls.send_modify(|urls| urls[victim] = url);
        kills.push(Kill { at_ms, gateway: victim, ready_ms: millis_since(started) });
    }
    kills
}

/// A client: intents one after the other until the harness says stop.
async fn client(index: usize, seed: u64, world: World) -> Vec<Intent> {
    let mut rng = StdRng::seed_from_u64(seed);
    // Its own connections, as an independent client would have.
    let http = client_with_timeout(ATTEMPT_TIMEOUT);
    let mut intents = Vec::new();
    while !world.stop.load(Ordering::SeqCst) {
        let n = intents.len();
        let mut intent = Intent::new(index, n, &mut rng);
        intent.end = send_until_final(&http, &world, index + n, &mut intent).await;
        intents.push(intent);
    }
    intents
}

/// Sends an intent, the same key and body every time, until an answer ends it. Each try
/// goes to the next gateway (a load balancer's round robin), logged in `intent.ops`.
async fn send_until_final(http: &reqwest::Client, world: &World, first: usize, intent: &mut Intent) -> End {
    let deadline = Instant::now() + INTENT_DEADLINE;
    for attempt in 1.. {
        let (gateway, url) = {
            let urls = world.urls.borrow();
            let gateway = (first + attempt as usize) % urls.len();
            (gateway, urls[gateway].clone())
        };
        let mut request = http
            .post(url)
            .header("Idempotency-Key", &intent.key)
            .header("X-Demo-Delay", format!("{}ms", intent.delay_ms))
            .json(&intent.body);
        if let Some(patience) = intent.patience {
            request = request.timeout(patience);
        }
        let sent_ms = millis_since(world.started);
        let (next, result) = next_step(&try_send(request).await);
        intent.ops.push(Op { sent_ms, at_ms: millis_since(world.started), attempt, gateway, result });
        match next {
            Next::End(end) => return end,
            Next::Retry(_) if Instant::now() > deadline => return End::GaveUp,
            // A client's back-off between retries, as every SDK has one.
            Next::Retry(pause) => tokio::time::sleep(pause).await,
        }
    }
    unreachable!("the attempts never run out")
}

/// What a client does after an attempt.
enum Next {
    End(End),
    Retry(Duration),
}

/// Decides what a client does with an attempt's result; also returns how to log it.
fn next_step(result: &Result<Reply, reqwest::Error>) -> (Next, String) {
    let reply = match result {
        Ok(reply) => reply,
        Err(error) => return (Next::Retry(TRANSPORT_PAUSE), transport_error(error)),
    };
    let kind = problem_type(reply);
    let logged =
        format!("{} {}", reply.status, kind.as_deref().unwrap_or(if reply.replayed() { "replayed" } else { "" }));
    let next = match (reply.status, kind.as_deref()) {
        (201, None) => Next::End(End::Final { body: reply.body.clone(), replayed: reply.replayed() }),
        (409, Some("request-in-flight")) => Next::Retry(IN_FLIGHT_PAUSE),
        (409, Some("outcome-unknown")) => Next::End(End::Unknown),
        // Nothing was sent (retry is safe), or the store is briefly out of reach.
        (502, Some("upstream-unavailable")) | (503, Some("store-unavailable")) => Next::Retry(ERROR_PAUSE),
        // Sent and not answered: the record is outcome_unknown; the retry says so.
        (502, Some("upstream-outcome-unknown")) | (504, Some("upstream-timeout")) => Next::Retry(ERROR_PAUSE),
        _ => Next::End(End::Unexpected(format!("{reply:?}"))),
    };
    (next, logged.trim_end().to_owned())
}

/// The problem `type` of an `application/problem+json` answer.
fn problem_type(reply: &Reply) -> Option<String> {
    if reply.header("content-type") != Some("application/problem+json") {
        return None;
    }
    let body: Value = serde_json::from_slice(&reply.body).ok()?;
    Some(body["type"].as_str()?.to_owned())
}

/// A transport error in one line: its kind and its innermost cause.
fn transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connect"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut cause = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        cause = inner.to_string();
        source = inner.source();
    }
    format!("transport error ({kind}): {cause}")
}

fn millis_since(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

/// Sends every settled intent once more through the restarted gateways: a final answer
/// must come back as the same answer replayed, an unknown outcome must stay unknown.
/// Returns, per key, what came back instead.
async fn replay_all(intents: &[Intent], urls: &[String], tasks: usize) -> BTreeMap<String, String> {
    let expected: Vec<Expected> = intents
        .iter()
        .filter_map(|i| match &i.end {
            End::Final { body, .. } => Some((i.key.clone(), i.body.clone(), Some(body.clone()))),
            End::Unknown => Some((i.key.clone(), i.body.clone(), None)),
            End::Unexpected(_) | End::GaveUp => None,
        })
        .collect();
    let chunk = expected.len().div_ceil(tasks.max(1)).max(1);
    let mut set = tokio::task::JoinSet::new();
    for (n, batch) in expected.chunks(chunk).enumerate() {
        set.spawn(replay_batch(urls[n % urls.len()].clone(), batch.to_vec()));
    }
    let mut wrong = BTreeMap::new();
    while let Some(done) = set.join_next().await {
        wrong.extend(done.expect("a replay task"));
    }
    wrong
}

/// A settled intent's key and body, and what a replay must answer: the final answer's
/// body again, or (`None`) `409 outcome-unknown`.
type Expected = (String, Value, Option<Vec<u8>>);

async fn replay_batch(url: String, batch: Vec<Expected>) -> Vec<(String, String)> {
    let http = client_with_timeout(ATTEMPT_TIMEOUT);
    let mut wrong = Vec::new();
    for (key, body, answer) in batch {
        let reply = try_send(http.post(&url).header("Idempotency-Key", &key).json(&body)).await;
        let fine = match (&reply, &answer) {
            (Ok(reply), Some(answer)) => reply.status == 201 && reply.replayed() && &reply.body == answer,
            (Ok(reply), None) => reply.status == 409 && problem_type(reply).as_deref() == Some("outcome-unknown"),
            (Err(_), _) => false,
        };
        if !fine {
            let got = match &reply {
                Ok(reply) => format!("{reply:?}"),
                Err(error) => transport_error(error),
            };
            wrong.push((key, got));
        }
    }
    wrong
}

/// Every record of the `orders` scope, read from the store by `idem log`, by key.
fn records_by_key(store: &str) -> BTreeMap<String, Value> {
    let listed = idem_log(store, &["list", "--scope", "orders", "--json"]).json();
    let records = listed["records"].as_array().expect("a list of records");
    records.iter().map(|r| (r["key"].as_str().expect("a key").to_owned(), r.clone())).collect()
}

/// The checker's counts; `Display` is the line the harness prints.
#[derive(Default)]
struct Figures {
    intents: usize,
    attempts: usize,
    kills: usize,
    effects: u64,
    finals: usize,
    replayed_finals: usize,
    duplicates: usize,
    lost: usize,
    unknown: usize,
    unknown_unexecuted: usize,
    gave_up: usize,
    unexpected: usize,
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "intents {}, kills {}, effects {}, duplicates {}, lost {}, unknown {} ({} never executed), gave up {}, \
             unexpected {}, final answers {} ({} of them replays), attempts {}",
            self.intents,
            self.kills,
            self.effects,
            self.duplicates,
            self.lost,
            self.unknown,
            self.unknown_unexecuted,
            self.gave_up,
            self.unexpected,
            self.finals,
            self.replayed_finals,
            self.attempts
        )
    }
}

/// The checker's verdict: the figures and every broken promise, by key.
struct Report {
    figures: Figures,
    violations: Vec<(String, String)>,
}

/// Checks the history against the upstream's effects (`stats`), the store's records and
/// the replay pass.
fn check(
    intents: &[Intent],
    stats: &Value,
    records: &BTreeMap<String, Value>,
    replays: &BTreeMap<String, String>,
) -> Report {
    let effects: BTreeMap<String, u64> = stats["by_key"]
        .as_object()
        .expect("effects by key")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a count")))
        .collect();
    let mut report = Report { figures: Figures::default(), violations: Vec::new() };
    report.figures.effects = stats["calls"].as_u64().expect("calls");
    let mut answer_ids: HashMap<String, String> = HashMap::new();
    for intent in intents {
        let executed = effects.get(&intent.key).copied().unwrap_or(0);
        report.check_intent(intent, executed, records.get(&intent.key), replays.get(&intent.key), &mut answer_ids);
    }
    let known: HashSet<&str> = intents.iter().map(|i| i.key.as_str()).collect();
    for key in effects.keys().chain(records.keys()).filter(|k| !known.contains(k.as_str())) {
        report.violations.push((key.clone(), "an effect or a record of a key no client sent".into()));
    }
    if effects.values().sum::<u64>() != report.figures.effects {
        report.violations.push(("*".into(), "the upstream executed calls without a key".into()));
    }
    report
}

impl Report {
    /// Checks one intent: its end, its effects, its record and its replay.
    fn check_intent(
        &mut self,
        intent: &Intent,
        executed: u64,
        record: Option<&Value>,
        replay: Option<&String>,
        answer_ids: &mut HashMap<String, String>,
    ) {
        self.figures.intents += 1;
        self.figures.attempts += intent.ops.len();
        let status = record.and_then(|r| r["status"].as_str()).unwrap_or("(no record)");
        if executed > 1 {
            self.figures.duplicates += 1;
            self.violate(intent, format!("executed {executed} times (record {status})"));
        }
        match &intent.end {
            End::Final { body, replayed } => {
                self.figures.finals += 1;
                self.figures.replayed_finals += usize::from(*replayed);
                self.check_final(intent, body, executed, record, replay, answer_ids);
            }
            End::Unknown => {
                self.figures.unknown += 1;
                self.figures.unknown_unexecuted += usize::from(executed == 0);
                if status != "outcome_unknown" || replay.is_some() {
                    self.violate(intent, format!("answered outcome-unknown, record {status}, replay {replay:?}"));
                }
            }
            End::GaveUp => {
                self.figures.gave_up += 1;
                // Not settled for the client, so the store must say so explicitly.
                let explicit = status == "outcome_unknown"
                    || (executed == 0 && matches!(status, "failed_retryable" | "(no record)"));
                if !explicit {
                    self.violate(intent, format!("no final answer in time; record {status}, {executed} effects"));
                }
            }
            End::Unexpected(reply) => {
                self.figures.unexpected += 1;
                self.violate(intent, format!("an unexpected answer: {reply}"));
            }
        }
    }

    /// A final answer: one effect, this intent's answer, kept completed in the store with
    /// that answer, and replayed after the last crash.
    fn check_final(
        &mut self,
        intent: &Intent,
        body: &[u8],
        executed: u64,
        record: Option<&Value>,
        replay: Option<&String>,
        answer_ids: &mut HashMap<String, String>,
    ) {
        if executed == 0 {
            self.violate(intent, "a final answer, but no effect".into());
        }
        let answer: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if answer["received"] != intent.body || answer["idempotency_key"] != intent.key.as_str() {
            self.violate(intent, format!("the answer is another intent's: {answer}"));
        }
        let id = answer["id"].as_str().unwrap_or_default().to_owned();
        if let Some(other) = answer_ids.insert(id.clone(), intent.key.clone()) {
            self.violate(intent, format!("answer {id} was also given to {other}"));
        }
        let kept = record.is_some_and(|r| {
            r["status"] == "completed" && r["response"]["body"].as_str().map(str::as_bytes) == Some(body)
        });
        if !kept || replay.is_some() {
            self.figures.lost += 1;
            self.violate(intent, format!("a final answer not kept: record {record:?}, replay {replay:?}"));
        }
    }

    fn violate(&mut self, intent: &Intent, what: String) {
        self.violations.push((intent.key.clone(), what));
    }

    /// The failure message: each broken promise with its intent's history and the kills
    /// around it, and how to run it again.
    fn explain(&self, intents: &[Intent], kills: &[Kill], store: &str, seed: u64) -> String {
        let by_key: HashMap<&str, &Intent> = intents.iter().map(|i| (i.key.as_str(), i)).collect();
        let mut text = format!(
            "{} broken promises on {store} (run again with IDEM_CRASH_SEED={seed}); {}\n",
            self.violations.len(),
            self.figures
        );
        for (key, what) in self.violations.iter().take(20) {
            text.push_str(&format!("\n{key}: {what}\n"));
            if let Some(intent) = by_key.get(key.as_str()) {
                text.push_str(&history_of(intent, kills));
            }
        }
        text
    }
}

/// An intent's attempts, interleaved with the kills that happened meanwhile.
fn history_of(intent: &Intent, kills: &[Kill]) -> String {
    let patience = intent.patience.map_or(String::new(), |p| format!(", client timeout {p:?}"));
    let mut lines = vec![(0, format!("  body {}, upstream delay {}ms{patience}", intent.body, intent.delay_ms))];
    for op in &intent.ops {
        let Op { sent_ms, at_ms, attempt, gateway, result } = op;
        lines.push((*sent_ms, format!("  {sent_ms:>7}..{at_ms}ms attempt {attempt} to gateway {gateway}: {result}")));
    }
    let from = intent.ops.first().map_or(0, |o| o.sent_ms);
    let to = intent.ops.last().map_or(0, |o| o.at_ms);
    for kill in kills.iter().filter(|k| (from..=to).contains(&k.at_ms)) {
        let Kill { at_ms, gateway, ready_ms } = kill;
        lines.push((*at_ms, format!("  {at_ms:>7}ms kill -9 of gateway {gateway} (ready again at {ready_ms}ms)")));
    }
    lines.sort_by_key(|(at, _)| *at);
    lines.into_iter().map(|(_, line)| line + "\n").collect()
}

/// Where a run's files go: `target/tmp`, kept after the test.
fn output_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Writes the run's history (client operations, kills, effects and final records) as JSON
/// Lines; returns the file's path.
fn write_history(
    store: &str,
    intents: &[Intent],
    kills: &[Kill],
    stats: &Value,
    records: &BTreeMap<String, Value>,
) -> PathBuf {
    let path = output_path(&format!("crash-{store}.jsonl"));
    let file = std::fs::File::create(&path).expect("the history file is created");
    let mut out = std::io::BufWriter::new(file);
    let mut line = |value: Value| writeln!(out, "{value}").expect("the history is written");
    for kill in kills {
        line(json!({ "kill": kill.gateway, "at_ms": kill.at_ms, "ready_ms": kill.ready_ms }));
    }
    for intent in intents {
        for op in &intent.ops {
            let Op { sent_ms, at_ms, attempt, gateway, result } = op;
            line(json!({
                "key": intent.key, "sent_ms": sent_ms, "at_ms": at_ms,
                "attempt": attempt, "gateway": gateway, "result": result,
            }));
        }
        let effects = stats["by_key"][&intent.key].as_u64().unwrap_or(0);
        let record = records.get(&intent.key).map(|r| r["status"].clone());
        let patience_ms = intent.patience.map(|p| p.as_millis() as u64);
        line(json!({
            "key": intent.key, "end": end_name(&intent.end), "effects": effects, "record": record,
            "delay_ms": intent.delay_ms, "patience_ms": patience_ms,
        }));
    }
    out.flush().expect("the history is written");
    path
}

fn end_name(end: &End) -> &'static str {
    match end {
        End::Final { replayed: false, .. } => "final",
        End::Final { replayed: true, .. } => "final (replayed)",
        End::Unknown => "outcome_unknown",
        End::Unexpected(_) => "unexpected",
        End::GaveUp => "gave up",
    }
}

/// Copies every gateway's logs (all its starts) next to the history, before the temp
/// dirs holding them go away.
fn keep_gateway_logs(store: &str, gateways: &[Gateway]) {
    for (n, gateway) in gateways.iter().enumerate() {
        let path = output_path(&format!("crash-{store}-gateway-{n}.log"));
        std::fs::write(&path, gateway.logs()).expect("the gateway's logs are kept");
        eprintln!("gateway {n} logs: {}", path.display());
    }
}
