//! How a record is laid out in Redis: key names, the hash of one record, and the sortable
//! index member. Pure functions, tested without a server.

use std::collections::HashMap;

use bytes::Bytes;
use redis::Value;

use crate::core::{Fingerprint, Lease, Millis, Outcome, Record, RecordId, Status, StoredResponse};
use crate::store::Error;

/// The layout version this build writes under a prefix; a prefix marked with a higher one
/// was written by a newer idem and is refused (like SQLite's `user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// The names of every key idem writes under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    /// What every key starts with (`idem` unless the URL says `?prefix=`).
    prefix: String,
    /// Sorted set of every record, all scores 0, members ordered by `(created_at, id)`
    /// (see [`member`]): the listing index, read newest first with `ZREVRANGEBYLEX`.
    pub created: String,
    /// Sorted set of the same members scored by each record's deadline ([`Record::deadline`]):
    /// what `purge_expired` reads, so it never walks the listing index.
    pub expires: String,
    /// The prefix's layout version ([`SCHEMA_VERSION`]). Never expires.
    pub schema: String,
}

impl Keys {
    /// The key names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            created: format!("{prefix}:idx:created"),
            expires: format!("{prefix}:idx:expires"),
            schema: format!("{prefix}:schema"),
        }
    }

    /// The hash holding one record: the prefix, then the JSON array of the id's three
    /// parts, which is unambiguous whatever characters they contain and readable in
    /// `redis-cli`.
    pub fn record(&self, id: &RecordId) -> String {
        // A tuple of strings always serializes.
        let parts = serde_json::to_string(&(&id.scope, &id.tenant, &id.key)).unwrap_or_default();
        format!("{}:rec:{parts}", self.prefix)
    }
}

/// The record's member in both indexes: `created_at` as 8 order-preserving big-endian
/// bytes, then scope, tenant and key, each ended by a 0 byte, with a 0 byte inside a part
/// written as `0, 0xFF`. Byte order of members is then exactly the order of
/// `(created_at, scope, tenant, key)` (`0xFF` never occurs in UTF-8, so an ended part always
/// sorts before a longer one), which is the order [`crate::store::Cursor`] pages in: a page
/// is one `ZREVRANGEBYLEX` from the cursor's member, ties on `created_at` included.
pub fn member(created_at: Millis, id: &RecordId) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + id.scope.len() + id.tenant.len() + id.key.len() + 3);
    out.extend_from_slice(&((created_at as u64) ^ (1 << 63)).to_be_bytes());
    for part in [&id.scope, &id.tenant, &id.key] {
        for &byte in part.as_bytes() {
            out.push(byte);
            if byte == 0 {
                out.push(0xFF);
            }
        }
        out.push(0);
    }
    out
}

/// Reads a [`member`] back; `None` when it is not one.
pub fn parse_member(member: &[u8]) -> Option<(Millis, RecordId)> {
    let (time, mut rest) = member.split_first_chunk::<8>()?;
    let created_at = (u64::from_be_bytes(*time) ^ (1 << 63)) as i64;
    let mut parts = Vec::with_capacity(3);
    for _ in 0..3 {
        let mut part = Vec::new();
        loop {
            let (&byte, tail) = rest.split_first()?;
            rest = tail;
            if byte != 0 {
                part.push(byte);
            } else if rest.first() == Some(&0xFF) {
                part.push(0);
                rest = &rest[1..];
            } else {
                break;
            }
        }
        parts.push(String::from_utf8(part).ok()?);
    }
    if !rest.is_empty() {
        return None;
    }
    let [scope, tenant, key]: [String; 3] = parts.try_into().ok()?;
    Some((created_at, RecordId { scope, tenant, key }))
}

/// The fields of a record's hash, `v` (the version, kept by the scripts) aside. An absent
/// optional value is an absent field.
pub fn fields(record: &Record) -> Vec<(&'static str, Vec<u8>)> {
    let num = |n: i64| n.to_string().into_bytes();
    let mut out = vec![
        ("fp", record.fingerprint.to_hex().into_bytes()),
        ("st", record.status.as_str().as_bytes().to_vec()),
        ("ca", num(record.created_at)),
        ("ls", num(record.last_seen_at)),
        ("ea", num(record.expires_at)),
        ("rc", record.replay_count.to_string().into_bytes()),
        ("ac", record.attempt_count.to_string().into_bytes()),
        ("ix", member(record.created_at, &record.id)),
    ];
    if let Some(lease) = record.lease {
        // Tokens are compared as decimal strings in the scripts: Lua numbers are doubles
        // and would round a 63-bit token.
        out.push(("tok", lease.token.to_string().into_bytes()));
        out.push(("lu", num(lease.locked_until)));
    }
    if let Some(response) = &record.response {
        out.push(("rs", response.status.to_string().into_bytes()));
        // String pairs always serialize.
        out.push(("rh", serde_json::to_vec(&response.headers).unwrap_or_default()));
        out.push(("rb", response.body.to_vec()));
        out.push(("rr", if response.retained { b"1".to_vec() } else { b"0".to_vec() }));
    }
    if let Some(correlation_id) = &record.correlation_id {
        out.push(("cid", correlation_id.as_bytes().to_vec()));
    }
    if let Some(error) = &record.error_summary {
        out.push(("err", error.as_bytes().to_vec()));
    }
    out
}

