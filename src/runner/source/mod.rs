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
//!
//! This file holds what every reader shares (the types, [`open`], the channel and the
//! reader thread); each reader is a file of its own: `jsonl.rs`, `csv.rs`, `postgres.rs`.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use crate::store::redact;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

mod csv;
mod jsonl;
mod postgres;

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
        /// A `postgres://` or `postgresql://` URL; TLS as for a store URL (`sslmode`, `sslrootcert`).
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
        Source::Jsonl(input) => spawn_thread(input.clone(), ready, sender, stopped_guard, jsonl::read)?,
        Source::Csv(input) => spawn_thread(input.clone(), ready, sender, stopped_guard, csv::read)?,
        Source::Postgres { url, query } => {
            let (url, query) = (url.clone(), query.clone());
            tokio::spawn(async move {
                let _stopped = stopped_guard;
                postgres::read(&url, &query, ready, &sender).await;
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

#[cfg(test)]
mod testing {
    //! What the readers' tests share: files with given contents, and a source read to its end.

    use std::io::Write;

    use serde_json::Value;

    use super::{Input, Item, Source, SourceRecord, bad, open};

    pub(super) fn file_with(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        file.flush().unwrap();
        file
    }

    pub(super) fn jsonl(file: &tempfile::NamedTempFile) -> Source {
        Source::Jsonl(Input::File(file.path().to_owned()))
    }

    pub(super) fn csv(file: &tempfile::NamedTempFile) -> Source {
        Source::Csv(Input::File(file.path().to_owned()))
    }

    pub(super) async fn read_all(source: &Source) -> Vec<Item> {
        let mut records = open(source).await.unwrap();
        let mut items = Vec::new();
        while let Some(item) = records.recv().await {
            items.push(item);
        }
        items
    }

    pub(super) fn record(line: u64, fields: Value) -> Item {
        let Value::Object(fields) = fields else { panic!("test record must be an object") };
        Ok(SourceRecord { line, fields })
    }

    pub(super) fn bad_record(line: u64, message: &str) -> Item {
        Err(bad(line, message))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::testing::{csv, file_with, jsonl};
    use super::*;

    fn fields(value: Value) -> Map<String, Value> {
        let Value::Object(fields) = value else { panic!("test fields must be an object") };
        fields
    }

    fn strings(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|key| key.to_string()).collect()
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
}
