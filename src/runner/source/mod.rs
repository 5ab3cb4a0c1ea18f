//! Record sources for `idem run` (SPEC §5): JSON Lines, CSV with a header row, standard input
//! and a PostgreSQL query, each read as a stream of JSON objects with their line numbers.
//!
//! [`open`] starts a reader and hands back the receiving end of a bounded channel. The reader
//! runs ahead by at most [`CHANNEL_CAPACITY`] items and then waits for the consumer, so memory
//! stays flat however long the source is; dropping the receiver stops the reader.
//!
//! What can go wrong is reported at two levels:
//!
//! - [`Error`], returned by [`open`]: the source cannot be read at all (a file that does not
//!   exist, a CSV file without a header row, PostgreSQL unreachable, a query the server rejects
//!   or that returns a column type idem cannot turn into JSON). Nothing has been read yet.
//! - [`BadRecord`], an item in the stream: one line is malformed; the lines after it are read
//!   as usual. A read failure in the middle of the source (a disk error, the PostgreSQL
//!   connection lost, a query failing at row 5000) is delivered as a last `BadRecord` whose
//!   message says that the rest of the source was not read; the stream then ends. A consumer
//!   that counts bad records therefore counts it too, and exits non-zero either way.
//!
//! Line numbers are what an editor shows: the 1-based line of a JSON Lines file, the line on
//! which a CSV record starts (the header is line 1, so the first record is normally line 2; a
//! quoted field spanning several lines makes the next record start further down), and the
//! 1-based row number of a PostgreSQL result. (A CSV file whose lines end in a bare CR, as
//! on classic Mac OS, is parsed correctly but its line numbers are not meaningful.)
//!
//! A `BadRecord` never quotes the record (it may hold personal data): it says what is wrong
//! and where. Messages from the PostgreSQL server are passed on as the server wrote them.
//!
//! Files and standard input are read on a dedicated thread: parsing is CPU work that would
//! otherwise hold up the runtime's workers, and a thread blocked on standard input must not
//! keep the runtime from shutting down (as a `spawn_blocking` task would).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use crate::store::redact;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::{FromSql, Kind, Type};

/// Where a file source reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Standard input (`"-"` in a flow file).
    Stdin,
    /// A file, read from the start to its end.
    File(PathBuf),
}

/// A source of records.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// One JSON object per line; blank lines are skipped. A UTF-8 byte order mark on the first
    /// line is ignored. A line may be up to [`MAX_LINE_BYTES`] long.
    Jsonl(Input),
    /// Comma-separated values whose first row names the fields. CSV has no types: every value
    /// is a string, and an empty cell is an empty string. Columns with an empty name in the
    /// header are ignored; two columns with the same name are an [`Error`].
    Csv(Input),
    /// The rows of a query. Columns become fields under their names (use `AS` to rename); the
    /// query runs in a read-only transaction, because a source reads and never writes.
    Postgres {
        /// A `postgres://` or `postgresql://` URL. TLS is not supported.
        url: String,
        /// The query, e.g. `SELECT order_id, amount::text AS amount FROM orders WHERE paid`.
        query: String,
    },
}

/// One record read from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    /// Where the record is in the source (see the module documentation).
    pub line: u64,
    /// The record's fields.
    pub fields: Map<String, Value>,
}

/// A line that could not be read as a record. Its message says what is wrong without quoting
/// the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Where the line is in the source (see the module documentation).
    pub line: u64,
    /// What is wrong, e.g. "not a JSON object (found an array)".
    pub message: String,
}

/// What a source yields: a record, or a line that is not one.
pub type Item = Result<SourceRecord, BadRecord>;

/// How many items a reader may run ahead of its consumer.
pub const CHANNEL_CAPACITY: usize = 1024;

/// The longest JSON Lines line idem reads; a longer one is a [`BadRecord`], and reading
/// resumes after its end.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Why a source cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The start of a file or of standard input cannot be read.
    #[error("cannot read {input}: {source}")]
    Read {
        /// The file, or "standard input".
        input: String,
        /// Why.
        source: io::Error,
    },
    /// A CSV source's header row is missing or unusable.
    #[error("{input}: {reason}")]
    CsvHeader {
        /// The file, or "standard input".
        input: String,
        /// What is wrong with the header.
        reason: String,
    },
    /// The PostgreSQL URL is not one idem can use.
    #[error("bad PostgreSQL source URL {url}: {reason}")]
    BadUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL cannot be reached, or refused the connection.
    #[error("cannot connect to PostgreSQL at {url}: {message}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The cause, as the client library or the server put it.
        message: String,
        /// Whether trying again later may help (the server is down or unreachable), as
        /// opposed to a mistake in the URL or the credentials.
        transient: bool,
    },
    /// PostgreSQL rejected the source query or failed before its first row.
    #[error("the source query failed on PostgreSQL at {url}: {message}")]
    Query {
        /// The URL, password redacted.
        url: String,
        /// The server's message.
        message: String,
    },
    /// The source query returns a column whose type has no natural JSON form.
    #[error(
        "column \"{column}\" of the source query has type {type_name}, which idem does not convert to JSON; \
         cast it in the query, e.g. `SELECT {column}::text AS {column}`"
    )]
    UnsupportedColumn {
        /// The column's name.
        column: String,
        /// Its PostgreSQL type, e.g. `numeric`.
        type_name: String,
    },
    /// The source query returns two columns of the same name, so one would hide the other.
    #[error("the source query returns two columns named \"{0}\"; rename one with AS")]
    DuplicateColumn(String),
    /// The reader thread or task could not be started, or stopped before it was ready.
    #[error("cannot start the source reader: {0}")]
    Reader(String),
}