/// The fields [`Outcome::apply`] may change; `finish` rewrites exactly these under the
/// fence. A unit test checks that `apply` touches nothing else.
pub const FINISH_FIELDS: [&str; 9] = ["st", "tok", "lu", "ls", "rs", "rh", "rb", "rr", "err"];

/// The fields of the stored answer, among [`FINISH_FIELDS`].
const RESPONSE_FIELDS: [&str; 4] = ["rs", "rh", "rb", "rr"];

/// What `finish` writes: the values [`Outcome::apply`] gives [`FINISH_FIELDS`] (computed by
/// applying it, so the rule lives only in the core), split into fields to remove and
/// field/value pairs to set.
pub fn finish_fields(outcome: Outcome, now: Millis) -> (Vec<&'static str>, Vec<(&'static str, Vec<u8>)>) {
    // A failed attempt keeps the previous answer (`Outcome::replaces_response`): its
    // response fields are neither set nor removed.
    let touched: Vec<&'static str> = if outcome.replaces_response() {
        FINISH_FIELDS.to_vec()
    } else {
        FINISH_FIELDS.into_iter().filter(|name| !RESPONSE_FIELDS.contains(name)).collect()
    };
    let scratch = outcome.applied_to_blank(RecordId::new("", "", ""), now);
    let set: Vec<_> = fields(&scratch).into_iter().filter(|(name, _)| touched.contains(name)).collect();
    let removed = touched.into_iter().filter(|name| !set.iter().any(|(n, _)| n == name)).collect();
    (removed, set)
}

/// A record as read, with the version its next compare-and-set must name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The record.
    pub record: Record,
    /// Bumped by every script that writes the hash.
    pub version: u64,
}

/// Reads back a hash packed by `common.lua`'s `packed` (each field and value as its
/// length in decimal, `:` and its bytes) as the reply HGETALL would have been.
pub fn unpack(id: &RecordId, mut packed: &[u8]) -> Result<Value, Error> {
    let mut items = Vec::new();
    while !packed.is_empty() {
        let item = packed
            .iter()
            .position(|&b| b == b':')
            .and_then(|colon| {
                let length: usize = std::str::from_utf8(&packed[..colon]).ok()?.parse().ok()?;
                let end = (colon + 1).checked_add(length).filter(|&end| end <= packed.len())?;
                Some((&packed[colon + 1..end], end))
            })
            .ok_or_else(|| Error::Corrupt(format!("{id}: a packed record does not parse")))?;
        items.push(Value::BulkString(item.0.to_vec()));
        packed = &packed[item.1..];
    }
    Ok(Value::Array(items))
}

/// Reads a hash (a flat field/value array, as `HGETALL` and the scripts return it, or a
/// RESP3 map) back into a record; `None` for an empty hash (no such key).
pub fn parse(id: &RecordId, value: Value) -> Result<Option<Stored>, Error> {
    let corrupt = |what: &str| Error::Corrupt(format!("{id}: {what}"));
    let pairs: Vec<(Value, Value)> = match value {
        Value::Nil => Vec::new(),
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(corrupt("odd number of hash items"));
            }
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        Value::Map(pairs) => pairs,
        other => return Err(corrupt(&format!("unexpected reply {other:?}"))),
    };
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut hash: HashMap<String, Vec<u8>> = HashMap::with_capacity(pairs.len());
    for pair in pairs {
        match pair {
            (Value::BulkString(name), Value::BulkString(value)) => {
                hash.insert(String::from_utf8_lossy(&name).into_owned(), value);
            }
            _ => return Err(corrupt("a hash field is not a string")),
        }
    }
    Ok(Some(read_hash(id, hash).map_err(|what| corrupt(&what))?))
}

