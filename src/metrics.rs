//! Prometheus metrics. The names are a public contract (SPEC §4); labels never carry
//! keys, bodies or credentials.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::core::Status;
use crate::store::StatRow;

/// Requests by route and decision.
pub const REQUESTS: &str = "idem_requests_total";
/// Executions that recovered a `failed_retryable` record.
pub const RETRY_RECOVERIES: &str = "idem_retry_recoveries_total";
/// Requests whose key had expired and executed anew.
pub const EXPIRED_KEY_RETRIES: &str = "idem_expired_key_retries_total";
/// Upstream exchange time.
pub const UPSTREAM_SECONDS: &str = "idem_upstream_seconds";
/// Store operation time.
pub const STORE_SECONDS: &str = "idem_store_seconds";
/// Records by status.
pub const RECORDS: &str = "idem_records";
/// Broker messages by subscriber and decision (`idem consume`).
pub const MESSAGES: &str = "idem_messages_total";
/// Messages the broker holds that the subscriber has not received yet.
pub const CONSUMER_LAG: &str = "idem_consumer_lag";
/// Lookups that settled (or failed to settle) an unknown outcome, by scope and result
/// (`found`, `absent`, `failed`).
pub const VERIFICATIONS: &str = "idem_verifications_total";
/// Gauge, always 1, labelled `route` and `upstream`: which API each gateway route forwards to.
pub const ROUTE_UPSTREAM: &str = "idem_route_upstream";

/// The `decision` label of [`REQUESTS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// Forwarded under a fresh claim.
    Executed,
    /// Answered from the store.
    Replayed,
    /// `422`: the key belongs to another payload.
    KeyReused,
    /// `409`: a duplicate while the first is in flight.
    InFlight,
    /// `409`: the outcome is unknown.
    OutcomeUnknown,
    /// No key on a protected route (`400` when required, passed through otherwise).
    MissingKey,
    /// Not a protected request.
    Passthrough,
    /// Refused for any other reason (bad key or body, store down, not retained, OData).
    Rejected,
}

impl Label {
    /// Every label, in the order [`RouteMetrics`] keeps their counters.
    pub const ALL: [Label; 8] = [
        Label::Executed,
        Label::Replayed,
        Label::KeyReused,
        Label::InFlight,
        Label::OutcomeUnknown,
        Label::MissingKey,
        Label::Passthrough,
        Label::Rejected,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Executed => "executed",
            Label::Replayed => "replayed",
            Label::KeyReused => "key_reused",
            Label::InFlight => "in_flight",
            Label::OutcomeUnknown => "outcome_unknown",
            Label::MissingKey => "missing_key",
            Label::Passthrough => "passthrough",
            Label::Rejected => "rejected",
        }
    }
}

/// Installs the process-wide recorder once and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several
            // gateways); the handle still renders this one's view.
            let _ = metrics::set_global_recorder(recorder);
            metrics::describe_counter!(REQUESTS, "Requests by route and idempotency decision");
            metrics::describe_counter!(RETRY_RECOVERIES, "Executions that recovered a failed_retryable record");
            metrics::describe_counter!(EXPIRED_KEY_RETRIES, "Requests whose key had expired and executed anew");
            metrics::describe_histogram!(UPSTREAM_SECONDS, metrics::Unit::Seconds, "Upstream exchange time");
            metrics::describe_histogram!(STORE_SECONDS, metrics::Unit::Seconds, "Store operation time");
            metrics::describe_gauge!(RECORDS, "Records in the store by status");
            metrics::describe_counter!(MESSAGES, "Broker messages by subscriber and decision");
            metrics::describe_counter!(VERIFICATIONS, "Lookups of unknown outcomes by scope and result");
            metrics::describe_gauge!(CONSUMER_LAG, "Messages waiting in the broker for the subscriber");
            // Histogram samples pile up in the recorder until they are folded into their
            // buckets, which rendering `/metrics` does; nobody may scrape, so a thread folds
            // them every few seconds (found by the soak: 17 MB a minute at 6 000 req/s).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new().name("idem-metrics".into()).spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// One route's metric handles, registered once so the hot path does no label lookups.
pub struct RouteMetrics {
    requests: [metrics::Counter; 8],
    retry_recoveries: metrics::Counter,
    expired_key_retries: metrics::Counter,
    upstream: metrics::Histogram,
}

impl RouteMetrics {
    /// Registers the handles of `route` with the installed recorder.
    pub fn new(route: &str) -> Self {
        let route = route.to_owned();
        Self {
            requests: Label::ALL
                .map(|label| metrics::counter!(REQUESTS, "route" => route.clone(), "decision" => label.as_str())),
            retry_recoveries: metrics::counter!(RETRY_RECOVERIES, "route" => route.clone()),
            expired_key_retries: metrics::counter!(EXPIRED_KEY_RETRIES, "route" => route.clone()),
            upstream: metrics::histogram!(UPSTREAM_SECONDS, "route" => route),
        }
    }

    /// Counts one request.
    pub fn request(&self, decision: Label) {
        let index = Label::ALL.iter().position(|l| *l == decision).unwrap_or(Label::ALL.len() - 1);
        self.requests[index].increment(1);
    }

    /// Counts a retry recovery.
    pub fn retry_recovery(&self) {
        self.retry_recoveries.increment(1);
    }

    /// Counts an expired-key retry.
    pub fn expired_key_retry(&self) {
        self.expired_key_retries.increment(1);
    }

    /// Records an upstream exchange's duration.
    pub fn upstream_time(&self, took: Duration) {
        self.upstream.record(took.as_secs_f64());
    }
}

/// Store operation timers, registered once.
pub struct StoreMetrics {
    /// `claim`.
    pub claim: metrics::Histogram,
    /// `finish`.
    pub finish: metrics::Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            claim: metrics::histogram!(STORE_SECONDS, "op" => "claim"),
            finish: metrics::histogram!(STORE_SECONDS, "op" => "finish"),
        }
    }
}

/// Publishes which upstream a route forwards to (`idem_route_upstream{route,upstream} 1`).
pub fn set_route_upstream(route: &str, upstream: &str) {
    metrics::gauge!(ROUTE_UPSTREAM, "route" => route.to_owned(), "upstream" => upstream.to_owned()).set(1.0);
}

/// Counts one lookup of an unknown outcome (`result`: `found`, `absent` or `failed`).
pub fn verification(scope: &str, result: &'static str) {
    metrics::counter!(VERIFICATIONS, "scope" => scope.to_owned(), "result" => result).increment(1);
}

/// Sets the record gauges from store stats.
pub fn set_records(stats: &[StatRow]) {
    for status in Status::ALL {
        let count: u64 = stats.iter().filter(|s| s.status == status).map(|s| s.count).sum();
        metrics::gauge!(RECORDS, "status" => status.as_str()).set(count as f64);
    }
}