impl Error {
    /// True when the same source may well open if tried again later: PostgreSQL was down or
    /// unreachable. Everything else is a mistake in the flow or the data.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Connect { transient: true, .. })
    }
}

/// Starts reading `source` and returns the stream of its records.
///
/// Returns once the source is known to be readable: a file is open, a CSV header row is read
/// (from standard input, that waits for the first line), or a PostgreSQL query has produced
/// its first rows. The stream ends after the last record.
pub async fn open(source: &Source) -> Result<mpsc::Receiver<Item>, Error> {
    Ok(start(source).await?.records)
}

/// The primary key of a record: the values of `key_fields`, in order.
///
/// This is the key under which the runner remembers a record (`idem log rm --key` takes it):
///
/// - With one key field, the key is its value: a string as its text, a number or boolean as
///   JSON writes it (`42`, `1.5`, `true`). A CSV cell `42` and a JSON number `42` give the
///   same key.
/// - With several, the values are joined with `|`, and a `|` or `\` inside a value is
///   preceded by `\`, so that `("a|b", "c")` and `("a", "b|c")` stay two keys:
///   `a\|b|c` and `a|b\|c`.
///
/// A key field that is absent, `null` or an empty string is an error, and so is an object or
/// an array.
pub fn primary_key(fields: &Map<String, Value>, key_fields: &[String]) -> Result<String, String> {
    if key_fields.is_empty() {
        return Err("no primary key fields are configured".to_owned());
    }
    let mut key = String::new();
    for (index, name) in key_fields.iter().enumerate() {
        let text = key_part(fields, name)?;
        if key_fields.len() == 1 {
            return Ok(text);
        }
        if index > 0 {
            key.push('|');
        }
        for c in text.chars() {
            if c == '|' || c == '\\' {
                key.push('\\');
            }
            key.push(c);
        }
    }
    Ok(key)
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Stdin => f.write_str("standard input"),
            Input::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Written by hand so that a logged `Source` never shows a PostgreSQL password.
impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Jsonl(input) => f.debug_tuple("Jsonl").field(input).finish(),
            Source::Csv(input) => f.debug_tuple("Csv").field(input).finish(),
            Source::Postgres { url, query } => {
                f.debug_struct("Postgres").field("url", &redact(url)).field("query", query).finish()
            }
        }
    }
}

fn key_part(fields: &Map<String, Value>, name: &str) -> Result<String, String> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(format!("missing primary key field \"{name}\"")),
        Some(Value::String(text)) if text.is_empty() => Err(format!("missing primary key field \"{name}\"")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(value @ (Value::Number(_) | Value::Bool(_))) => Ok(value.to_string()),
        Some(other) => Err(format!(
            "primary key field \"{name}\" is {}; a key must be a string, a number or a boolean",
            json_kind(other)
        )),
    }
}

/// A started reader: its records, and a signal that it has stopped (for tests).
struct Started {
    records: mpsc::Receiver<Item>,
    /// Never sent on: the reader holds the sender and drops it when it stops, which makes
    /// awaiting this return.
    #[cfg_attr(not(test), allow(dead_code))]
    stopped: oneshot::Receiver<()>,
}

/// How a reader tells [`open`] that the source is readable, or why not.
type Ready = oneshot::Sender<Result<(), Error>>;

async fn start(source: &Source) -> Result<Started, Error> {
    let (sender, records) = mpsc::channel(CHANNEL_CAPACITY);
    let (stopped_guard, stopped) = oneshot::channel::<()>();
    let (ready, is_ready) = oneshot::channel();
    match source {
        Source::Jsonl(input) => spawn_thread(input.clone(), ready, sender, stopped_guard, read_jsonl)?,
        Source::Csv(input) => spawn_thread(input.clone(), ready, sender, stopped_guard, read_csv)?,
        Source::Postgres { url, query } => {
            let (url, query) = (url.clone(), query.clone());
            tokio::spawn(async move {
                let _stopped = stopped_guard;
                read_postgres(&url, &query, ready, &sender).await;
            });
        }
    }
    match is_ready.await {
        Ok(Ok(())) => Ok(Started { records, stopped }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(Error::Reader("the reader stopped before the source was open".to_owned())),
    }
}

/// The body of a file reader thread: reads `reader`, reports on `ready`, sends items.
type FileReader = fn(Box<dyn Read>, &Input, Ready, &mpsc::Sender<Item>);

fn spawn_thread(
    input: Input,
    ready: Ready,
    sender: mpsc::Sender<Item>,
    stopped_guard: oneshot::Sender<()>,
    read: FileReader,
) -> Result<(), Error> {
    let body = move || {
        let _stopped = stopped_guard;
        match open_input(&input) {
            Ok(reader) => read(reader, &input, ready, &sender),
            Err(error) => {
                let _ = ready.send(Err(error));
            }
        }
    };
    std::thread::Builder::new()
        .name("idem-source".to_owned())
        .spawn(body)
        .map(drop)
        .map_err(|error| Error::Reader(error.to_string()))
}

fn open_input(input: &Input) -> Result<Box<dyn Read>, Error> {
    match input {
        Input::Stdin => Ok(Box::new(io::stdin())),
        Input::File(path) => {
            let open_error = |source| Error::Open { path: path.clone(), source };
            let file = File::open(path).map_err(open_error)?;
            // Opening a directory succeeds on Unix; reading it would then fail at "line 1".
            if file.metadata().map_err(open_error)?.is_dir() {
                return Err(open_error(io::Error::other("it is a directory")));
            }
            Ok(Box::new(file))
        }
    }
}

/// Read buffer for files and standard input: large enough that a read call is rare.
const READ_BUFFER: usize = 256 << 10;

/// Sends `item`; false when the consumer has gone and the reader should stop.
fn send(sender: &mpsc::Sender<Item>, item: Item) -> bool {
    sender.blocking_send(item).is_ok()
}

fn bad(line: u64, message: impl Into<String>) -> BadRecord {
    BadRecord { line, message: message.into() }
}

/// The last item of a source that could not be read to its end.
fn read_failure(line: u64, error: impl fmt::Display) -> Item {
    Err(bad(line, format!("read error: {error}; the rest of the source was not read")))
}

// ---- JSON Lines ----

fn read_jsonl(reader: Box<dyn Read>, _input: &Input, ready: Ready, sender: &mpsc::Sender<Item>) {
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        number += 1;
        line.clear();
        let item = match read_line(&mut reader, &mut line) {
            Ok(Line::End) => break,
            Ok(Line::TooLong) => Some(Err(bad(number, "line longer than 16 MiB"))),
            Ok(Line::Complete) => parse_jsonl_line(number, &line),
            Err(error) => {
                send(sender, read_failure(number, error));
                return;
            }
        };
        let go_on = match item {
            Some(item) => send(sender, item),
            None => !sender.is_closed(),
        };
        if !go_on {
            return;
        }
        // One huge line must not pin its buffer for the rest of the file.
        if line.capacity() > READ_BUFFER {
            line = Vec::new();
        }
    }
    tracing::debug!(lines = number - 1, "JSON Lines source read to its end");
}

