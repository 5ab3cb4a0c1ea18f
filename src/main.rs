//! The `idem` command: parses arguments, wires the library together and maps the
//! outcome to an exit code.
//!
//! Exit codes, decided by [`idem::host::Error::exit_code`] for every subcommand: 0 success;
//! 1 a runtime failure (or work left undone: a runner record that needs review, an `idem
//! log` record not found); 2 bad input: an unknown flag, a malformed config, flow or
//! consumer file, store URL or encryption key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idem::cli::LogArgs;
use idem::gateway::{
    self,
    config::{self, Overrides, RawConfig},
};
use idem::host::Error;

/// mimalloc rather than the system allocator: a request allocates and frees a few hundred
/// small blocks across threads (bench/cost.sh measures the allocator's share).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Serve HTTPS with this certificate chain (PEM, leaf first).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
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
    let outcome = match cli.command {
        Command::Gateway(args) => {
            gateway_config(args).and_then(|config| runtime.block_on(gateway::run(config, shutdown_signal())))
        }
        Command::Log(args) => runtime.block_on(idem::cli::run(args)),
        // On a worker thread, not the main one: the loops that spawn a task per record or
        // message then hand it to a worker without waking another thread each time.
        Command::Run(args) => idem::runner::flow::load(&args.flow)
            .map_err(|e| Error::BadInput(e.into()))
            .and_then(|flow| on_a_worker(&runtime, idem::runner::run(flow, args.options(), shutdown_signal()))),
        Command::Consume(args) => consumer_config(args)
            .and_then(|consumer| on_a_worker(&runtime, idem::consumer::run(consumer, shutdown_signal()))),
        Command::DemoUpstream { listen, tls_cert, tls_key } => {
            runtime.block_on(demo_upstream(listen, tls_cert, tls_key))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.is_reported() {
                eprintln!("idem: {error}");
            }
            ExitCode::from(error.exit_code())
        }
    }
}

/// Runs an entry point's future as a task of the runtime.
fn on_a_worker(
    runtime: &tokio::runtime::Runtime,
    command: impl Future<Output = Result<(), Error>> + Send + 'static,
) -> Result<(), Error> {
    runtime.block_on(runtime.spawn(command)).unwrap_or_else(|e| Err(Error::failed("the command's task", e)))
}

/// The gateway's config: the file, then the environment and flags over it.
fn gateway_config(args: GatewayArgs) -> Result<gateway::Config, Error> {
    let raw = match &args.config {
        Some(path) => config::read_file(path).map_err(|e| Error::BadInput(e.into()))?,
        None => RawConfig::default(),
    };
    let demo = if args.demo { gateway::Demo::StartUpstream } else { gateway::Demo::Off };
    let overrides = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        store: args.store,
        admin_listen: args.admin_listen,
        demo,
    };
    raw.validate(&overrides, &|name| std::env::var(name).ok()).map_err(|e| Error::BadInput(e.into()))
}

/// The consumer file, with `--store` over its `store`.
fn consumer_config(args: idem::consumer::ConsumeArgs) -> Result<idem::consumer::config::Consumer, Error> {
    let mut consumer = idem::consumer::config::load(&args.consumer, &|name| std::env::var(name).ok())
        .map_err(|e| Error::BadInput(e.into()))?;
    if let Some(store) = args.store {
        consumer.store = store;
    }
    Ok(consumer)
}

async fn demo_upstream(listen: String, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<(), Error> {
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => {
            Some(std::sync::Arc::new(idem::tls::ServerTls::load(&cert, &key).map_err(|e| Error::BadInput(e.into()))?))
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| Error::failed(format!("cannot listen on {listen}"), e))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "idem demo upstream listening on {scheme}://{}",
        listener.local_addr().map(|a| a.to_string()).unwrap_or(listen)
    );
    tokio::select! {
        () = idem::demo::serve_with(listener, tls) => {}
        () = shutdown_signal() => {}
    }
    Ok(())
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
