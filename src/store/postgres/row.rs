//! A record as a row: every field stored exactly, times as BIGINT milliseconds, the
//! fingerprint as its 32 bytes, response headers as a JSON array of `[name, value]` pairs.
//!
//! Headers are JSON text rather than JSONB: JSONB refuses `\u0000` and a header value is
//! any string an operator may have typed into `resolve`, so only text keeps every one.

use bytes::Bytes;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::super::Error;
use crate::core::{Fingerprint, Lease, Record, RecordId, Status, StoredResponse};

/// The record's columns, in the order [`Values::params`] binds and [`read`] reads them.
pub const COLUMNS: &str = "scope, tenant, key, fingerprint, status, lease_token, locked_until, resp_status, \
    resp_headers, resp_body, resp_retained, created_at, last_seen_at, expires_at, replay_count, attempt_count, \
    correlation_id, error_summary";

/// How many columns [`COLUMNS`] lists; the first three are the primary key.
pub const COLUMN_COUNT: usize = 18;

/// A record's column values, ready to bind.
pub struct Values<'a> {
    record: &'a Record,
    fingerprint: &'a [u8],
    status: &'static str,
    lease_token: Option<i64>,
    locked_until: Option<i64>,
    resp_status: Option<i32>,
    resp_headers: Option<String>,
    resp_body: Option<&'a [u8]>,
    resp_retained: Option<bool>,
    replay_count: i64,
    attempt_count: i64,
}

impl<'a> Values<'a> {
    /// Converts `record` to column values.
    pub fn of(record: &'a Record) -> Result<Self, Error> {
        let response = record.response.as_ref();
        let resp_headers = response
            .map(|r| serde_json::to_string(&r.headers))
            .transpose()
            .map_err(|e| Error::Corrupt(format!("{}: unwritable headers: {e}", record.id)))?;
        Ok(Self {
            record,
            fingerprint: record.fingerprint.0.as_slice(),
            status: record.status.as_str(),
            // Tokens are below 2^63 (see `new_token`), so they fit a BIGINT unchanged.
            lease_token: record.lease.map(|l| l.token as i64),
            locked_until: record.lease.map(|l| l.locked_until),
            resp_status: response.map(|r| i32::from(r.status)),
            resp_headers,
            resp_body: response.map(|r| r.body.as_ref()),
            resp_retained: response.map(|r| r.retained),
            replay_count: record.replay_count as i64,
            attempt_count: record.attempt_count as i64,
        })
    }

    /// The values in [`COLUMNS`] order.
    pub fn params(&self) -> [&(dyn ToSql + Sync); COLUMN_COUNT] {
        let r = self.record;
        [
            &r.id.scope,
            &r.id.tenant,
            &r.id.key,
            &self.fingerprint,
            &self.status,
            &self.lease_token,
            &self.locked_until,
            &self.resp_status,
            &self.resp_headers,
            &self.resp_body,
            &self.resp_retained,
            &r.created_at,
            &r.last_seen_at,
            &r.expires_at,
            &self.replay_count,
            &self.attempt_count,
            &r.correlation_id,
            &r.error_summary,
        ]
    }
}

/// Reads the record whose [`COLUMNS`] start at column `at` of `row`.
pub fn read(row: &Row, at: usize) -> Result<Record, Error> {
    let corrupt = |what: &str| Error::Corrupt(format!("a row of the records table: {what}"));
    let get = |e: tokio_postgres::Error| corrupt(&e.to_string());
    let id = RecordId::new(
        row.try_get::<_, String>(at).map_err(get)?,
        row.try_get::<_, String>(at + 1).map_err(get)?,
        row.try_get::<_, String>(at + 2).map_err(get)?,
    );
    let corrupt = |what: &str| Error::Corrupt(format!("{id}: {what}"));
    let fingerprint: &[u8] = row.try_get(at + 3).map_err(get)?;
    let fingerprint = Fingerprint(fingerprint.try_into().map_err(|_| corrupt("a fingerprint is not 32 bytes"))?);
    let status: &str = row.try_get(at + 4).map_err(get)?;
    let status = Status::parse(status).ok_or_else(|| corrupt(&format!("unknown status {status:?}")))?;
    let token: Option<i64> = row.try_get(at + 5).map_err(get)?;
    let locked_until: Option<i64> = row.try_get(at + 6).map_err(get)?;
    let response = read_response(row, at + 7).map_err(|what| corrupt(&what))?;
    Ok(Record {
        fingerprint,
        status,
        lease: token.zip(locked_until).map(|(t, until)| Lease { token: t as u64, locked_until: until }),
        response,
        created_at: row.try_get(at + 11).map_err(get)?,
        last_seen_at: row.try_get(at + 12).map_err(get)?,
        expires_at: row.try_get(at + 13).map_err(get)?,
        replay_count: row.try_get::<_, i64>(at + 14).map_err(get)? as u64,
        attempt_count: row.try_get::<_, i64>(at + 15).map_err(get)? as u64,
        correlation_id: row.try_get(at + 16).map_err(get)?,
        error_summary: row.try_get(at + 17).map_err(get)?,
        id,
    })
}

/// The four response columns starting at `at`; `None` when no status is stored.
fn read_response(row: &Row, at: usize) -> Result<Option<StoredResponse>, String> {
    let text = |e: tokio_postgres::Error| e.to_string();
    let Some(status) = row.try_get::<_, Option<i32>>(at).map_err(text)? else {
        return Ok(None);
    };
    let status = u16::try_from(status).map_err(|_| format!("response status {status} out of range"))?;
    let headers: Option<&str> = row.try_get(at + 1).map_err(text)?;
    let headers = serde_json::from_str(headers.unwrap_or("[]")).map_err(|e| format!("bad response headers: {e}"))?;
    let body: Option<Vec<u8>> = row.try_get(at + 2).map_err(text)?;
    let retained: Option<bool> = row.try_get(at + 3).map_err(text)?;
    Ok(Some(StoredResponse {
        status,
        headers,
        body: Bytes::from(body.unwrap_or_default()),
        retained: retained.unwrap_or(true),
    }))
}