enum Line {
    Complete,
    TooLong,
    End,
}

/// Reads one line into `line`, at most [`MAX_LINE_BYTES`] of it; a longer line is skipped
/// up to and including its newline.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Line> {
    let limit = MAX_LINE_BYTES as u64 + 1;
    let read = reader.take(limit).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(Line::End);
    }
    let content = line.len() - usize::from(line.ends_with(b"\n"));
    if content > MAX_LINE_BYTES {
        reader.skip_until(b'\n')?;
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete)
}

/// The item for one line, or `None` for a blank line.
fn parse_jsonl_line(number: u64, line: &[u8]) -> Option<Item> {
    let mut text = line.strip_suffix(b"\n").unwrap_or(line);
    text = text.strip_suffix(b"\r").unwrap_or(text);
    if number == 1 {
        text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(SourceRecord { line: number, fields }),
        Ok(other) => Err(bad(number, format!("not a JSON object (found {})", json_kind(&other)))),
        Err(error) => Err(bad(number, json_error(&error))),
    })
}

/// "invalid JSON at column 17: expected `,` or `}`". serde_json's messages describe the
/// syntax and never quote the input.
fn json_error(error: &serde_json::Error) -> String {
    let full = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    format!("invalid JSON at column {}: {what}", error.column())
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ---- CSV ----

fn read_csv(reader: Box<dyn Read>, input: &Input, ready: Ready, sender: &mpsc::Sender<Item>) {
    let mut csv = csv::ReaderBuilder::new()
        // Rows of the wrong length are checked here, to report them as bad records.
        .flexible(true)
        .buffer_capacity(READ_BUFFER)
        .from_reader(LineFeeder::new(reader));
    let header = match csv_header(&mut csv, input) {
        Ok(header) => header,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut row = csv::ByteRecord::new();
    loop {
        csv.get_mut().start_record();
        let result = csv.read_byte_record(&mut row);
        let line = csv.get_ref().record_line();
        let item = match result {
            Ok(false) => break,
            Ok(true) => csv_item(&header, &row, line),
            Err(error) => {
                send(sender, read_failure(line, error));
                return;
            }
        };
        if !send(sender, item) {
            return;
        }
    }
    tracing::debug!(lines = csv.get_ref().lines, "CSV source read to its end");
}

/// Hands the CSV parser at most one line per `read`, and so knows the line on which each
/// record starts. The csv crate's own positions cannot be used: they are one line early for
/// every record of a CRLF file, and point at the blank lines before a record.
///
/// It also bounds a record to [`MAX_LINE_BYTES`]: a quote left open would otherwise make the
/// parser swallow the rest of the file into one record, however large.
struct LineFeeder {
    inner: BufReader<Box<dyn Read>>,
    /// Complete lines handed to the parser so far.
    lines: u64,
    /// The line of the first non-blank bytes handed out since [`LineFeeder::start_record`].
    record_start: Option<u64>,
    /// Bytes handed out since [`LineFeeder::start_record`].
    record_bytes: usize,
}

impl LineFeeder {
    fn new(reader: Box<dyn Read>) -> Self {
        Self { inner: BufReader::with_capacity(READ_BUFFER, reader), lines: 0, record_start: None, record_bytes: 0 }
    }

    /// Called before the parser reads a record.
    fn start_record(&mut self) {
        self.record_start = None;
        self.record_bytes = 0;
    }

    /// The line on which the record just read starts.
    fn record_line(&self) -> u64 {
        self.record_start.unwrap_or(self.lines + 1)
    }
}

impl Read for LineFeeder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.inner.fill_buf()?;
        let line_end = available.iter().position(|&b| b == b'\n').map_or(available.len(), |newline| newline + 1);
        let n = line_end.min(buf.len());
        let chunk = &available[..n];
        buf[..n].copy_from_slice(chunk);
        // The parser skips empty lines (CRLF, LF or CR alone); a record starts after them.
        if self.record_start.is_none() && !chunk.iter().all(|&b| b == b'\r' || b == b'\n') {
            self.record_start = Some(self.lines + 1);
        }
        self.lines += u64::from(chunk.ends_with(b"\n"));
        self.record_bytes += n;
        self.inner.consume(n);
        if self.record_bytes > MAX_LINE_BYTES {
            return Err(io::Error::other("CSV record longer than 16 MiB (is a quote left open?)"));
        }
        Ok(n)
    }
}

/// The field names, in column order; `None` for a column with an empty name (ignored).
type Header = Vec<Option<String>>;

