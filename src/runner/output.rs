//! What `idem run` tells its user: the result of each step of each record, the `--report`
//! JSON lines, the final summary, and the problem lines [`super::progress`] shows as
//! records finish.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde_json::{Map, Value, json};

use super::engine::Mode;

/// How one step of one record ended (the `result` of a `--report` line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepResult {
    /// Sent and answered with 2xx.
    Sent,
    /// Done in an earlier run (or by another runner): not sent again.
    AlreadySent,
    /// Sent again because the record changed (`resend_on_change`).
    Resent,
    /// The record changed but the step does not re-send changes.
    ChangedNotResent,
    /// A person must look at it (a 4xx, a record the store marks so, a template that
    /// cannot be filled for this record).
    NeedsReview,
    /// Still failing retryably after `max_attempts`; the next run tries again.
    Failed,
    /// Sent but never answered in an earlier run; its lookup found it at the destination
    /// (`verify`): settled, not sent again.
    Verified,
    /// Sent but never answered, and re-sending is not safe.
    Unknown,
    /// Another runner (or consumer) was still sending this step when this one gave up
    /// waiting for it.
    InFlight,
    /// Not attempted: an earlier step of the record did not complete.
    SkippedAfterFailure,
    /// `--dry-run`: would be sent.
    WouldSend,
}

impl StepResult {
    /// The stable name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            StepResult::Sent => "sent",
            StepResult::AlreadySent => "already_sent",
            StepResult::Resent => "resent",
            StepResult::ChangedNotResent => "changed_not_resent",
            StepResult::NeedsReview => "needs_review",
            StepResult::Failed => "failed",
            StepResult::Verified => "verified",
            StepResult::Unknown => "unknown",
            StepResult::InFlight => "in_flight",
            StepResult::SkippedAfterFailure => "skipped_after_failure",
            StepResult::WouldSend => "would_send",
        }
    }

    /// True when later steps of the record may run.
    pub fn lets_record_go_on(self) -> bool {
        matches!(
            self,
            StepResult::Sent
                | StepResult::AlreadySent
                | StepResult::Resent
                | StepResult::ChangedNotResent
                | StepResult::Verified
                | StepResult::WouldSend
        )
    }
}

/// One step of one record.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step's name.
    pub step: String,
    /// How it ended.
    pub result: StepResult,
    /// The last HTTP status received, if any.
    pub status: Option<u16>,
    /// What the step captured (this run or an earlier one).
    pub captures: Map<String, Value>,
    /// Why it did not complete; never a body.
    pub error: Option<String>,
    /// HTTP calls sent (a connection that could not be made sent nothing).
    pub calls: u64,
    /// Attempts made, sent or not.
    pub attempts: u64,
}

impl StepReport {
    /// A report with no calls made yet.
    pub fn new(step: &str, result: StepResult) -> Self {
        Self { step: step.to_owned(), result, status: None, captures: Map::new(), error: None, calls: 0, attempts: 0 }
    }

    /// A step that needs a person, with why.
    pub fn review(step: &str, result: StepResult, error: impl Into<String>) -> Self {
        Self { error: Some(error.into()), ..Self::new(step, result) }
    }
}

/// One source line: a record with its steps, or a line that is not one.
#[derive(Clone, Debug)]
pub struct RecordReport {
    /// Where it is in the source.
    pub line: u64,
    /// The primary key, when the line had one.
    pub key: Option<String>,
    /// The steps, in order.
    pub steps: Vec<StepReport>,
    /// Why the line is not a usable record (malformed, no primary key).
    pub error: Option<String>,
}

impl RecordReport {
    /// The `--report` line.
    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.step,
                    "result": s.result.as_str(),
                    "status": s.status,
                    "captures": s.captures,
                    "error": s.error,
                })
            })
            .collect();
        let mut line = json!({ "line": self.line, "key": self.key, "steps": steps });
        if let Some(error) = &self.error {
            line["error"] = error.clone().into();
        }
        line
    }

    /// True when nothing about this line needs a person.
    pub fn is_done(&self) -> bool {
        self.error.is_none() && self.steps.iter().all(|s| s.result.lets_record_go_on())
    }
}

/// The counts printed at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Usable records read.
    pub records: u64,
    /// HTTP calls sent, retries included (a connection that could not be made sent nothing).
    pub calls_sent: u64,
    /// Steps skipped because they were done already.
    pub already_sent: u64,
    /// Steps sent again because the record changed.
    pub resent: u64,
    /// Steps whose record changed but which do not re-send.
    pub changed_not_resent: u64,
    /// Steps whose unknown outcome a lookup settled (found at the destination).
    pub verified: u64,
    /// Attempts beyond the first of a step (retries).
    pub retried: u64,
    /// Records that need a person (needs review, failed or unknown).
    pub needs_review: u64,
    /// Source lines that are not usable records (malformed, no primary key).
    pub bad_lines: u64,
    /// `--dry-run`: calls that would be sent.
    pub would_send: u64,
    /// Stopped by a signal before the end of the source.
    pub interrupted: bool,
}

