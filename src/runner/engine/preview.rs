//! `--dry-run`: each step gets the decision a claim would get, made on what the store holds
//! (read only), and the call it would send is shown through the progress; nothing is sent
//! and nothing is written.

use serde_json::Map;

use super::Engine;
use super::step::{Unit, policy, settled};
use crate::core::{Decision, ExecuteReason, decide};
use crate::runner::call;
use crate::runner::flow::Step;
use crate::runner::output::{StepReport, StepResult};

impl Engine {
    /// The same decision as a claim's, on what the store holds; when it would execute, the
    /// request it would send (the update, for a changed record whose ids are known).
    pub(super) async fn preview(&self, unit: &Unit<'_>) -> StepReport {
        let report = StepReport::new(&unit.step.name, StepResult::WouldSend);
        let existing = match self.store.get(&unit.id).await {
            Ok(existing) => existing,
            Err(e) => return StepReport::review(&unit.step.name, StepResult::Failed, e.to_string()),
        };
        let decision = decide(existing.as_ref(), &self.intent(unit), policy(unit.step));
        let Decision::Execute(reason) = decision else { return settled(report, decision, existing.as_ref()) };
        let known = match reason {
            ExecuteReason::Changed => call::stored_captures(existing.as_ref().and_then(|r| r.response.as_ref())),
            _ => Map::new(),
        };
        let call = self.request(unit, &known).unwrap_or_else(|_| unit.base.clone());
        let header = match &unit.step.idempotency_header {
            Some(name) => format!(" [{name}: {}]", unit.key),
            None => String::new(),
        };
        self.progress.preview(format_args!("would send {} {}{header} {}", call.method, call.url, call.body));
        StepReport { captures: known, ..report }
    }

    /// A step whose request needs the answer of an earlier step that would be sent: only
    /// its method and URL template can be shown.
    pub(super) fn preview_pending(&self, step: &Step, pk: &str) -> StepReport {
        self.progress.preview(format_args!(
            "would send {} {} for {pk} (with values from the answers of earlier steps)",
            step.method, step.url
        ));
        StepReport::new(&step.name, StepResult::WouldSend)
    }
}
