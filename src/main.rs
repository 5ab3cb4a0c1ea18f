//! The `idem` command: parses arguments, wires the library together and maps the
//! outcome to an exit code.
//!
//! Exit codes: 0 success; 1 a runtime failure (or, for `idem log`, a record not found);
//! 2 bad input: an unknown flag, a malformed config file or store URL.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idem::cli::LogArgs;
use idem::gateway::config::{self, Overrides, RawConfig};

#[derive(Debug, Parser)]
#[command(name = "idem", version, about = "Makes retries safe: every intended action executes once")]
struct Cli {
    /// Log filter (e.g. info, debug, idem=debug).
    #[arg(long, env = "IDEM_LOG", default_value = "info", global = true)]
    log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the idempotency gateway in front of an HTTP API.
    Gateway(GatewayArgs),
    /// Inspect and settle records in a store.
    Log(LogArgs),
    /// Run a flow: send each source record through its steps, each step at most once.
    Run(idem::runner::RunArgs),
    /// Consume a NATS JetStream or RabbitMQ source, delivering each message once.
    Consume(idem::consumer::ConsumeArgs),
    /// Run the demo upstream API (counts the calls it executes).
    DemoUpstream {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
    },
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// Config file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client listener, HOST:PORT (default 127.0.0.1:8080).
    #[arg(long, env = "IDEM_LISTEN")]
    listen: Option<String>,
    /// The protected API (default http://127.0.0.1:9000).
    #[arg(long, env = "IDEM_UPSTREAM")]
    upstream: Option<String>,
    /// Store URL (default sqlite://./idem.db).
    #[arg(long, env = "IDEM_STORE")]
    store: Option<String>,
    /// Admin listener, HOST:PORT (default 127.0.0.1:8081).
    #[arg(long, env = "IDEM_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Also start the demo upstream on the upstream address.
    #[arg(long)]
    demo: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("idem: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Gateway(args) => runtime.block_on(gateway(args)),
        Command::Log(args) => match runtime.block_on(idem::cli::run(args)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => failure(&e),
        },
        // On a worker thread, not the main one: the loops that spawn a task per record or
        // message then hand it to a worker without waking another thread each time.
        Command::Run(args) => on_a_worker(&runtime, idem::runner::run(args, shutdown_signal())),
        Command::Consume(args) => on_a_worker(&runtime, idem::consumer::run(args, shutdown_signal())),
        Command::DemoUpstream { listen } => runtime.block_on(async {
            match tokio::net::TcpListener::bind(&listen).await {
                Ok(listener) => {
                    println!(
                        "idem demo upstream listening on http://{}",
                        listener.local_addr().map(|a| a.to_string()).unwrap_or(listen)
                    );
                    tokio::select! {
                        () = idem::demo::serve(listener) => {}
                        () = shutdown_signal() => {}
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("idem: cannot listen on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

/// Runs a command's future as a task of the runtime and maps its exit status.
fn on_a_worker(runtime: &tokio::runtime::Runtime, command: impl Future<Output = u8> + Send + 'static) -> ExitCode {
    match runtime.block_on(runtime.spawn(command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("idem: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn gateway(args: GatewayArgs) -> ExitCode {
    let raw = match &args.config {
        Some(path) => match config::read_file(path) {
            Ok(raw) => raw,
            Err(e) => {
                eprintln!("idem: {e}");
                return ExitCode::from(2);
            }
        },
        None => RawConfig::default(),
    };
    let overrides =
        Overrides { listen: args.listen, upstream: args.upstream, store: args.store, admin_listen: args.admin_listen };
    let config = match raw.validate(&overrides, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("idem: {e}");
            return ExitCode::from(2);
        }
    };
    let demo = args.demo;
    let upstream = config.upstream.clone();
    let ready = move |listen: std::net::SocketAddr, admin: std::net::SocketAddr| {
        println!("idem gateway listening on http://{listen} (admin http://{admin}), forwarding to {upstream}");
        if demo {
            println!("demo upstream: {upstream} — try it:");
            println!(
                "  curl -si -X POST http://{listen}/orders -H 'Idempotency-Key: order-1' -H 'Content-Type: application/json' -d '{{\"amount\": 42}}'"
            );
            println!(
                "  (run it twice: the second answer is a replay; the demo counted one call: curl -s {upstream}_demo/stats)"
            );
        }
    };
    match idem::gateway::run(config, demo, shutdown_signal(), ready).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&e),
    }
}

/// Bad store URLs and encryption keys are bad input (2); everything else is a runtime
/// failure (1).
fn failure(e: &anyhow::Error) -> ExitCode {
    eprintln!("idem: {e:#}");
    let bad_input = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<idem::store::Error>(),
            Some(idem::store::Error::BadUrl { .. } | idem::store::Error::BadKey(_))
        )
    });
    ExitCode::from(if bad_input { 2 } else { 1 })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
