//! The in-memory reference store: the simplest correct implementation of the trait,
//! for unit tests and `memory://`. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Claim, Cursor, Error, ListQuery, MAX_PAGE, Page, StatRow, Store, new_token};
use crate::core::{
    ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution, Status, Transition, plan_claim,
    resolve,
};

/// Records in a map behind one mutex: every operation is atomic by construction.
#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<HashMap<RecordId, Record>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RecordId, Record>> {
        // A panic elsewhere cannot leave a record half-written: every update is a whole
        // insert, so the map stays usable after poisoning.
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether a record passes a list query's filters (cursor included).
pub(crate) fn matches(query: &ListQuery, record: &Record) -> bool {
    query.scope.as_ref().is_none_or(|s| &record.id.scope == s)
        && query.tenant.as_ref().is_none_or(|t| &record.id.tenant == t)
        && query.status.is_none_or(|s| record.status == s)
        && query.key_prefix.as_ref().is_none_or(|p| record.id.key.starts_with(p.as_str()))
        && query.cursor.as_ref().is_none_or(|c| c.precedes(record))
}

/// Builds a page from records already sorted newest first, one more than the limit
/// having been fetched to learn whether a next page exists.
pub(crate) fn page(mut records: Vec<Record>, limit: usize) -> Page {
    let limit = limit.clamp(1, MAX_PAGE);
    let more = records.len() > limit;
    records.truncate(limit);
    let next_cursor = if more { records.last().map(|r| Cursor::after(r).encode()) } else { None };
    Page { records, next_cursor }
}

#[async_trait]
impl Store for MemoryStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        let mut records = self.lock();
        let existing = records.get(&intent.id).cloned();
        let plan = plan_claim(existing.as_ref(), intent, policy, new_token);
        if let Transition::Touch(record) | Transition::Write(record) = &plan.transition {
            records.insert(record.id.clone(), record.clone());
        }
        Ok(Claim::planned(plan, existing))
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        Ok(self.lock().get_mut(id).is_some_and(|record| record.renew(token, locked_until)))
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        Ok(self.lock().get_mut(id).is_some_and(|record| record.finish(token, outcome, now)))
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let mut found: Vec<Record> = self.lock().values().filter(|r| matches(query, r)).cloned().collect();
        found.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(page(found, query.limit))
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        Ok(self.lock().remove(id).is_some())
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        let mut records = self.lock();
        let record = records.get_mut(id).ok_or(Error::NotFound)?;
        *record = resolve(record, resolution, now)?;
        Ok(record.clone())
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        let mut records = self.lock();
        let expired: Vec<RecordId> =
            records.values().filter(|r| r.is_expired(now)).take(limit).map(|r| r.id.clone()).collect();
        for id in &expired {
            records.remove(id);
        }
        Ok(expired.len() as u64)
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        let mut counts: BTreeMap<(String, Status), u64> = BTreeMap::new();
        for record in self.lock().values() {
            *counts.entry((record.id.scope.clone(), record.status)).or_default() += 1;
        }
        Ok(counts.into_iter().map(|((scope, status), count)| StatRow { scope, status, count }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::conformance_tests!(MemoryStore::default());
    crate::rule_tests!(MemoryStore::default());

    #[async_trait]
    impl crate::store::conformance::Seed for MemoryStore {
        async fn seed(&self, record: &Record) {
            self.lock().insert(record.id.clone(), record.clone());
        }
    }
}
