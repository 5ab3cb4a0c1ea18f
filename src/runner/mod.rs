//! `idem run`: exports, syncs and multi-step workflows from a source into HTTP APIs,
//! each step of each record guarded by a record in the store (SPEC §5).

use std::path::PathBuf;

use crate::host::Error;

pub mod call;
pub mod engine;
pub mod flow;
pub mod output;
pub mod progress;
pub mod source;

/// `idem run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The flow file (TOML).
    pub flow: PathBuf,
    /// Store URL, instead of the flow's `store`.
    #[arg(long)]
    pub store: Option<String>,
    /// Write one JSON line per record to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print each call that would be sent; send nothing, write nothing to the store.
    #[arg(long)]
    pub dry_run: bool,
}

impl RunArgs {
    /// The engine's options these arguments ask for (`--dry-run` is the command line's
    /// flag; the engine takes a mode).
    pub fn options(&self) -> engine::Options {
        let mode = if self.dry_run { engine::Mode::DryRun } else { engine::Mode::Send };
        engine::Options { store: self.store.clone(), report: self.report.clone(), mode }
    }
}

/// Runs `flow` to the end of its source and prints the summary. When anything needs
/// review, failed, or `shutdown` ended the run early, the summary says so and the result
/// is [`Error::Reported`] (exit 1); a source, store URL or report file that cannot be used
/// is bad input (exit 2). On `shutdown` the records in flight finish, no new one starts.
pub async fn run(flow: flow::Flow, options: engine::Options, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let summary = engine::execute(flow, &options, shutdown).await?;
    print!("{}", summary.render(options.mode));
    if summary.all_done() { Ok(()) } else { Err(Error::Reported("not every record is done; see the summary".into())) }
}
