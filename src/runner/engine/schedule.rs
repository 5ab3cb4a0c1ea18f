//! Scheduling: keeps `concurrency` records in flight, fed by the triage running ahead of
//! them, stops starting records on a signal, and tallies each finished record (the summary,
//! its `--report` line, the progress).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};

use super::Engine;
use super::triage::Triage;
use crate::runner::output::{RecordReport, ReportFile, Summary};
use crate::runner::progress::Progress;
use crate::runner::source::{Item, SourceRecord};

impl Engine {
    /// Keeps `concurrency` records in flight; the source is read as records finish, so
    /// memory stays flat however long it is. Records are read in batches and checked
    /// against the ledger first (`triage.rs`): a record whose steps were all sent before is
    /// counted at once, without a task or a claim.
    pub(super) async fn drive(
        self: Arc<Self>,
        records: mpsc::Receiver<Item>,
        report: Option<ReportFile>,
        stop: impl Future<Output = ()>,
    ) -> io::Result<Summary> {
        let mut tally = Tally { summary: Summary::default(), report, progress: &self.progress };
        let mut running: JoinSet<RecordReport> = JoinSet::new();
        // Records of the last batch that need their steps run, waiting for a free slot.
        let mut waiting: VecDeque<SourceRecord> = VecDeque::new();
        let mut stop = std::pin::pin!(stop);
        let mut source_done = false;
        let mut triaged = self.triage_ahead(records);
        loop {
            self.start_waiting(&mut running, &mut waiting);
            if source_done && waiting.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                () = &mut stop => {
                    tally.summary.interrupted = true;
                    self.progress.warn("idem: stopping: finishing the records in flight; run again to resume");
                    break;
                }
                Some(done) = running.join_next(), if running.len() >= self.flow.concurrency || source_done => {
                    tally.add(done)?;
                }
                item = triaged.recv(), if waiting.is_empty() && !source_done => match item {
                    None => source_done = true,
                    Some(Triage::Done(done)) => tally.add(Ok(done))?,
                    Some(Triage::Todo(record)) => waiting.push_back(record),
                },
            }
        }
        while let Some(done) = running.join_next().await {
            tally.add(done)?;
        }
        tally.finish()
    }

    /// Starts waiting records while fewer than `concurrency` are in flight.
    fn start_waiting(self: &Arc<Self>, running: &mut JoinSet<RecordReport>, waiting: &mut VecDeque<SourceRecord>) {
        while running.len() < self.flow.concurrency {
            let Some(record) = waiting.pop_front() else { break };
            let engine = self.clone();
            running.spawn(async move { engine.process(record).await });
        }
    }
}

/// What a run has finished so far: the counts, the report file, and who is told.
struct Tally<'a> {
    summary: Summary,
    report: Option<ReportFile>,
    progress: &'a Progress,
}

impl Tally<'_> {
    /// Counts a finished record, writes its report line and shows its problems.
    fn add(&mut self, done: Result<RecordReport, JoinError>) -> io::Result<()> {
        let record = match done {
            Ok(record) => record,
            Err(e) => {
                // A panic in one record's task: count it, never stop the others.
                self.progress.warn(format_args!("idem: a record's task failed: {e}"));
                self.summary.needs_review += 1;
                return Ok(());
            }
        };
        self.summary.add(&record);
        self.progress.record(&record, &self.summary);
        match &mut self.report {
            Some(file) => file.write(&record),
            None => Ok(()),
        }
    }

    /// The counts, once the progress is cleared and the report flushed.
    fn finish(self) -> io::Result<Summary> {
        self.progress.finish();
        if let Some(report) = self.report {
            report.finish()?;
        }
        Ok(self.summary)
    }
}
