//! `idem run`: exports, syncs and multi-step workflows from a source into HTTP APIs,
//! each step of each record guarded by a record in the store (SPEC §5).

use std::path::PathBuf;

pub mod call;
pub mod engine;
pub mod flow;
pub mod output;
pub mod progress;
pub mod source;
pub mod template;

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

/// Runs a flow file and returns the exit status: 0 everything is done, 1 something needs
/// review (or failed, or a source line is unusable, or `stop` ended the run early), 2 bad
/// input (the flow file, the source or the store URL). `stop` is the shutdown signal: the
/// records in flight finish, no new one starts.
pub async fn run(args: RunArgs, stop: impl Future<Output = ()>) -> u8 {
    let flow = match flow::load(&args.flow) {
        Ok(flow) => flow,
        Err(e) => {
            eprintln!("idem: {e}");
            return 2;
        }
    };
    // `--dry-run` is the command line's flag; the engine takes a mode.
    let mode = if args.dry_run { engine::Mode::DryRun } else { engine::Mode::Send };
    let options = engine::Options { store: args.store, report: args.report, mode };
    match engine::execute(flow, &options, stop).await {
        Ok(summary) => {
            print!("{}", summary.render(options.mode));
            if summary.all_done() { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("idem: {e}");
            if e.is_bad_input() { 2 } else { 1 }
        }
    }
}