impl Summary {
    /// Counts one record's report.
    pub fn add(&mut self, report: &RecordReport) {
        if report.error.is_some() {
            self.bad_lines += 1;
            return;
        }
        self.records += 1;
        for step in &report.steps {
            self.calls_sent += step.calls;
            self.retried += step.attempts.saturating_sub(1);
            match step.result {
                StepResult::AlreadySent => self.already_sent += 1,
                StepResult::Resent => self.resent += 1,
                StepResult::ChangedNotResent => self.changed_not_resent += 1,
                StepResult::WouldSend => self.would_send += 1,
                StepResult::Verified => self.verified += 1,
                _ => {}
            }
        }
        if !report.is_done() {
            self.needs_review += 1;
        }
    }

    /// True when everything is done: exit status 0.
    pub fn all_done(&self) -> bool {
        self.needs_review == 0 && self.bad_lines == 0 && !self.interrupted
    }

    /// The text printed on stdout; a dry run also counts the calls it would send.
    pub fn render(&self, mode: Mode) -> String {
        let mut rows = vec![
            ("records", self.records),
            ("calls sent", self.calls_sent),
            ("skipped (already sent)", self.already_sent),
            ("re-sent on change", self.resent),
            ("changed, not re-sent", self.changed_not_resent),
            ("settled by lookup", self.verified),
            ("retried", self.retried),
            ("needs review", self.needs_review),
            ("bad source lines", self.bad_lines),
        ];
        if mode == Mode::DryRun {
            rows.insert(2, ("would send (dry run)", self.would_send));
        }
        let mut text: String = rows.iter().map(|(name, count)| format!("{name}: {count}\n")).collect();
        if self.interrupted {
            text.push_str("stopped before the end of the source: run again to resume\n");
        }
        text
    }
}

/// Where `--report` lines go.
pub struct ReportFile(BufWriter<File>);

impl ReportFile {
    /// Creates (or truncates) the report file.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self(BufWriter::new(File::create(path)?)))
    }

    /// Writes one record's line.
    pub fn write(&mut self, report: &RecordReport) -> io::Result<()> {
        writeln!(self.0, "{}", report.to_json())
    }

    /// Flushes what is buffered.
    pub fn finish(mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A line on stderr for a record that needs a person, above the progress bar.
pub fn problem_lines(report: &RecordReport) -> Vec<String> {
    let at = match &report.key {
        Some(key) => format!("line {} (key {key})", report.line),
        None => format!("line {}", report.line),
    };
    if let Some(error) = &report.error {
        return vec![format!("{at}: {error}")];
    }
    report
        .steps
        .iter()
        .filter(|s| !s.result.lets_record_go_on() && s.result != StepResult::SkippedAfterFailure)
        .map(|s| match &s.error {
            Some(error) => format!("{at}: step {}: {}: {error}", s.step, s.result.as_str()),
            None => format!("{at}: step {}: {}", s.step, s.result.as_str()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(result: StepResult, calls: u64) -> StepReport {
        StepReport { calls, attempts: calls, ..StepReport::new("s", result) }
    }

    #[test]
    fn a_record_counts_once_and_needs_review_when_any_step_does() {
        let mut summary = Summary::default();
        let done = RecordReport {
            line: 1,
            key: Some("a".into()),
            steps: vec![step(StepResult::Sent, 3), step(StepResult::AlreadySent, 0)],
            error: None,
        };
        let stuck = RecordReport {
            line: 2,
            key: Some("b".into()),
            steps: vec![step(StepResult::NeedsReview, 1), step(StepResult::SkippedAfterFailure, 0)],
            error: None,
        };
        let bad = RecordReport { line: 3, key: None, steps: vec![], error: Some("invalid JSON".into()) };
        for report in [&done, &stuck, &bad] {
            summary.add(report);
        }
        assert_eq!((summary.records, summary.calls_sent, summary.retried), (2, 4, 2));
        assert_eq!((summary.already_sent, summary.needs_review, summary.bad_lines), (1, 1, 1));
        assert!(!summary.all_done());
        assert!(summary.render(Mode::Send).contains("needs review: 1\n"));
        assert_eq!(problem_lines(&stuck), ["line 2 (key b): step s: needs_review"]);
        assert_eq!(problem_lines(&bad), ["line 3: invalid JSON"]);
    }

    #[test]
    fn report_lines_name_every_step() {
        let record =
            RecordReport { line: 7, key: Some("k".into()), steps: vec![step(StepResult::Resent, 1)], error: None };
        let line = record.to_json();
        assert_eq!(line["line"], 7);
        assert_eq!(line["steps"][0]["result"], "resent");
        assert!(line["steps"][0]["captures"].is_object() && line.get("error").is_none(), "{line}");
    }
}
