//! The ordering guard (`deliver.version`): a message whose version is not newer than the
//! last one applied for its object is acknowledged and skipped.
//!
//! Each object has a record at scope `consumer:{subscriber}/versions`, key = the object's
//! id, whose stored answer is `{"version": V}`, the last version applied. The record is also
//! the lock around applying one: a message claims it (fingerprint = its version, policy
//! [`OnChange::Supersede`], so any version takes over the key unless a live lease holds
//! it), compares its version with the stored one, delivers, and only then records its
//! version. Two messages of one object are never applied at once, by any number of
//! consumers, and the stored version only grows.
//!
//! A consumer that dies between delivering and recording leaves the older version in place
//! (the lease runs out, the next claim takes the record over): a message between the two
//! versions arriving afterwards would be applied. The window is one store write long.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::core::units::millis;
use crate::core::{
    ClaimPolicy, Decision, Fingerprint, Intent, LeaseToken, OnChange, OnUnknown, Outcome, RecordId, Replays,
    StoredResponse,
};
use crate::store::clock::Clock;
use crate::store::{Store, now_millis, owner};

use super::config::VersionPointers;

/// The guard of one subscriber.
pub struct VersionGuard {
    pointers: VersionPointers,
    scope: String,
    store: Arc<dyn Store>,
    retention: Duration,
    lease: Duration,
}

/// What the guard says about a message.
pub enum Check {
    /// Newer than the last applied version: deliver it, then call [`VersionGuard::applied`]
    /// or [`VersionGuard::release`].
    Apply(Holding),
    /// Not newer: acknowledge and skip.
    Stale,
    /// Another message of this object is being applied now: try again later.
    Busy,
    /// The message has no usable object id or version: the poison rule.
    Malformed(String),
    /// The store could not answer.
    Unavailable(String),
}

/// The lock on one object, held while its message is delivered.
pub struct Holding {
    id: RecordId,
    token: LeaseToken,
    version: Value,
    /// The last applied version's record, kept when this one is not applied.
    previous: Option<StoredResponse>,
}

impl VersionGuard {
    /// The guard for `subscriber`'s messages.
    pub fn new(
        pointers: VersionPointers,
        subscriber: &str,
        store: Arc<dyn Store>,
        retention: Duration,
        lease: Duration,
    ) -> Self {
        Self { pointers, scope: format!("consumer:{subscriber}/versions"), store, retention, lease }
    }

    /// Claims the message's object and compares versions.
    pub async fn check(&self, fields: &Map<String, Value>) -> Check {
        let message = Value::Object(fields.clone());
        let object = match message.pointer(&self.pointers.object) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Check::Malformed(format!("{} is not a string or a number", self.pointers.object)),
            None => return Check::Malformed(format!("no object id at {}", self.pointers.object)),
        };
        let version = match message.pointer(&self.pointers.version) {
            Some(v @ (Value::String(_) | Value::Number(_))) => v.clone(),
            Some(_) => return Check::Malformed(format!("{} is not a string or a number", self.pointers.version)),
            None => return Check::Malformed(format!("no version at {}", self.pointers.version)),
        };
        let id = RecordId::new(self.scope.clone(), "", object);
        let intent = Intent {
            id: id.clone(),
            fingerprint: Fingerprint(Sha256::digest(version.to_string().as_bytes()).into()),
            now: now_millis(),
            ttl_ms: millis(self.retention),
            lease_ms: millis(self.lease),
            correlation_id: None,
        };
        let policy = ClaimPolicy {
            on_unknown: OnUnknown::Retry,
            on_change: OnChange::Supersede,
            replays: Replays::Ignore,
            lookup: crate::core::Lookup::None,
        };
        let claim = match self.store.claim(&intent, policy).await {
            Ok(claim) => claim,
            Err(e) => return Check::Unavailable(e.to_string()),
        };
        let previous = claim.record.as_ref().and_then(|r| r.response.clone());
        let last =
            previous.as_ref().and_then(|r| serde_json::from_slice::<Value>(&r.body).ok()).map(|v| v["version"].clone());
        match (claim.decision, claim.token) {
            // The same version as the record's, completed: applied (or found stale) before.
            (Decision::Replay | Decision::NotRetained, _) => Check::Stale,
            (Decision::InFlight, _) => Check::Busy,
            (Decision::Execute(_), Some(token)) => {
                let holding = Holding { id, token, version: version.clone(), previous };
                match last.as_ref().map(|last| compare(&version, last)) {
                    None | Some(Some(Ordering::Greater)) => Check::Apply(holding),
                    Some(Some(_)) => {
                        self.release_stale(holding).await;
                        Check::Stale
                    }
                    Some(None) => {
                        self.release(holding).await;
                        Check::Malformed("its version cannot be compared with the last applied one".into())
                    }
                }
            }
            (decision, _) => Check::Unavailable(format!("unexpected decision {decision:?} on a version record")),
        }
    }

    /// Records the held version as the object's last applied one.
    pub async fn applied(&self, holding: Holding) {
        let body = Bytes::from(json!({ "version": holding.version }).to_string());
        let response = StoredResponse { status: 200, headers: Vec::new(), body, retained: true };
        owner::finish(
            self.store.as_ref(),
            &holding.id,
            holding.token,
            Outcome::Completed(response),
            Clock::System,
            |_| {},
        )
        .await;
    }

    /// Gives the object back unchanged after its message was not applied (it failed, or
    /// will be tried again): a failed attempt keeps the last applied version on the record,
    /// and the same version may claim it again.
    pub async fn release(&self, holding: Holding) {
        let outcome = Outcome::Retryable { error: "not applied".into() };
        owner::finish(self.store.as_ref(), &holding.id, holding.token, outcome, Clock::System, |_| {}).await;
    }

    /// Gives the object back after its message was found stale: completed again with the
    /// last applied version, so a later copy of the stale message replays as stale.
    async fn release_stale(&self, holding: Holding) {
        match holding.previous {
            Some(previous) => {
                let outcome = Outcome::Completed(previous);
                owner::finish(self.store.as_ref(), &holding.id, holding.token, outcome, Clock::System, |_| {}).await;
            }
            None => self.release(holding).await,
        }
    }
}

