//! The baseline of `bench/runner.sh`: what a bare HTTP client loop does with the same
//! records, the same HTTP client (reqwest, one keep-alive pool) and the same concurrency as
//! `idem run`, with no store, no templates and no bookkeeping.
//!
//! ```sh
//! cargo run --release --example bare_client -- send --file records.jsonl \
//!     --url http://127.0.0.1:9000/v1/orders --concurrency 64 --key-field order_id
//! cargo run --release --example bare_client -- hash --file records.jsonl --key-field order_id
//! ```
//!
//! `send` reads the JSON Lines file into memory first (not timed), then keeps
//! `--concurrency` POSTs in flight, one per line, each line sent as it is as the JSON body
//! with an `Idempotency-Key` header of the same shape `idem run` sends
//! (`{prefix}:{primary key}`), reads every answer to its end, and prints one line:
//! `BARE requests=… ok=… errors=… seconds=… rps=…`. It exits 1 when any call failed or
//! answered anything but 2xx.
//!
//! `hash` is the floor of a re-run: it reads the file line by line, parses each line as
//! JSON, extracts the primary key and takes its SHA-256 (what `idem run` does per record
//! before it asks the store), and prints `HASH records=… seconds=… rps=…`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// POST every line of the file to the URL, `concurrency` calls in flight.
    Send {
        /// The JSON Lines file; each line is one body.
        #[arg(long)]
        file: PathBuf,
        /// Where to POST.
        #[arg(long)]
        url: String,
        /// Calls in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// The field whose value goes into the Idempotency-Key header.
        #[arg(long, default_value = "order_id")]
        key_field: String,
        /// The header's prefix (`idem run` sends `{flow}:{step}:{pk}`).
        #[arg(long, default_value = "bench:post")]
        key_prefix: String,
    },
    /// Read, parse and hash the primary key of every line: the floor of a re-run.
    Hash {
        /// The JSON Lines file.
        #[arg(long)]
        file: PathBuf,
        /// The primary key field.
        #[arg(long, default_value = "order_id")]
        key_field: String,
    },
}

fn key_of(line: &str, field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    match value.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn hash(file: PathBuf, field: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let reader = BufReader::with_capacity(1 << 16, std::fs::File::open(&file)?);
    let mut records = 0u64;
    let mut xor = [0u8; 32];
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let key = key_of(&line, field).ok_or_else(|| anyhow::anyhow!("line {}: no {field}", records + 1))?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Keeps the hashing from being optimised away.
        for (x, d) in xor.iter_mut().zip(digest) {
            *x ^= d;
        }
        records += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "HASH records={records} seconds={seconds:.3} rps={:.0} check={}",
        records as f64 / seconds,
        hex::encode(&xor[..4])
    );
    Ok(())
}

async fn send(file: PathBuf, url: String, concurrency: usize, field: String, prefix: String) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&file)?;
    let mut bodies: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key = key_of(line, &field).ok_or_else(|| anyhow::anyhow!("line {}: no {field}", n + 1))?;
        bodies.push((format!("{prefix}:{key}"), line.to_owned()));
    }
    drop(text);
    let bodies = Arc::new(bodies);
    // The same client settings as the runner's engine.
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(30))
        .user_agent("idem-bench-bare/0")
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (bodies, next, ok, errors, first_error) =
            (bodies.clone(), next.clone(), ok.clone(), errors.clone(), first_error.clone());
        let (client, url) = (client.clone(), url.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, body)) = bodies.get(i) else { return };
                let result = client
                    .post(&url)
                    .timeout(Duration::from_secs(30))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("Idempotency-Key", key.as_str())
                    .body(body.clone())
                    .send()
                    .await;
                let outcome = match result {
                    Ok(response) => {
                        let status = response.status();
                        match response.bytes().await {
                            Ok(_) if status.is_success() => Ok(()),
                            Ok(_) => Err(format!("status {status}")),
                            Err(e) => Err(format!("body: {e}")),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let (ok, errors) = (ok.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    println!(
        "BARE requests={} ok={ok} errors={errors} seconds={seconds:.3} rps={:.0}",
        bodies.len(),
        (ok + errors) as f64 / seconds
    );
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        eprintln!("bare_client: first error: {e}");
    }
    Ok(errors == 0 && ok == bodies.len() as u64)
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Hash { file, key_field } => hash(file, &key_field).map(|()| std::process::ExitCode::SUCCESS),
        Command::Send { file, url, concurrency, key_field, key_prefix } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let all_ok = runtime.block_on(send(file, url, concurrency, key_field, key_prefix))?;
            Ok(if all_ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
        }
    }
}
