//! `idem log`: inspect and settle records in any store, with or without a running
//! gateway. Tables for people, `--json` for scripts.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::admin::{parse_resolution, parse_status, record_json, rfc3339, stats_json};
use crate::core::{Record, RecordId};
use crate::host::Error;
use crate::store::{self, Cursor, ListQuery, Store, now_millis};

/// `idem log` arguments.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Store URL: sqlite://PATH or memory://.
    #[arg(long, env = "IDEM_STORE", default_value = "sqlite://./idem.db", global = true)]
    pub store: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: LogCommand,
}

/// Which record a command names.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The scope: a route name (or ROUTE#CLIENT-ID for OData clients).
    #[arg(long)]
    pub scope: String,
    /// The key.
    #[arg(long)]
    pub key: String,
    /// The tenant (empty for requests without one).
    #[arg(long, default_value = "")]
    pub tenant: String,
}

impl RecordArgs {
    fn id(&self) -> RecordId {
        RecordId::new(&self.scope, &self.tenant, &self.key)
    }
}

/// `idem log` subcommands.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// List records, newest first.
    List {
        /// Only this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this status (in_progress, completed, failed_retryable, outcome_unknown, needs_review).
        #[arg(long)]
        status: Option<String>,
        /// Only keys starting with this.
        #[arg(long)]
        key: Option<String>,
        /// At most this many (all when omitted).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one record.
    Show(RecordArgs),
    /// Forget a record: the next request with its key executes (force re-send).
    Rm(RecordArgs),
    /// Settle an outcome_unknown record.
    Resolve {
        /// The record.
        #[command(flatten)]
        record: RecordArgs,
        /// release (the next request executes) or complete (replay the answer given here).
        #[arg(long, value_parser = ["release", "complete"])]
        action: String,
        /// With complete: the status to replay.
        #[arg(long)]
        status: Option<u16>,
        /// With complete: a header to replay, as "Name: value" (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// With complete: the body to replay.
        #[arg(long)]
        body: Option<String>,
    },
    /// Settle unknown outcomes by asking the destination: run the `verify` lookup of the
    /// scope (from the gateway, flow or consumer file) on one record, or on every
    /// outcome_unknown record of the scope.
    Verify {
        /// The gateway, flow or consumer file whose `verify` table serves the scope.
        #[arg(long)]
        config: std::path::PathBuf,
        /// The scope: a route name, FLOW:STEP or consumer:SUBSCRIBER.
        #[arg(long)]
        scope: String,
        /// Only this key (every unknown record of the scope when omitted).
        #[arg(long)]
        key: Option<String>,
        /// The tenant (with --key: empty for requests without one; without: every tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove expired records now.
    Purge,
    /// Count records by scope and status.
    Stats,
}

/// Runs `idem log`. A record that is not there, or cannot be settled, is said on stderr
/// and is an [`Error::Reported`] (exit code 1).
pub async fn run(args: LogArgs) -> Result<(), Error> {
    if let LogCommand::Verify { config, .. } = &args.command {
        // A file that does not read or names a bad lookup is bad input (exit status 2).
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))
            .map_err(Error::BadInput)?;
        crate::verify::Lookups::from_file(&text, &config.display().to_string())
            .map_err(|e| Error::BadInput(anyhow::Error::new(e)))?;
    }
    let result = execute(args).await?;
    result.map_err(|message| {
        eprintln!("{message}");
        Error::Reported(message)
    })
}

/// Does the work: `Ok(Err(message))` when the record is not there or cannot be settled.
async fn execute(args: LogArgs) -> anyhow::Result<Result<(), String>> {
    let store = store::open(&args.store).await?;
    let out = &mut std::io::stdout().lock();
    match args.command {
        LogCommand::List { scope, tenant, status, key, limit } => {
            let status = status.as_deref().map(parse_status).transpose().map_err(anyhow::Error::msg)?;
            let query =
                ListQuery { scope, tenant, status, key_prefix: key, limit: limit.unwrap_or(usize::MAX), cursor: None };
            let records = list_all(store.as_ref(), query).await?;
            if args.json {
                let values: Vec<Value> = records.iter().map(record_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&json!({ "records": values }))?)?;
            } else {
                print_table(out, &records)?;
            }
        }
        LogCommand::Show(record) => match store.get(&record.id()).await? {
            Some(found) => print_record(out, &found, args.json)?,
            None => return Ok(Err(format!("no record {}", record.id()))),
        },
        LogCommand::Rm(record) => {
            if !store.delete(&record.id()).await? {
                return Ok(Err(format!("no record {}", record.id())));
            }
            writeln!(out, "deleted {}: the next request with this key executes", record.id())?;
        }
        LogCommand::Resolve { record, action, status, headers, body } => {
            let mut request = json!({ "action": action, "status": status, "body": body });
            let mut header_map = serde_json::Map::new();
            for header in headers {
                let (name, value) =
                    header.split_once(':').with_context(|| format!("--header {header:?}: write \"Name: value\""))?;
                header_map.insert(name.trim().to_owned(), value.trim().into());
            }
            request["headers"] = Value::Object(header_map);
            let resolution = parse_resolution(&request).map_err(anyhow::Error::msg)?;
            match store.resolve(&record.id(), resolution, now_millis()).await {
                Ok(settled) => print_record(out, &settled, args.json)?,
                Err(e @ (store::Error::NotFound | store::Error::NotResolvable(_))) => {
                    return Ok(Err(format!("{}: {e}", record.id())));
                }
                Err(e) => return Err(e.into()),
            }
        }
        LogCommand::Verify { config, scope, key, tenant } => {
            let text = std::fs::read_to_string(&config)?;
            let lookups = crate::verify::Lookups::from_file(&text, &config.display().to_string())?;
            return verify(out, &store, &lookups, scope, key, tenant, args.json).await;
        }
        LogCommand::Purge => {
            let removed = crate::host::purge_all(store.as_ref(), &Default::default()).await;
            if args.json {
                writeln!(out, "{}", json!({ "purged": removed }))?;
            } else {
                writeln!(out, "purged {removed} expired records")?;
            }
        }
        LogCommand::Stats => {
            let rows = store.stats().await?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&stats_json(&rows))?)?;
            } else {
                let table: Vec<Vec<String>> =
                    rows.iter().map(|r| vec![r.scope.clone(), r.status.to_string(), r.count.to_string()]).collect();
                write_table(out, &["SCOPE", "STATUS", "COUNT"], &table)?;
            }
        }
    }
    Ok(Ok(()))
}