/// Orders two versions: numbers by value, strings as text (ISO 8601 times, zero-padded
/// counters); `None` when they cannot be compared.
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
            (Some(a), Some(b), _, _) => Some(a.cmp(&b)),
            (_, _, Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
        },
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn guard(store: Arc<dyn Store>) -> VersionGuard {
        let pointers = VersionPointers { object: "/id".into(), version: "/v".into() };
        VersionGuard::new(pointers, "s", store, Duration::from_secs(60), Duration::from_secs(5))
    }

    fn message(id: &str, v: Value) -> Map<String, Value> {
        let Value::Object(map) = json!({ "id": id, "v": v }) else { unreachable!() };
        map
    }

    #[test]
    fn versions_compare_as_numbers_or_text() {
        assert_eq!(compare(&json!(10), &json!(9)), Some(Ordering::Greater));
        assert_eq!(compare(&json!(1.5), &json!(2)), Some(Ordering::Less));
        assert_eq!(compare(&json!("2026-01-02T00:00:00Z"), &json!("2026-01-01T23:00:00Z")), Some(Ordering::Greater));
        assert_eq!(compare(&json!("3"), &json!(2)), None);
    }

    #[tokio::test]
    async fn only_newer_versions_apply_and_one_at_a_time() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let guard = guard(store);
        let Check::Apply(first) = guard.check(&message("o1", json!(2))).await else { panic!("a new object applies") };
        assert!(matches!(guard.check(&message("o1", json!(3))).await, Check::Busy), "one version at a time");
        guard.applied(first).await;
        assert!(matches!(guard.check(&message("o1", json!(2))).await, Check::Stale), "the same version again");
        assert!(matches!(guard.check(&message("o1", json!(1))).await, Check::Stale), "an older version");
        assert!(matches!(guard.check(&message("o1", json!(1))).await, Check::Stale), "and its copy");
        let Check::Apply(third) = guard.check(&message("o1", json!(3))).await else { panic!("newer applies") };
        guard.release(third).await;
        let Check::Apply(again) = guard.check(&message("o1", json!(3))).await else { panic!("a failed one may retry") };
        guard.applied(again).await;
        assert!(matches!(guard.check(&message("o1", json!(2))).await, Check::Stale));
        assert!(matches!(guard.check(&message("o1", json!("x"))).await, Check::Malformed(_)));
        assert!(matches!(guard.check(&message("o1", json!(4))).await, Check::Apply(_)), "the key was given back");
        assert!(matches!(guard.check(&Map::new()).await, Check::Malformed(_)));
    }
}
