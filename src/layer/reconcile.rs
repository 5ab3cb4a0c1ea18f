//! The background reconciler (SPEC §4): unknown outcomes nobody retried are settled by their
//! route's lookup. It scans the store when it starts and every [`SCAN_EVERY`], asks at most
//! [`RATE`] lookups a second, and tries a failed lookup again with backoff. Each lookup runs
//! under the record's lease (`verify::settle` claims it for verification), so on a shared
//! store gateways never verify the same record at once: one takes the lease, the others see
//! it in flight and come back once it ran out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::core::{Decision, Millis, Record, RecordId, Status, key};
use crate::store::clock::Clock;
use crate::store::{Cursor, ListQuery, MAX_PAGE, Store};
use crate::verify::{self, Finding, Lookups, Settled};

/// How often the store is scanned for unknown outcomes.
pub const SCAN_EVERY: Duration = Duration::from_secs(180);
/// Lookups per second, all scopes together.
pub const RATE: u32 = 10;
/// The wait after a failed lookup, doubling up to ten minutes.
const AFTER_FAILURE: Backoff = Backoff::doubling(Duration::from_secs(5), Duration::from_secs(600));

/// A record waiting for its lookup: when it is due and how many lookups failed.
struct Due {
    at: Millis,
    failures: u32,
}

/// Settles unknown outcomes of the scopes in `lookups` until `stop` is cancelled.
pub async fn reconcile(store: Arc<dyn Store>, lookups: Lookups, clock: Clock, stop: CancellationToken) {
    if lookups.is_empty() {
        return;
    }
    let client = match verify::client() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "no HTTP client for lookups: the reconciler does not run");
            return;
        }
    };
    let mut due: BTreeMap<RecordId, Due> = BTreeMap::new();
    let mut next_scan = clock.now();
    loop {
        if clock.now() >= next_scan {
            scan(store.as_ref(), &lookups, clock.now(), &mut due).await;
            next_scan = clock.now() + crate::core::units::millis(SCAN_EVERY);
        }
        let now = clock.now();
        let ready: Vec<RecordId> = due.iter().filter(|(_, d)| d.at <= now).map(|(id, _)| id.clone()).collect();
        for id in ready {
            if stop.is_cancelled() {
                return;
            }
            settle_one(&store, &lookups, &client, clock, &id, &mut due).await;
            tokio::time::sleep(Duration::from_secs(1) / RATE).await;
        }
        let wake = due.values().map(|d| d.at).min().unwrap_or(next_scan).min(next_scan);
        let pause =
            Duration::from_millis(u64::try_from(wake - clock.now()).unwrap_or(0)).max(Duration::from_millis(100));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Adds every unknown record of the lookups' scopes to `due` (now), and every
/// `in_progress` one (due when its lease runs out: its owner may be dead).
async fn scan(store: &dyn Store, lookups: &Lookups, now: Millis, due: &mut BTreeMap<RecordId, Due>) {
    for (scope, _) in lookups.iter() {
        for status in [Status::OutcomeUnknown, Status::InProgress] {
            let mut cursor: Option<Cursor> = None;
            loop {
                let query = ListQuery {
                    scope: Some(scope.to_owned()),
                    status: Some(status),
                    limit: MAX_PAGE,
                    cursor: cursor.clone(),
                    ..ListQuery::default()
                };
                let page = match store.list(&query).await {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::warn!(%error, scope, "reconciler: cannot list records; next scan tries again");
                        break;
                    }
                };
                for record in &page.records {
                    let at = record.lease.map_or(now, |lease| lease.locked_until.max(now));
                    due.entry(record.id.clone()).or_insert(Due { at, failures: 0 });
                }
                cursor = page.next_cursor.as_deref().and_then(Cursor::decode);
                if cursor.is_none() {
                    break;
                }
            }
        }
    }
}

/// One lookup: settled records leave `due`; a failure, or a lease someone else holds, puts
/// the record back for later.
async fn settle_one(
    store: &Arc<dyn Store>,
    lookups: &Lookups,
    client: &reqwest::Client,
    clock: Clock,
    id: &RecordId,
    due: &mut BTreeMap<RecordId, Due>,
) {
    let record: Option<Record> = match store.get(id).await {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(%error, "reconciler: store unavailable; trying again later");
            postpone(due, id, clock.now() + 1_000);
            return;
        }
    };
    let Some(record) = record else {
        due.remove(id);
        return;
    };
    let settled = lookups.settle(store, &record, client, clock).await;
    let key_hash = key::hash_for_logs(&id.key);
    match settled {
        Ok(Some(Settled::Looked(Finding::Failed(why)))) => {
            let entry = due.entry(id.clone()).or_insert(Due { at: 0, failures: 0 });
            entry.failures += 1;
            entry.at = clock.now() + crate::core::units::millis(AFTER_FAILURE.for_attempt(entry.failures));
            tracing::info!(scope = %id.scope, %key_hash, failures = entry.failures, %why, "lookup failed; will ask again");
        }
        Ok(Some(Settled::NotUnknown(Decision::InFlight))) => {
            // Its owner (or another verifier) holds the lease: look again once it ran out.
            let at = record.lease.map_or(clock.now() + 1_000, |lease| lease.locked_until + 1);
            postpone(due, id, at);
        }
        Ok(_) => {
            due.remove(id);
        }
        Err(error) => {
            tracing::warn!(%error, scope = %id.scope, %key_hash, "reconciler: store unavailable; trying again later");
            postpone(due, id, clock.now() + 1_000);
        }
    }
}

fn postpone(due: &mut BTreeMap<RecordId, Due>, id: &RecordId, at: Millis) {
    due.entry(id.clone()).or_insert(Due { at, failures: 0 }).at = at;
}