/// `idem log verify`: one line (or JSON object) per record verified; a lookup that failed,
/// or a record that cannot be verified, makes the command fail.
async fn verify(
    out: &mut impl Write,
    store: &Arc<dyn Store>,
    lookups: &crate::verify::Lookups,
    scope: String,
    key: Option<String>,
    tenant: Option<String>,
    as_json: bool,
) -> anyhow::Result<Result<(), String>> {
    if lookups.get(&scope).is_none() {
        return Ok(Err(format!("the file gives scope {scope:?} no verify lookup")));
    }
    let ids = match key {
        Some(key) => vec![RecordId::new(&scope, tenant.unwrap_or_default(), key)],
        None => {
            let query = |status| ListQuery {
                scope: Some(scope.clone()),
                tenant: tenant.clone(),
                status: Some(status),
                limit: usize::MAX,
                ..ListQuery::default()
            };
            let mut records = list_all(store.as_ref(), query(crate::core::Status::OutcomeUnknown)).await?;
            let dead = list_all(store.as_ref(), query(crate::core::Status::InProgress)).await?;
            records.extend(dead.into_iter().filter(|r| !r.lease_alive(now_millis())));
            records.into_iter().map(|r| r.id).collect()
        }
    };
    let (mut rows, mut results, mut failed) = (Vec::new(), Vec::new(), 0);
    for id in ids {
        let (result, detail) = match crate::admin::verify_now(store, lookups, &id).await {
            Ok(value) => (value["result"].as_str().unwrap_or_default().to_owned(), value["detail"].clone()),
            Err(e) => ("refused".to_owned(), Value::String(e.detail().to_owned())),
        };
        failed += usize::from(result == "failed" || result == "refused");
        let text = detail.as_str().unwrap_or("-").to_owned();
        rows.push(vec![id.tenant.clone(), id.key.clone(), result.clone(), text]);
        results
            .push(json!({ "scope": id.scope, "tenant": id.tenant, "key": id.key, "result": result, "detail": detail }));
    }
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&json!({ "verified": results }))?)?;
    } else {
        write_table(out, &["TENANT", "KEY", "RESULT", "DETAIL"], &rows)?;
    }
    Ok(if failed == 0 { Ok(()) } else { Err(format!("{failed} record(s) not settled; see above")) })
}

async fn list_all(store: &dyn Store, mut query: ListQuery) -> anyhow::Result<Vec<Record>> {
    let wanted = query.limit;
    let mut records = Vec::new();
    loop {
        query.limit = (wanted - records.len()).min(store::MAX_PAGE);
        let page = store.list(&query).await?;
        records.extend(page.records);
        match page.next_cursor.and_then(|c| Cursor::decode(&c)) {
            Some(cursor) if records.len() < wanted => query.cursor = Some(cursor),
            _ => return Ok(records),
        }
    }
}

fn print_record(out: &mut impl Write, record: &Record, as_json: bool) -> anyhow::Result<()> {
    let value = record_json(record);
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    let Value::Object(fields) = value else { bail!("a record is an object") };
    for (name, field) in fields {
        let text = match field {
            Value::Null => "-".to_owned(),
            Value::String(s) => s,
            other => other.to_string(),
        };
        writeln!(out, "{name:>15}  {text}")?;
    }
    Ok(())
}

fn print_table(out: &mut impl Write, records: &[Record]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.scope.clone(),
                if r.id.tenant.is_empty() { "-".into() } else { r.id.tenant.clone() },
                r.id.key.clone(),
                r.status.to_string(),
                r.response.as_ref().map_or("-".into(), |resp| resp.status.to_string()),
                r.replay_count.to_string(),
                r.attempt_count.to_string(),
                rfc3339(r.created_at),
                rfc3339(r.expires_at),
            ]
        })
        .collect();
    let header = ["SCOPE", "TENANT", "KEY", "STATUS", "ANSWER", "REPLAYS", "ATTEMPTS", "CREATED", "EXPIRES"];
    write_table(out, &header, &rows)?;
    if records.is_empty() {
        writeln!(out, "(no records)")?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