fn csv_header(csv: &mut csv::Reader<LineFeeder>, input: &Input) -> Result<Header, Error> {
    let header_error = |reason: String| Error::CsvHeader { input: input.to_string(), reason };
    let names = csv.byte_headers().map_err(|error| match error.into_kind() {
        csv::ErrorKind::Io(source) => Error::Read { input: input.to_string(), source },
        other => header_error(format!("cannot read the header row: {other:?}")),
    })?;
    if names.is_empty() {
        return Err(header_error("it is empty, but a CSV source needs a header row naming its fields".to_owned()));
    }
    let mut header = Header::with_capacity(names.len());
    for (index, name) in names.iter().enumerate() {
        let name = std::str::from_utf8(name)
            .map_err(|_| header_error(format!("the header of column {} is not valid UTF-8", index + 1)))?;
        if !name.is_empty() && header.iter().flatten().any(|seen| seen == name) {
            return Err(header_error(format!("the header row names column \"{name}\" twice")));
        }
        header.push((!name.is_empty()).then(|| name.to_owned()));
    }
    Ok(header)
}

fn csv_item(header: &Header, row: &csv::ByteRecord, line: u64) -> Item {
    if row.len() != header.len() {
        return Err(bad(line, format!("CSV row has {} fields, header has {}", row.len(), header.len())));
    }
    let mut fields = Map::new();
    for (name, value) in header.iter().zip(row) {
        let Some(name) = name else { continue };
        match std::str::from_utf8(value) {
            Ok(value) => fields.insert(name.clone(), Value::String(value.to_owned())),
            Err(_) => return Err(bad(line, format!("field \"{name}\" is not valid UTF-8"))),
        };
    }
    Ok(SourceRecord { line, fields })
}

// ---- PostgreSQL ----

/// Rows fetched per round trip. The query runs through a portal, so the server produces rows
/// only as they are asked for: memory stays flat, and a consumer that stops early stops the
/// query too.
const BATCH_ROWS: i32 = 512;

/// Applied when the URL sets no `connect_timeout`, so a silent host fails rather than hangs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to turn a column into JSON, decided from its type before the first row.
#[derive(Debug, Clone, Copy)]
enum Conversion {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Json,
}

struct Column {
    name: String,
    conversion: Conversion,
}

async fn read_postgres(url: &str, query: &str, ready: Ready, sender: &mpsc::Sender<Item>) {
    let redacted = redact(url);
    let mut client = match connect(url, &redacted).await {
        Ok(client) => client,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let query_error =
        |error: tokio_postgres::Error| Error::Query { url: redacted.clone(), message: pg_message(&error) };
    let transaction = match client.build_transaction().read_only(true).start().await {
        Ok(transaction) => transaction,
        Err(error) => {
            let _ = ready.send(Err(query_error(error)));
            return;
        }
    };
    let (columns, portal, first) = match start_query(&transaction, query, query_error).await {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if ready.send(Ok(())).is_ok() {
        stream_rows(&transaction, &portal, &columns, first, sender).await;
    }
    // Dropping the transaction rolls it back; dropping the client then closes the connection.
}

async fn connect(url: &str, redacted: &str) -> Result<tokio_postgres::Client, Error> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let reason = "expected a postgres:// URL".to_owned();
        return Err(Error::BadUrl { url: redacted.to_owned(), reason });
    }
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|error| Error::BadUrl { url: redacted.to_owned(), reason: pg_message(&error) })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("idem run");
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|error| Error::Connect {
        url: redacted.to_owned(),
        message: pg_message(&error),
        transient: is_transient(&error),
    })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL source connection ended with an error");
        }
    });
    Ok(client)
}

/// Prepares the query, checks its columns and fetches the first batch, so that everything
/// that can go wrong before the first row is an [`Error`] from [`open`].
async fn start_query(
    transaction: &tokio_postgres::Transaction<'_>,
    query: &str,
    query_error: impl Fn(tokio_postgres::Error) -> Error,
) -> Result<(Vec<Column>, tokio_postgres::Portal, Vec<tokio_postgres::Row>), Error> {
    let statement = transaction.prepare(query).await.map_err(&query_error)?;
    let mut columns: Vec<Column> = Vec::with_capacity(statement.columns().len());
    for column in statement.columns() {
        let name = column.name();
        if columns.iter().any(|seen| seen.name == name) {
            return Err(Error::DuplicateColumn(name.to_owned()));
        }
        let conversion = conversion(column.type_()).ok_or_else(|| Error::UnsupportedColumn {
            column: name.to_owned(),
            type_name: type_name(column.type_()),
        })?;
        columns.push(Column { name: name.to_owned(), conversion });
    }
    let portal = transaction.bind(&statement, &[]).await.map_err(&query_error)?;
    let first = transaction.query_portal(&portal, BATCH_ROWS).await.map_err(&query_error)?;
    Ok((columns, portal, first))
}

async fn stream_rows(
    transaction: &tokio_postgres::Transaction<'_>,
    portal: &tokio_postgres::Portal,
    columns: &[Column],
    mut batch: Vec<tokio_postgres::Row>,
    sender: &mpsc::Sender<Item>,
) {
    let mut number = 0;
    loop {
        let last = batch.len() < BATCH_ROWS as usize;
        for row in batch {
            number += 1;
            if sender.send(row_item(number, columns, &row)).await.is_err() {
                return;
            }
        }
        if last {
            break;
        }
        batch = match transaction.query_portal(portal, BATCH_ROWS).await {
            Ok(rows) => rows,
            Err(error) => {
                let _ = sender.send(read_failure(number + 1, pg_message(&error))).await;
                return;
            }
        };
    }
    tracing::debug!(rows = number, "PostgreSQL source read to its end");
}

