//! The soak driver of `bench/soak.sh`: a steady request rate against a gateway for a long
//! time, with what the gateway process uses sampled as it goes.
//!
//! Every second it starts `--rate` requests (a share of them replays of a recent key, the
//! rest new keys), at most `--in-flight` at once; every `--window` seconds it prints one
//! line: requests, errors, p50/p99 latency, the gateway's RSS and open file descriptors
//! (from /proc) and the store's size on disk. At the end it prints the first and the last
//! window side by side. A benchmark aid, not a test: it never fails on numbers, only when it
//! cannot run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser, Debug)]
struct Args {
    /// The gateway's protected URL, e.g. http://127.0.0.1:8080/v1/orders.
    #[arg(long)]
    url: String,
    /// The gateway's process id (for RSS and open files).
    #[arg(long)]
    pid: u32,
    /// The SQLite file of the gateway's store (its -wal and -shm files are counted too).
    #[arg(long)]
    store: String,
    /// Requests per second.
    #[arg(long)]
    rate: u64,
    /// How long, in seconds.
    #[arg(long)]
    seconds: u64,
    /// Seconds per reported window.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Share of requests that replay a recent key (0.0 to 1.0).
    #[arg(long, default_value_t = 0.2)]
    replays: f64,
}

/// One window's figures.
#[derive(Clone, Debug, Default)]
struct Window {
    at_seconds: u64,
    requests: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    rss_kib: u64,
    fds: u64,
    store_bytes: u64,
}

impl Window {
    fn line(&self) -> String {
        format!(
            "{:>6}s {:>8} req {:>5} err  p50 {:>7.2} ms  p99 {:>7.2} ms  rss {:>7} KiB  fds {:>4}  store {:>9} KiB",
            self.at_seconds,
            self.requests,
            self.errors,
            self.p50_ms,
            self.p99_ms,
            self.rss_kib,
            self.fds,
            self.store_bytes / 1024
        )
    }
}

const BODY: &str = r#"{"amount":4200,"currency":"EUR","customer":"cus_42","note":"soak"}"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.in_flight).build()?;
    let latencies: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(args.in_flight));
    let started = Instant::now();
    let mut windows: Vec<Window> = Vec::new();
    let mut next_key: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = args.rate as f64 / 100.0;
    let mut owed = 0.0;
    let mut window_end = Duration::from_secs(args.window);
    println!(
        "soak: {} req/s for {} s against {} ({}% replays)",
        args.rate,
        args.seconds,
        args.url,
        args.replays * 100.0
    );
    while started.elapsed() < Duration::from_secs(args.seconds) {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            // A replay names a key sent 1 000 to 2 000 keys ago: answered by then.
            let replay = next_key > 2_000 && rand::random::<f64>() < args.replays;
            let key = if replay { next_key - 1_000 - rand::random::<u64>() % 1_000 } else { next_key };
            if !replay {
                next_key += 1;
            }
            let permit = permits.clone().acquire_owned().await?;
            let (client, url, latencies, errors) =
                (client.clone(), args.url.clone(), latencies.clone(), errors.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer = client
                    .post(&url)
                    .header("Idempotency-Key", format!("soak-{key}"))
                    .header("Content-Type", "application/json")
                    .body(BODY)
                    .send()
                    .await;
                let ok = match answer {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        response.bytes().await.is_ok() && (200..300).contains(&status)
                    }
                    Err(_) => false,
                };
                let micros = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                latencies.lock().await.push(micros);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
        if started.elapsed() >= window_end {
            let mut sample = std::mem::take(&mut *latencies.lock().await);
            sample.sort_unstable();
            let quantile = |q: f64| {
                sample.get(((sample.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |m| f64::from(*m) / 1000.0)
            };
            let window = Window {
                at_seconds: window_end.as_secs(),
                requests: sample.len() as u64,
                errors: errors.swap(0, Ordering::Relaxed),
                p50_ms: quantile(0.50),
                p99_ms: quantile(0.99),
                rss_kib: rss_kib(args.pid),
                fds: open_files(args.pid),
                store_bytes: ["", "-wal", "-shm"]
                    .iter()
                    .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", args.store)).ok())
                    .map(|m| m.len())
                    .sum(),
            };
            println!("{}", window.line());
            windows.push(window);
            window_end += Duration::from_secs(args.window);
        }
    }
    let (Some(first), Some(last)) = (windows.first(), windows.last()) else {
        return Err("the run was shorter than one window".into());
    };
    println!("\n{:<14} {:>12} {:>12}", "", "first window", "last window");
    println!("{:<14} {:>12} {:>12}", "requests", first.requests, last.requests);
    println!("{:<14} {:>12} {:>12}", "errors", first.errors, last.errors);
    println!("{:<14} {:>12.2} {:>12.2}", "p50 ms", first.p50_ms, last.p50_ms);
    println!("{:<14} {:>12.2} {:>12.2}", "p99 ms", first.p99_ms, last.p99_ms);
    println!("{:<14} {:>12} {:>12}", "RSS KiB", first.rss_kib, last.rss_kib);
    println!("{:<14} {:>12} {:>12}", "open files", first.fds, last.fds);
    println!("{:<14} {:>12} {:>12}", "store KiB", first.store_bytes / 1024, last.store_bytes / 1024);
    println!("keys sent: {next_key}");
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}
