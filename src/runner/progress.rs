//! The one interface through which the engine tells its user what is happening while it
//! runs: for `idem run`, a spinner with counts and a line per problem on stderr and the
//! `--dry-run` previews on stdout; for the consumer, which runs the engine once per message,
//! nothing (it logs and counts in metrics instead).
//!
//! The final summary and the `--report` lines are not progress: they are [`super::output`].

use std::fmt::Display;
use std::io::{self, IsTerminal};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::{RecordReport, Summary, problem_lines};

/// Where the engine reports to. A closed enum rather than a trait: there are exactly these
/// two audiences, and a record's report costs no virtual call or allocation to deliver.
#[derive(Debug)]
pub enum Progress {
    /// `idem run`: the bar on stderr, drawn only when stderr is a terminal (a log file or a
    /// pipe gets the problem lines and the final summary only). Lines are printed with the
    /// bar suspended, so they never tear it.
    Terminal(ProgressBar),
    /// Nothing is drawn or printed; warnings go to the log.
    Quiet,
}

impl Progress {
    /// A spinner with counts on stderr, hidden unless stderr is a terminal.
    pub fn terminal() -> Self {
        if !io::stderr().is_terminal() {
            return Progress::Terminal(ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()));
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} records  {msg}  [{elapsed}]") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress::Terminal(bar)
    }

    /// A record is finished and counted in `summary`: the counts move on, and each of its
    /// problems gets a line on stderr.
    pub fn record(&self, record: &RecordReport, summary: &Summary) {
        let Progress::Terminal(bar) = self else { return };
        bar.inc(1);
        bar.set_message(format!(
            "{} calls, {} already sent, {} need review",
            summary.calls_sent, summary.already_sent, summary.needs_review
        ));
        for line in problem_lines(record) {
            bar.suspend(|| eprintln!("{line}"));
        }
    }

    /// Something the user must know about the run itself (a signal, a record's task that
    /// failed): a line on stderr.
    pub fn warn(&self, line: impl Display) {
        match self {
            Progress::Terminal(bar) => bar.suspend(|| eprintln!("{line}")),
            Progress::Quiet => tracing::warn!("{line}"),
        }
    }

    /// `--dry-run`: the call a step would send, a line on stdout.
    pub fn preview(&self, line: impl Display) {
        if let Progress::Terminal(bar) = self {
            bar.suspend(|| println!("{line}"));
        }
    }

    /// The run is over: the bar is cleared, so the summary that follows stands alone.
    pub fn finish(&self) {
        if let Progress::Terminal(bar) = self {
            bar.finish_and_clear();
        }
    }
}