/// A connection failure that may pass: the network or the server is down, or the server is
/// starting up or full. A refused password or a bad database name is not.
fn is_transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code) => [SqlState::CANNOT_CONNECT_NOW, SqlState::TOO_MANY_CONNECTIONS].contains(code),
        None => std::error::Error::source(error).is_some_and(|cause| cause.is::<io::Error>()),
    }
}

fn conversion(ty: &Type) -> Option<Conversion> {
    Some(match *ty {
        Type::BOOL => Conversion::Bool,
        Type::INT2 => Conversion::Int2,
        Type::INT4 => Conversion::Int4,
        Type::INT8 => Conversion::Int8,
        Type::FLOAT4 => Conversion::Float4,
        Type::FLOAT8 => Conversion::Float8,
        Type::JSON | Type::JSONB => Conversion::Json,
        // text, varchar, bpchar, name, and extension types such as citext.
        _ if <String as FromSql>::accepts(ty) => Conversion::Text,
        _ => return None,
    })
}

/// `numeric`, `timestamptz`, `text[]`: the name as a user would write it in a cast.
fn type_name(ty: &Type) -> String {
    match ty.kind() {
        Kind::Array(element) => format!("{}[]", element.name()),
        _ => ty.name().to_owned(),
    }
}

fn row_item(number: u64, columns: &[Column], row: &tokio_postgres::Row) -> Item {
    let mut fields = Map::with_capacity(columns.len());
    for (index, column) in columns.iter().enumerate() {
        let value = column_value(row, index, column.conversion)
            .map_err(|error| bad(number, format!("column \"{}\" cannot be read: {error}", column.name)))?;
        fields.insert(column.name.clone(), value);
    }
    Ok(SourceRecord { line: number, fields })
}

fn column_value(row: &tokio_postgres::Row, index: usize, conversion: Conversion) -> Result<Value, String> {
    fn get<'a, T: FromSql<'a>>(row: &'a tokio_postgres::Row, index: usize) -> Result<Option<T>, String> {
        row.try_get::<_, Option<T>>(index).map_err(|error| pg_message(&error))
    }
    let value = match conversion {
        Conversion::Bool => get::<bool>(row, index)?.map(Value::from),
        Conversion::Int2 => get::<i16>(row, index)?.map(Value::from),
        Conversion::Int4 => get::<i32>(row, index)?.map(Value::from),
        Conversion::Int8 => get::<i64>(row, index)?.map(Value::from),
        // Through its shortest decimal form, so that real 0.1 becomes 0.1, not 0.10000000149.
        Conversion::Float4 => get::<f32>(row, index)?.map(|v| float(v.to_string().parse().unwrap_or(f64::from(v)))),
        Conversion::Float8 => get::<f64>(row, index)?.map(float),
        Conversion::Text => get::<String>(row, index)?.map(Value::String),
        Conversion::Json => get::<Value>(row, index)?,
    };
    Ok(value.unwrap_or(Value::Null))
}

/// A number, or for NaN and the infinities (which JSON cannot write) PostgreSQL's spelling of
/// them as a string.
fn float(value: f64) -> Value {
    match serde_json::Number::from_f64(value) {
        Some(number) => Value::Number(number),
        None if value.is_nan() => Value::from("NaN"),
        None if value > 0.0 => Value::from("Infinity"),
        None => Value::from("-Infinity"),
    }
}

