//! The re-run triage: source items are read ahead in batches of [`BATCH`] and checked
//! against the ledger in one store read per batch, so a record whose every step was sent
//! before is counted at once, without a task or a claim. Only the others are scheduled.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::step::policy;
use super::{Engine, Mode};
use crate::core::{Decision, Intent, Record, RecordId, decide};
use crate::runner::call::{self, Variant};
use crate::runner::output::{RecordReport, StepReport, StepResult};
use crate::runner::source::{self, Item, SourceRecord};
use crate::store::now_millis;
use crate::template::Context;

/// Source items read ahead and checked against the ledger in one store read.
const BATCH: usize = 1024;

/// A source item after [`Engine::triage`].
pub(super) enum Triage {
    /// Nothing to send: its report.
    Done(RecordReport),
    /// Its steps must run.
    Todo(SourceRecord),
}

impl Engine {
    /// Reads the source in batches and triages them, two batches at a time (one waits on
    /// the store while the other is checked), ahead of the records in flight.
    pub(super) fn triage_ahead(self: &Arc<Self>, records: mpsc::Receiver<Item>) -> mpsc::Receiver<Triage> {
        let (triaged, receiver) = mpsc::channel(BATCH);
        // Shared by the two triage tasks: one of them at a time takes a whole batch.
        let records = Arc::new(tokio::sync::Mutex::new(records));
        for _ in 0..2 {
            let (engine, records, triaged) = (self.clone(), records.clone(), triaged.clone());
            tokio::spawn(async move {
                loop {
                    let Some(batch) = next_batch(&records).await else { return };
                    for item in engine.triage(batch).await {
                        if triaged.send(item).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
        receiver
    }

    /// Sorts a batch of source items: lines that are not records and records whose every
    /// step the ledger shows as sent (the decision is a replay, which writes nothing) are
    /// done; the others are to run. One store read for the whole batch.
    async fn triage(&self, batch: Vec<Item>) -> Vec<Triage> {
        let mut keyed: Vec<(SourceRecord, String)> = Vec::with_capacity(batch.len());
        let mut triaged: Vec<Triage> = Vec::with_capacity(batch.len());
        for item in batch {
            match item {
                Err(bad) => triaged.push(Triage::Done(bad_line(bad))),
                Ok(record) => match source::primary_key(&record.fields, &self.flow.source.primary_key) {
                    Ok(key) => keyed.push((record, key)),
                    Err(_) => triaged.push(Triage::Todo(record)),
                },
            }
        }
        // A dry run previews every step on its own (`preview.rs`).
        if self.mode == Mode::DryRun || keyed.is_empty() {
            triaged.extend(keyed.into_iter().map(|(record, _)| Triage::Todo(record)));
            return triaged;
        }
        let steps = &self.flow.steps;
        let ids: Vec<RecordId> = keyed
            .iter()
            .flat_map(|(_, key)| steps.iter().map(|step| RecordId::new(self.flow.scope(&step.name), "", key.as_str())))
            .collect();
        let Ok(ledger) = self.store.get_many(&ids).await else {
            // The steps' own claims will retry the store and report it.
            triaged.extend(keyed.into_iter().map(|(record, _)| Triage::Todo(record)));
            return triaged;
        };
        for ((record, key), entries) in keyed.into_iter().zip(ledger.chunks(steps.len())) {
            match self.all_sent(&record.fields, &key, entries) {
                Some(steps) => {
                    triaged.push(Triage::Done(RecordReport { line: record.line, key: Some(key), steps, error: None }))
                }
                None => triaged.push(Triage::Todo(record)),
            }
        }
        triaged
    }

    /// The steps' reports when the ledger says every step of the record was sent, with
    /// this very request: the same decision as a claim's (`decide` says `Replay`).
    fn all_sent(&self, fields: &Map<String, Value>, pk: &str, entries: &[Option<Record>]) -> Option<Vec<StepReport>> {
        let mut captures: HashMap<String, Map<String, Value>> = HashMap::new();
        let mut reports = Vec::with_capacity(entries.len());
        let now = now_millis();
        for (step, existing) in self.flow.steps.iter().zip(entries) {
            let existing = existing.as_ref()?;
            let stem = self.stem(&step.name, pk);
            let ctx = Context { record: fields, steps: &captures, key: &stem };
            let base = call::render(step, Variant::Create, &ctx).ok()?;
            let intent = Intent {
                id: existing.id.clone(),
                fingerprint: call::fingerprint(step.key_strategy, pk, &base),
                now,
                ttl_ms: 0,
                lease_ms: 0,
                correlation_id: None,
            };
            if decide(Some(existing), &intent, policy(step)) != Decision::Replay {
                return None;
            }
            let stored = call::stored_captures(existing.response.as_ref());
            captures.insert(step.name.clone(), stored.clone());
            reports.push(StepReport { captures: stored, ..StepReport::new(&step.name, StepResult::AlreadySent) });
        }
        Some(reports)
    }
}

/// Up to [`BATCH`] items: waits for the first, then takes what the reader has ready. `None`
/// once the source has ended.
async fn next_batch(records: &tokio::sync::Mutex<mpsc::Receiver<Item>>) -> Option<Vec<Item>> {
    let mut records = records.lock().await;
    let first = records.recv().await?;
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match records.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The report of a source line that is not a record.
fn bad_line(bad: source::BadRecord) -> RecordReport {
    RecordReport { line: bad.line, key: None, steps: Vec::new(), error: Some(bad.message) }
}

#[cfg(test)]
mod tests {
    use super::super::step::Unit;
    use super::*;
    use crate::core::Outcome;
    use crate::runner::engine::{Attempts, Keys};
    use crate::runner::flow;
    use crate::store::Store;

    /// A record whose steps the ledger shows as sent (a later step's request built from an
    /// earlier step's capture) is done without a claim; a changed one is to run.
    #[tokio::test]
    async fn triage_settles_records_sent_before_in_one_read() {
        let text = "flow = \"f\"\n[source]\njsonl = \"x\"\nprimary_key = [\"id\"]\n\
                    [[steps]]\nname = \"a\"\nurl = \"http://h/a\"\ncapture = { ref = \"/id\" }\n\
                    [[steps]]\nname = \"b\"\nurl = \"http://h/b/{{steps.a.ref}}\"\nkey_strategy = \"primary_key_hash\"\n";
        let flow = flow::parse(text).expect("a valid flow");
        let store: Arc<dyn Store> = Arc::new(crate::store::memory::MemoryStore::default());
        let engine = Engine::new(flow, store.clone(), Mode::Send, Keys::Flow, Attempts::PerRun).expect("an engine");
        let fields = |id: &str, n: i64| {
            let Value::Object(map) = serde_json::json!({ "id": id, "n": n }) else { unreachable!() };
            map
        };
        // What a run that sent record "r1" left in the ledger.
        let mut captures = HashMap::new();
        for (step, answer) in engine.flow.steps.iter().zip([r#"{"captures":{"ref":"x-1"}}"#, r#"{"captures":{}}"#]) {
            let stem = engine.stem(&step.name, "r1");
            let ctx = Context { record: &fields("r1", 1), steps: &captures, key: &stem };
            let call = call::render(step, Variant::Create, &ctx).expect("renders");
            let unit = Unit {
                step,
                fields: &fields("r1", 1),
                captures: &captures,
                id: RecordId::new(engine.flow.scope(&step.name), "", "r1"),
                fingerprint: call::fingerprint(step.key_strategy, "r1", &call),
                stem: stem.clone(),
                key: stem.clone(),
                base: call,
            };
            let claim = store.claim(&engine.intent(&unit), policy(step)).await.expect("claims");
            let response =
                crate::core::StoredResponse { status: 201, headers: vec![], body: answer.into(), retained: true };
            let token = claim.token.expect("a lease");
            assert!(store.finish(&unit.id, token, Outcome::Completed(response), now_millis()).await.expect("finishes"));
            let stored = store.get(&unit.id).await.expect("reads").and_then(|r| r.response);
            captures.insert(step.name.clone(), call::stored_captures(stored.as_ref()));
        }
        let item = |id: &str, n: i64| Ok(SourceRecord { line: 1, fields: fields(id, n) });
        let triaged = engine.triage(vec![item("r1", 1), item("r1", 2), item("r2", 1)]).await;
        let Triage::Done(done) = &triaged[0] else { panic!("r1 was sent") };
        assert!(done.steps.iter().all(|s| s.result == StepResult::AlreadySent), "{done:?}");
        assert_eq!(done.steps[0].captures["ref"], "x-1");
        assert!(matches!(&triaged[1], Triage::Todo(_)), "the same key with other data: its claim decides");
        assert!(matches!(&triaged[2], Triage::Todo(_)), "never sent");
    }
}
