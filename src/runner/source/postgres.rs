//! The PostgreSQL reader: the rows of a query in a read-only transaction, fetched in batches
//! through a portal, each column turned into JSON by its type.

use std::io;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::types::{FromSql, Kind, Type};

use super::{Error, Item, Ready, SourceRecord, bad, read_failure};
use crate::store::redact;

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

/// The body of the reader task: connects, starts the query in a read-only transaction
/// (reported on `ready`), then streams its rows.
pub(super) async fn read(url: &str, query: &str, ready: Ready, sender: &mpsc::Sender<Item>) {
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
    // The store's URL rules and TLS (sslmode, sslrootcert), so a source URL means what a
    // store URL means.
    let (mut config, tls) = crate::store::postgres::connection(url)
        .map_err(|error| Error::BadUrl { url: redacted.to_owned(), reason: error.to_string() })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("idem run");
    }
    let (client, connection) =
        config.connect(tls).await.map_err(|error| match crate::store::postgres::tls_failure(&error) {
            // A certificate that fails verification is not an outage: no retry fixes it.
            Some(reason) => Error::Connect { url: redacted.to_owned(), message: reason, transient: false },
            None => Error::Connect {
                url: redacted.to_owned(),
                message: pg_message(&error),
                transient: is_transient(&error),
            },
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
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::record;
    use super::super::{Source, Started, open, start};
    use super::*;

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