/// The server's own message (and hint) for an error it sent; otherwise the client library's
/// description with its cause.
fn pg_message(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        // The detail is left out: it can quote row data.
        return match db.hint() {
            Some(hint) => format!("{} (hint: {hint})", db.message()),
            None => db.message().to_owned(),
        };
    }
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Instant;

    use serde_json::json;

    use super::*;

    fn file_with(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        file.flush().unwrap();
        file
    }

    fn jsonl(file: &tempfile::NamedTempFile) -> Source {
        Source::Jsonl(Input::File(file.path().to_owned()))
    }

    fn csv(file: &tempfile::NamedTempFile) -> Source {
        Source::Csv(Input::File(file.path().to_owned()))
    }

    async fn read_all(source: &Source) -> Vec<Item> {
        let mut records = open(source).await.unwrap();
        let mut items = Vec::new();
        while let Some(item) = records.recv().await {
            items.push(item);
        }
        items
    }

    fn record(line: u64, fields: Value) -> Item {
        let Value::Object(fields) = fields else { panic!("test record must be an object") };
        Ok(SourceRecord { line, fields })
    }

    fn bad_record(line: u64, message: &str) -> Item {
        Err(bad(line, message))
    }

    fn fields(value: Value) -> Map<String, Value> {
        let Value::Object(fields) = value else { panic!("test fields must be an object") };
        fields
    }

    fn strings(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| key.to_string()).collect()
    }

    #[tokio::test]
    async fn jsonl_yields_objects_with_line_numbers_and_reports_bad_lines() {
        let file = file_with(
            b"\xEF\xBB\xBF{\"order_id\": 1, \"name\": \"Ada\"}\n\
              \n\
              {\"order_id\": 2,, \"name\": \"secret\"}\n\
              [1, 2]\n\
              \"just a string\"\n   \t\n\
              {\"order_id\": 3, \"nested\": {\"a\": [true, null]}}\r\n\
              {\"order_id\": 4}",
        );
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![
                record(1, json!({"order_id": 1, "name": "Ada"})),
                bad_record(3, "invalid JSON at column 16: key must be a string"),
                bad_record(4, "not a JSON object (found an array)"),
                bad_record(5, "not a JSON object (found a string)"),
                record(7, json!({"order_id": 3, "nested": {"a": [true, null]}})),
                record(8, json!({"order_id": 4})),
            ]
        );
        let bad_count = items.iter().filter(|item| item.is_err()).count();
        assert_eq!(bad_count, 3);
        assert!(items.iter().all(|item| item.as_ref().err().is_none_or(|bad| !bad.message.contains("secret"))));
    }

    #[tokio::test]
    async fn jsonl_truncated_line_and_empty_file() {
        let file = file_with(b"{\"a\": 1\n{\"b\": \"x\n");
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![
                bad_record(1, "invalid JSON at column 7: EOF while parsing an object"),
                bad_record(2, "invalid JSON at column 8: EOF while parsing a string"),
            ]
        );
        assert_eq!(read_all(&jsonl(&file_with(b""))).await, vec![]);
    }

    #[tokio::test]
    async fn jsonl_line_over_the_cap_is_reported_and_reading_resumes_after_it() {
        let mut contents = b"{\"n\": 1}\n{\"long\": \"".to_vec();
        contents.resize(contents.len() + MAX_LINE_BYTES, b'x');
        contents.extend_from_slice(b"\"}\n{\"n\": 3}\n");
        let file = file_with(&contents);
        let items = read_all(&jsonl(&file)).await;
        assert_eq!(
            items,
            vec![record(1, json!({"n": 1})), bad_record(2, "line longer than 16 MiB"), record(3, json!({"n": 3})),]
        );
    }

    #[tokio::test]
    async fn jsonl_line_exactly_at_the_cap_is_read() {
        let mut contents = b"{\"long\": \"".to_vec();
        contents.resize(MAX_LINE_BYTES - 2, b'x');
        contents.extend_from_slice(b"\"}\n{\"n\": 2}");
        let items = read_all(&jsonl(&file_with(&contents))).await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap().fields["long"].as_str().unwrap().len(), MAX_LINE_BYTES - 2 - 10);
        assert_eq!(items[1], record(2, json!({"n": 2})));
    }

    #[tokio::test]
    async fn csv_values_are_strings_with_quoted_fields_and_the_start_line_of_each_row() {
        let file = file_with(
            b"\xEF\xBB\xBFid,name,note\n\
              1,\"Smith, Jane\",\"two\nlines\"\n\
              2,Bob\n\
              \n\
              3,\"He said \"\"hi\"\"\",\n\
              4,a,b,c\n\
              5,\xFF,x\n\
              6,last,row",
        );
        let items = read_all(&csv(&file)).await;
        assert_eq!(
            items,
            vec![
                record(2, json!({"id": "1", "name": "Smith, Jane", "note": "two\nlines"})),
                bad_record(4, "CSV row has 2 fields, header has 3"),
                record(6, json!({"id": "3", "name": "He said \"hi\"", "note": ""})),
                bad_record(7, "CSV row has 4 fields, header has 3"),
                bad_record(8, "field \"name\" is not valid UTF-8"),
                record(9, json!({"id": "6", "name": "last", "note": "row"})),
            ]
        );
    }

    #[tokio::test]
    async fn csv_line_numbers_hold_for_crlf_files_and_blank_lines() {
        let file = file_with(b"id,name\r\n1,a\r\n\r\n\r\n2,\"b\r\nc\"\r\n3\r\n4,d");
        assert_eq!(
            read_all(&csv(&file)).await,
            vec![
                record(2, json!({"id": "1", "name": "a"})),
                record(5, json!({"id": "2", "name": "b\r\nc"})),
                bad_record(7, "CSV row has 1 fields, header has 2"),
                record(8, json!({"id": "4", "name": "d"})),
            ]
        );
    }

    #[tokio::test]
    async fn csv_quote_left_open_ends_the_stream_instead_of_filling_memory() {
        let mut contents = b"id,note\n1,ok\n2,\"open quote\n".to_vec();
        for n in 0..(MAX_LINE_BYTES / 16 + 1) {
            contents.extend_from_slice(format!("{n:>7},padding\n").as_bytes());
        }
        let items = read_all(&csv(&file_with(&contents))).await;
        assert_eq!(items.len(), 2, "{:?}", &items[1..].iter().map(|i| i.as_ref().err()).collect::<Vec<_>>());
        assert_eq!(items[0], record(2, json!({"id": "1", "note": "ok"})));
        let last = items[1].as_ref().unwrap_err();
        assert_eq!(last.line, 3);
        assert!(last.message.contains("longer than 16 MiB (is a quote left open?)"), "{}", last.message);
        assert!(last.message.contains("the rest of the source was not read"), "{}", last.message);
    }

    #[tokio::test]
    async fn csv_columns_without_a_name_are_ignored() {
        let file = file_with(b"id,,name,\n1,x,Ada,\n");
        assert_eq!(read_all(&csv(&file)).await, vec![record(2, json!({"id": "1", "name": "Ada"}))]);
    }

    #[tokio::test]
    async fn csv_without_a_usable_header_cannot_be_opened() {
        let empty = file_with(b"");
        let error = open(&csv(&empty)).await.unwrap_err();
        assert!(matches!(error, Error::CsvHeader { .. }), "{error:?}");
        assert!(error.to_string().contains("needs a header row"), "{error}");

        let twice = file_with(b"id,name,id\n1,a,2\n");
        let error = open(&csv(&twice)).await.unwrap_err().to_string();
        assert!(error.contains("names column \"id\" twice"), "{error}");
        assert!(error.contains(&twice.path().display().to_string()), "{error}");
    }

    #[tokio::test]
    async fn a_missing_file_is_an_error_naming_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.jsonl");
        for source in [Source::Jsonl(Input::File(path.clone())), Source::Csv(Input::File(path.clone()))] {
            let error = open(&source).await.unwrap_err();
            assert!(matches!(&error, Error::Open { path: p, .. } if *p == path), "{error:?}");
            assert!(error.to_string().contains(&path.display().to_string()), "{error}");
            assert!(!error.is_retryable());
        }
        let error = open(&Source::Jsonl(Input::File(dir.path().to_owned()))).await.unwrap_err();
        assert!(error.to_string().contains("is a directory"), "{error}");
    }

    #[test]
    fn primary_key_of_one_field_is_its_value() {
        let record = fields(json!({"order_id": "A-1", "n": 42, "f": 1.5, "b": true, "pipe": "a|b\\c"}));
        assert_eq!(primary_key(&record, &strings(&["order_id"])), Ok("A-1".to_owned()));
        assert_eq!(primary_key(&record, &strings(&["n"])), Ok("42".to_owned()));
        assert_eq!(primary_key(&record, &strings(&["f"])), Ok("1.5".to_owned()));
        assert_eq!(primary_key(&record, &strings(&["b"])), Ok("true".to_owned()));
        assert_eq!(primary_key(&record, &strings(&["pipe"])), Ok("a|b\\c".to_owned()));
    }

    #[test]
    fn primary_key_of_several_fields_is_joined_with_pipes_and_unambiguous() {
        let record = fields(json!({"tenant": "acme", "order_id": 7}));
        assert_eq!(primary_key(&record, &strings(&["tenant", "order_id"])), Ok("acme|7".to_owned()));

        let left = fields(json!({"a": "x|y", "b": "z"}));
        let right = fields(json!({"a": "x", "b": "y|z"}));
        let key = strings(&["a", "b"]);
        assert_eq!(primary_key(&left, &key), Ok("x\\|y|z".to_owned()));
        assert_eq!(primary_key(&right, &key), Ok("x|y\\|z".to_owned()));
        let slash = fields(json!({"a": "x\\", "b": "y"}));
        assert_eq!(primary_key(&slash, &key), Ok("x\\\\|y".to_owned()));
    }

    #[test]
    fn primary_key_fields_must_be_present_and_scalar() {
        let record = fields(json!({"id": 1, "null": null, "empty": "", "obj": {"a": 1}, "list": [1]}));
        let missing = |name: &str| Err(format!("missing primary key field \"{name}\""));
        assert_eq!(primary_key(&record, &strings(&["order_id"])), missing("order_id"));
        assert_eq!(primary_key(&record, &strings(&["id", "null"])), missing("null"));
        assert_eq!(primary_key(&record, &strings(&["empty"])), missing("empty"));
        let error = primary_key(&record, &strings(&["obj"])).unwrap_err();
        assert!(error.contains("\"obj\" is an object"), "{error}");
        let error = primary_key(&record, &strings(&["id", "list"])).unwrap_err();
        assert!(error.contains("\"list\" is an array"), "{error}");
        assert!(primary_key(&record, &[]).is_err());
    }

    /// Reads a generated file end to end through the channel and prints the rate (not asserted:
    /// speed is for benchmarks, this checks that nothing is lost or buffered whole).
    #[tokio::test]
    async fn a_large_jsonl_file_streams_end_to_end() {
        const LINES: u64 = 300_000;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        {
            let mut writer = io::BufWriter::new(file.as_file_mut());
            for n in 1..=LINES {
                writeln!(writer, "{{\"order_id\":{n},\"amount\":\"12.50\",\"email\":\"c{n}@example.com\"}}").unwrap();
            }
        }
        let bytes = file.as_file().metadata().unwrap().len();
        let started = Instant::now();
        let mut records = open(&jsonl(&file)).await.unwrap();
        let (mut count, mut last_line) = (0u64, 0);
        while let Some(item) = records.recv().await {
            let record = item.unwrap();
            assert_eq!(record.line, last_line + 1);
            last_line = record.line;
            count += 1;
        }
        let elapsed = started.elapsed();
        assert_eq!(count, LINES);
        println!(
            "read {count} records ({} MiB) in {elapsed:.2?}: {:.0} records/s",
            bytes >> 20,
            count as f64 / elapsed.as_secs_f64()
        );
    }

    #[tokio::test]
    async fn dropping_the_receiver_stops_a_file_reader() {
        let mut contents = Vec::new();
        for n in 0..(10 * CHANNEL_CAPACITY) {
            contents.extend_from_slice(format!("{{\"n\":{n}}}\n").as_bytes());
        }
        let file = file_with(&contents);
        for source in [jsonl(&file), csv(&file_with(b"n\n1\n2\n3\n4\n5\n"))] {
            let Started { mut records, stopped } = start(&source).await.unwrap();
            assert!(records.recv().await.unwrap().is_ok());
            drop(records);
            tokio::time::timeout(Duration::from_secs(10), stopped)
                .await
                .expect("the reader should stop once nobody receives its records")
                .unwrap_err();
        }
    }

    #[test]
    fn the_source_url_is_shown_without_its_password() {
        let source = Source::Postgres { url: "postgres://u:pw@h/db".to_owned(), query: "SELECT 1".to_owned() };
        assert!(!format!("{source:?}").contains("pw"), "{source:?}");
    }

    // ---- PostgreSQL, against a real server ----

    fn postgres_url() -> String {
        std::env::var("IDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".to_owned())
    }

    fn postgres(query: &str) -> Source {
        Source::Postgres { url: postgres_url(), query: query.to_owned() }
    }

    /// Opens a query, failing loudly when the test server is not there.
    async fn start_postgres(query: &str) -> Result<Started, Error> {
        match start(&postgres(query)).await {
            Err(error @ Error::Connect { .. }) => panic!(
                "PostgreSQL tests need a server at {} (set IDEM_TEST_POSTGRES_URL to another URL): {error}",
                redact(&postgres_url())
            ),
            other => other,
        }
    }

    async fn read_postgres_all(query: &str) -> Vec<Item> {
        let mut records = start_postgres(query).await.unwrap().records;
        let mut items = Vec::new();
        while let Some(item) = records.recv().await {
            items.push(item);
        }
        items
    }

    #[tokio::test]
    async fn postgres_columns_become_json_by_type() {
        let items = read_postgres_all(
            "SELECT true AS b, 1::int2 AS i2, 2::int4 AS i4, 9007199254740993::int8 AS i8, \
             0.1::float4 AS f4, 2.5::float8 AS f8, 'NaN'::float8 AS nan, '-Infinity'::float8 AS ninf, \
             'x'::text AS t, 'y'::varchar(5) AS v, 'z'::char(3) AS c, 'n'::name AS nm, \
             '{\"a\": [1, null]}'::json AS j, '{\"b\": 2}'::jsonb AS jb, NULL::int4 AS missing",
        )
        .await;
        assert_eq!(
            items,
            vec![record(
                1,
                json!({
                    "b": true, "i2": 1, "i4": 2, "i8": 9007199254740993i64, "f4": 0.1, "f8": 2.5,
                    "nan": "NaN", "ninf": "-Infinity", "t": "x", "v": "y", "c": "z  ", "nm": "n",
                    "j": {"a": [1, null]}, "jb": {"b": 2}, "missing": null
                })
            )]
        );
    }

    #[tokio::test]
    async fn postgres_rows_stream_across_batches_with_row_numbers() {
        let rows = 3 * BATCH_ROWS as u64 + 7;
        let items =
            read_postgres_all(&format!("SELECT g AS id, 'n' || g AS name FROM generate_series(1, {rows}) g")).await;
        assert_eq!(items.len() as u64, rows);
        for (index, item) in items.iter().enumerate() {
            let n = index as u64 + 1;
            assert_eq!(*item, record(n, json!({"id": n, "name": format!("n{n}")})));
        }
        assert_eq!(read_postgres_all("SELECT 1 AS id WHERE false").await, vec![]);
    }

    #[tokio::test]
    async fn postgres_unsupported_column_types_are_an_error_before_the_first_row() {
        for (query, column, type_name) in [
            ("SELECT 1 AS id, 12.50::numeric AS amount", "amount", "numeric"),
            ("SELECT now() AS created_at", "created_at", "timestamptz"),
            ("SELECT gen_random_uuid() AS id", "id", "uuid"),
            ("SELECT ARRAY['a'] AS tags", "tags", "text[]"),
        ] {
            let error = start_postgres(query).await.err().unwrap();
            let message = error.to_string();
            assert!(
                matches!(&error, Error::UnsupportedColumn { column: c, type_name: t } if c == column && t == type_name),
                "{error:?}"
            );
            assert!(message.contains(&format!("{column}::text")), "{message}");
        }
        let error = start_postgres("SELECT 1 AS id, 2 AS id").await.err().unwrap();
        assert!(matches!(&error, Error::DuplicateColumn(name) if name == "id"), "{error:?}");
    }

    #[tokio::test]
    async fn postgres_query_errors_name_the_server_message() {
        let error = start_postgres("SELECT * FROM idem_no_such_table").await.err().unwrap();
        let message = error.to_string();
        assert!(matches!(error, Error::Query { .. }), "{error:?}");
        assert!(message.contains("idem_no_such_table\" does not exist"), "{message}");

        let error = start_postgres("SELECT 1 / 0 AS x").await.err().unwrap().to_string();
        assert!(error.contains("division by zero"), "{error}");

        let error =
            start_postgres("CREATE TEMP TABLE idem_source_write_test (id int)").await.err().unwrap().to_string();
        assert!(error.contains("read-only transaction"), "{error}");
    }

    #[tokio::test]
    async fn postgres_failure_after_the_first_rows_ends_the_stream_with_a_bad_record() {
        let fail_at = 2 * BATCH_ROWS + 10;
        let items = read_postgres_all(&format!(
            "SELECT 1 / ({fail_at} - g) AS x FROM generate_series(1, {}) g",
            3 * BATCH_ROWS
        ))
        .await;
        let (last, rows) = items.split_last().unwrap();
        assert_eq!(rows.len(), 2 * BATCH_ROWS as usize);
        assert!(rows.iter().all(Result::is_ok));
        let last = last.as_ref().unwrap_err();
        assert_eq!(last.line, 2 * BATCH_ROWS as u64 + 1);
        assert!(last.message.contains("division by zero"), "{}", last.message);
        assert!(last.message.contains("the rest of the source was not read"), "{}", last.message);
    }

    #[tokio::test]
    async fn postgres_unreachable_is_a_transient_error_without_the_password() {
        let source = Source::Postgres {
            url: "postgres://idem:hunter2@127.0.0.1:1/test".to_owned(),
            query: "SELECT 1".to_owned(),
        };
        let error = open(&source).await.unwrap_err();
        let message = error.to_string();
        assert!(error.is_retryable(), "{error:?}");
        assert!(message.contains("postgres://idem:***@127.0.0.1:1/test"), "{message}");
        assert!(!message.contains("hunter2") && !format!("{error:?}").contains("hunter2"), "{message}");

        let error = open(&Source::Postgres { url: "mysql://h/db".to_owned(), query: String::new() }).await.unwrap_err();
        assert!(matches!(error, Error::BadUrl { .. }), "{error:?}");
    }

    /// The set-returning function sits in the select list, where PostgreSQL produces rows one
    /// by one (in FROM it would compute all of them before the first).
    #[tokio::test]
    async fn dropping_the_receiver_stops_a_postgres_reader() {
        let Started { mut records, stopped } =
            start_postgres("SELECT generate_series(1, 100000000) AS id").await.unwrap();
        assert_eq!(records.recv().await.unwrap(), record(1, json!({"id": 1})));
        drop(records);
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the reader should stop once nobody receives its rows")
            .unwrap_err();
    }
}