fn read_hash(id: &RecordId, mut hash: HashMap<String, Vec<u8>>) -> Result<Stored, String> {
    let mut text = |name: &str| -> Result<Option<String>, String> {
        hash.remove(name).map(|v| String::from_utf8(v).map_err(|_| format!("field {name} is not UTF-8"))).transpose()
    };
    fn required<T>(value: Option<T>, name: &str) -> Result<T, String> {
        value.ok_or_else(|| format!("field {name} is missing"))
    }
    fn number<T: std::str::FromStr>(value: Option<String>, name: &str) -> Result<Option<T>, String> {
        value.map(|v| v.parse().map_err(|_| format!("field {name} is not a number: {v:?}"))).transpose()
    }
    let version = required(number::<u64>(text("v")?, "v")?, "v")?;
    let fingerprint = required(text("fp")?, "fp")?;
    let fingerprint = Fingerprint::from_hex(&fingerprint).ok_or("bad fingerprint")?;
    let status = required(text("st")?, "st")?;
    let status = Status::parse(&status).ok_or_else(|| format!("bad status {status:?}"))?;
    let token = number::<u64>(text("tok")?, "tok")?;
    let locked_until = number::<i64>(text("lu")?, "lu")?;
    let resp_status = number::<u16>(text("rs")?, "rs")?;
    let headers = text("rh")?;
    let retained = text("rr")?;
    let created_at = required(number(text("ca")?, "ca")?, "ca")?;
    let last_seen_at = required(number(text("ls")?, "ls")?, "ls")?;
    let expires_at = required(number(text("ea")?, "ea")?, "ea")?;
    let replay_count = required(number(text("rc")?, "rc")?, "rc")?;
    let attempt_count = required(number(text("ac")?, "ac")?, "ac")?;
    let correlation_id = text("cid")?;
    let error_summary = text("err")?;
    let response = match resp_status {
        None => None,
        Some(status) => Some(StoredResponse {
            status,
            headers: serde_json::from_str(headers.as_deref().unwrap_or("[]")).map_err(|_| "bad response headers")?,
            body: Bytes::from(hash.remove("rb").unwrap_or_default()),
            retained: retained.as_deref() != Some("0"),
        }),
    };
    let record = Record {
        id: id.clone(),
        fingerprint,
        status,
        lease: token.zip(locked_until).map(|(token, locked_until)| Lease { token, locked_until }),
        response,
        created_at,
        last_seen_at,
        expires_at,
        replay_count,
        attempt_count,
        correlation_id,
        error_summary,
    };
    Ok(Stored { record, version })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn full_record() -> Record {
        Record {
            id: RecordId::new("orders", "t\u{0}1", "k\"ey"),
            fingerprint: Fingerprint([7; 32]),
            status: Status::InProgress,
            lease: Some(Lease { token: (1 << 63) - 1, locked_until: 1_700_000_030_000 }),
            response: Some(StoredResponse {
                status: 201,
                headers: vec![("x-a".into(), "caf\u{e9}".into())],
                body: Bytes::from_static(&[0, 255, 10]),
                retained: false,
            }),
            created_at: 1_700_000_000_000,
            last_seen_at: 1_700_000_000_001,
            expires_at: 1_700_003_600_000,
            replay_count: 3,
            attempt_count: 2,
            correlation_id: Some(String::new()),
            error_summary: Some("boom".into()),
        }
    }

    fn as_value(fields: Vec<(&'static str, Vec<u8>)>, version: u64) -> Value {
        let mut items = vec![Value::BulkString(b"v".to_vec()), Value::BulkString(version.to_string().into_bytes())];
        for (name, value) in fields {
            items.push(Value::BulkString(name.as_bytes().to_vec()));
            items.push(Value::BulkString(value));
        }
        Value::Array(items)
    }

    #[test]
    fn a_record_round_trips_through_its_hash() {
        let record = full_record();
        let stored = parse(&record.id, as_value(fields(&record), 4)).unwrap().unwrap();
        assert_eq!(stored, Stored { record: record.clone(), version: 4 });
        let bare = Record { lease: None, response: None, correlation_id: None, error_summary: None, ..record };
        assert_eq!(parse(&bare.id, as_value(fields(&bare), 1)).unwrap().unwrap().record, bare);
        assert_eq!(parse(&bare.id, Value::Array(vec![])).unwrap(), None);
    }

    #[test]
    fn a_packed_hash_unpacks_to_its_hgetall_reply() {
        let record = full_record();
        let reply = as_value(fields(&record), 4);
        let Value::Array(items) = &reply else { unreachable!() };
        // As common.lua's `packed` writes it.
        let mut packed = Vec::new();
        for item in items {
            let Value::BulkString(bytes) = item else { unreachable!() };
            packed.extend_from_slice(format!("{}:", bytes.len()).as_bytes());
            packed.extend_from_slice(bytes);
        }
        assert_eq!(unpack(&record.id, &packed).unwrap(), reply);
        assert_eq!(parse(&record.id, unpack(&record.id, b"").unwrap()).unwrap(), None);
        for broken in [&b"3:ab"[..], b"x:a", b"2ab", b"99999999999999999999999:a"] {
            assert!(matches!(unpack(&record.id, broken), Err(Error::Corrupt(_))), "{broken:?}");
        }
    }

    #[test]
    fn an_unreadable_hash_is_corrupt() {
        let id = RecordId::new("s", "t", "k");
        let no_version =
            Value::Array(vec![Value::BulkString(b"st".to_vec()), Value::BulkString(b"completed".to_vec())]);
        assert!(matches!(parse(&id, no_version), Err(Error::Corrupt(_))));
        let mut fields = fields(&full_record());
        fields.retain(|(name, _)| *name != "ca");
        assert!(matches!(parse(&id, as_value(fields, 1)), Err(Error::Corrupt(m)) if m.contains("ca")));
    }

    /// `finish` rewrites only [`FINISH_FIELDS`]: if `Outcome::apply` ever changes another
    /// field, this fails and the Redis `finish` must learn about it.
    #[test]
    fn finish_fields_cover_everything_apply_changes() {
        let outcomes = [
            Outcome::Completed(StoredResponse { status: 200, headers: vec![], body: Bytes::new(), retained: true }),
            Outcome::Verified {
                response: StoredResponse { status: 200, headers: vec![], body: Bytes::new(), retained: true },
                note: "n".into(),
            },
            Outcome::Retryable { error: "e".into() },
            Outcome::Unknown { error: "e".into() },
            Outcome::NeedsReview { error: "e".into() },
        ];
        for outcome in outcomes {
            let before = full_record();
            let mut after = before.clone();
            outcome.clone().apply(&mut after, before.last_seen_at + 99);
            let old: HashMap<_, _> = fields(&before).into_iter().collect();
            let new: HashMap<_, _> = fields(&after).into_iter().collect();
            for name in old.keys().chain(new.keys()) {
                if old.get(name) != new.get(name) {
                    assert!(FINISH_FIELDS.contains(name), "{outcome:?} changes {name}");
                }
            }
            let keeps_answer = !outcome.replaces_response();
            let (removed, set) = finish_fields(outcome, before.last_seen_at + 99);
            for name in FINISH_FIELDS {
                if keeps_answer && RESPONSE_FIELDS.contains(&name) {
                    // A failed attempt keeps the previous answer: untouched by apply and by finish.
                    assert_eq!(old.get(name), new.get(name), "{name}");
                    assert!(!removed.contains(&name) && !set.iter().any(|(n, _)| *n == name), "{name}");
                    continue;
                }
                assert_eq!(new.get(name), set.iter().find(|(n, _)| *n == name).map(|(_, v)| v), "{name}");
                assert_eq!(removed.contains(&name), !new.contains_key(name), "{name}");
            }
        }
    }

    #[test]
    fn record_keys_are_unambiguous() {
        let keys = Keys::new("idem");
        let a = keys.record(&RecordId::new("a:b", "c", "d"));
        let b = keys.record(&RecordId::new("a", "b:c", "d"));
        assert_ne!(a, b);
        assert_eq!(a, r#"idem:rec:["a:b","c","d"]"#);
    }

    fn arb_part() -> impl Strategy<Value = String> {
        prop_oneof![".{0,4}", "[a\u{0}\u{1}\u{ff}]{0,4}"]
    }

    proptest! {
        #[test]
        fn members_round_trip(created_at in any::<i64>(), scope in arb_part(), tenant in arb_part(), key in arb_part()) {
            let id = RecordId { scope, tenant, key };
            prop_assert_eq!(parse_member(&member(created_at, &id)), Some((created_at, id)));
        }

        /// Byte order of members is the listing order, so Redis sorts the index for us.
        #[test]
        fn member_order_is_listing_order(
            a in (-3i64..3, arb_part(), arb_part(), arb_part()), b in (-3i64..3, arb_part(), arb_part(), arb_part()),
        ) {
            let (ta, ia) = (a.0, RecordId { scope: a.1, tenant: a.2, key: a.3 });
            let (tb, ib) = (b.0, RecordId { scope: b.1, tenant: b.2, key: b.3 });
            prop_assert_eq!(member(ta, &ia).cmp(&member(tb, &ib)), (ta, &ia).cmp(&(tb, &ib)));
        }
    }
}
