//! Encryption at rest of stored answers (SPEC §7): a store decorator that seals each
//! record's response headers and body with AES-256-GCM before they reach the backend, and
//! opens them on the way back. Keys, fingerprints, statuses and times stay in the clear
//! (the store needs them to decide); what a destination answered does not.
//!
//! Keys come from the environment: `IDEM_ENCRYPTION_KEY` (32 bytes, base64) seals and
//! opens; `IDEM_ENCRYPTION_OLD_KEYS` (comma-separated, base64) only open, so keys can be
//! rotated: set the new key, move the old one to the old list, and records sealed under
//! it stay readable until they expire. Each sealed answer names its key by a 4-byte id
//! (a hash of the key), and is bound to its record id, so a sealed answer moved to
//! another record does not open. Answers stored before encryption was turned on are read
//! as they are.

use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{Claim, Error, ListQuery, Page, StatRow, Store};
use crate::core::{ClaimPolicy, Intent, LeaseToken, Millis, Outcome, Record, RecordId, Resolution, StoredResponse};

/// The variable holding the current key.
pub const KEY_ENV: &str = "IDEM_ENCRYPTION_KEY";
/// The variable holding retired keys, still used to open.
pub const OLD_KEYS_ENV: &str = "IDEM_ENCRYPTION_OLD_KEYS";

/// Marks a sealed answer: its only header, so a reader without the keys sees it is sealed.
const MARKER: &str = "x-idem-sealed";
/// Versions the sealed format.
const MAGIC: &[u8] = b"idem-aead-1";

/// One key with its id.
struct Key {
    id: [u8; 4],
    cipher: Aes256Gcm,
}

impl Key {
    fn new(secret: &[u8; 32]) -> Self {
        let digest = Sha256::digest(secret);
        Self { id: [digest[0], digest[1], digest[2], digest[3]], cipher: Aes256Gcm::new(secret.into()) }
    }
}

/// The keys: one that seals, any number that still open.
pub struct Keys {
    current: Key,
    old: Vec<Key>,
}

impl Keys {
    /// Keys from raw secrets.
    pub fn new(current: &[u8; 32], old: &[[u8; 32]]) -> Self {
        Self { current: Key::new(current), old: old.iter().map(Key::new).collect() }
    }

    /// Keys from the environment (`var` looks a variable up); `None` when no current key
    /// is set, i.e. encryption is off.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, Error> {
        let Some(current) = var(KEY_ENV).filter(|v| !v.trim().is_empty()) else { return Ok(None) };
        let current = decode_key(KEY_ENV, &current)?;
        let old = var(OLD_KEYS_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| decode_key(OLD_KEYS_ENV, k))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Self::new(&current, &old)))
    }

    /// Seals an answer for the record `id`.
    pub fn seal(&self, id: &RecordId, response: &StoredResponse) -> StoredResponse {
        let headers = serde_json::to_vec(&response.headers).unwrap_or_default();
        let mut plain = Vec::with_capacity(4 + headers.len() + response.body.len());
        plain.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        plain.extend_from_slice(&headers);
        plain.extend_from_slice(&response.body);
        let nonce: [u8; 12] = rand::random();
        let aad = associated_data(id);
        // Encryption with a valid key and nonce cannot fail for inputs below 64 GiB.
        let sealed = self.current.cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: &plain, aad: &aad });
        let mut body = Vec::with_capacity(MAGIC.len() + 16 + plain.len() + 16);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&self.current.id);
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&sealed.unwrap_or_default());
        StoredResponse {
            status: response.status,
            headers: vec![(MARKER.into(), "1".into())],
            body: Bytes::from(body),
            retained: response.retained,
        }
    }

    /// Opens an answer sealed for `id`; answers that were never sealed pass unchanged.
    pub fn open(&self, id: &RecordId, response: StoredResponse) -> Result<StoredResponse, Error> {
        if !is_sealed(&response) {
            return Ok(response);
        }
        let corrupt = |what: &str| Error::Corrupt(format!("{id}: sealed answer {what}"));
        let body = &response.body;
        let header = MAGIC.len() + 4 + 12;
        if body.len() < header || &body[..MAGIC.len()] != MAGIC {
            return Err(corrupt("has an unknown format"));
        }
        let key_id = &body[MAGIC.len()..MAGIC.len() + 4];
        let key = std::iter::once(&self.current).chain(&self.old).find(|k| k.id == key_id).ok_or_else(|| {
            Error::Corrupt(format!(
                "{id}: sealed with key {} which is not configured; add it to {OLD_KEYS_ENV}",
                hex::encode(key_id)
            ))
        })?;
        let nonce = Nonce::from_slice(&body[MAGIC.len() + 4..header]);
        let aad = associated_data(id);
        let plain = key
            .cipher
            .decrypt(nonce, Payload { msg: &body[header..], aad: &aad })
            .map_err(|_| corrupt("does not open (tampered, or sealed for another record)"))?;
        let split = plain.get(..4).map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize);
        let Some(headers_end) = split.map(|n| n + 4).filter(|end| *end <= plain.len()) else {
            return Err(corrupt("is truncated"));
        };
        let headers = serde_json::from_slice(&plain[4..headers_end]).map_err(|_| corrupt("has bad headers"))?;
        Ok(StoredResponse {
            status: response.status,
            headers,
            body: Bytes::copy_from_slice(&plain[headers_end..]),
            retained: response.retained,
        })
    }
}

fn is_sealed(response: &StoredResponse) -> bool {
    matches!(response.headers.as_slice(), [(name, _)] if name == MARKER)
}

fn associated_data(id: &RecordId) -> Vec<u8> {
    let mut aad = MAGIC.to_vec();
    for part in [&id.scope, &id.tenant, &id.key] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

fn decode_key(variable: &str, text: &str) -> Result<[u8; 32], Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| Error::BadKey(format!("{variable} is not base64")))?;
    bytes.try_into().map_err(|_| Error::BadKey(format!("{variable} must be 32 bytes (base64 of 32 random bytes)")))
}

/// A store whose stored answers are sealed.
pub struct EncryptedStore {
    inner: Arc<dyn Store>,
    keys: Arc<Keys>,
}

impl EncryptedStore {
    /// Seals what `inner` stores with `keys`.
    pub fn new(inner: Arc<dyn Store>, keys: Arc<Keys>) -> Self {
        Self { inner, keys }
    }

    /// Opens the response of the record a claim carries.
    fn open_claim(&self, mut claim: Claim) -> Result<Claim, Error> {
        if let Some(record) = claim.record.as_mut() {
            self.open_record(record)?;
        }
        Ok(claim)
    }

    fn open_record(&self, record: &mut Record) -> Result<(), Error> {
        if let Some(response) = record.response.take() {
            record.response = Some(self.keys.open(&record.id, response)?);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EncryptedStore {
    async fn claim(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.open_claim(self.inner.claim(intent, policy).await?)
    }

    async fn claim_new(&self, intent: &Intent, policy: ClaimPolicy) -> Result<Claim, Error> {
        self.open_claim(self.inner.claim_new(intent, policy).await?)
    }

    async fn renew(&self, id: &RecordId, token: LeaseToken, locked_until: Millis) -> Result<bool, Error> {
        self.inner.renew(id, token, locked_until).await
    }

    async fn finish(&self, id: &RecordId, token: LeaseToken, outcome: Outcome, now: Millis) -> Result<bool, Error> {
        let mut outcome = outcome;
        if let Some(response) = outcome.response_mut() {
            *response = self.keys.seal(id, response);
        }
        self.inner.finish(id, token, outcome, now).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        let mut record = self.inner.get(id).await?;
        if let Some(record) = record.as_mut() {
            self.open_record(record)?;
        }
        Ok(record)
    }

    async fn get_many(&self, ids: &[RecordId]) -> Result<Vec<Option<Record>>, Error> {
        let mut records = self.inner.get_many(ids).await?;
        for record in records.iter_mut().flatten() {
            self.open_record(record)?;
        }
        Ok(records)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, Error> {
        let mut page = self.inner.list(query).await?;
        for record in &mut page.records {
            self.open_record(record)?;
        }
        Ok(page)
    }

    async fn delete(&self, id: &RecordId) -> Result<bool, Error> {
        self.inner.delete(id).await
    }

    async fn resolve(&self, id: &RecordId, resolution: Resolution, now: Millis) -> Result<Record, Error> {
        let resolution = match resolution {
            Resolution::Complete(response) => Resolution::Complete(self.keys.seal(id, &response)),
            other => other,
        };
        let mut record = self.inner.resolve(id, resolution, now).await?;
        self.open_record(&mut record)?;
        Ok(record)
    }

    async fn purge_expired(&self, now: Millis, limit: usize) -> Result<u64, Error> {
        self.inner.purge_expired(now, limit).await
    }

    async fn stats(&self) -> Result<Vec<StatRow>, Error> {
        self.inner.stats().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{\"card\":\"4242\"}"),
            retained: true,
        }
    }

    #[test]
    fn sealed_answers_open_only_for_their_record() {
        let keys = Keys::new(&[7; 32], &[]);
        let id = RecordId::new("orders", "t", "k1");
        let sealed = keys.seal(&id, &answer());
        assert!(!sealed.body.windows(4).any(|w| w == b"4242"), "no plaintext in the sealed body");
        assert_eq!(sealed.headers, vec![(MARKER.to_owned(), "1".to_owned())]);
        assert_eq!(keys.open(&id, sealed.clone()).unwrap(), answer());
        let other = RecordId::new("orders", "t", "k2");
        assert!(matches!(keys.open(&other, sealed.clone()), Err(Error::Corrupt(_))));
        let mut tampered = sealed.body.to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        let tampered = StoredResponse { body: Bytes::from(tampered), ..sealed };
        assert!(matches!(keys.open(&id, tampered), Err(Error::Corrupt(_))));
    }

    #[test]
    fn rotated_keys_still_open_old_answers() {
        let id = RecordId::new("orders", "", "k");
        let sealed = Keys::new(&[1; 32], &[]).seal(&id, &answer());
        assert_eq!(Keys::new(&[2; 32], &[[1; 32]]).open(&id, sealed.clone()).unwrap(), answer());
        let err = Keys::new(&[2; 32], &[]).open(&id, sealed).unwrap_err();
        assert!(err.to_string().contains(OLD_KEYS_ENV), "{err}");
    }

    #[test]
    fn plain_answers_pass_through() {
        let keys = Keys::new(&[7; 32], &[]);
        assert_eq!(keys.open(&RecordId::new("s", "", "k"), answer()).unwrap(), answer());
    }

    #[test]
    fn keys_come_from_the_environment() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert!(Keys::from_env(|_| None).unwrap().is_none());
        let env = |name: &str| (name == KEY_ENV).then(|| b64.clone());
        assert!(Keys::from_env(env).unwrap().is_some());
        let short = |name: &str| (name == KEY_ENV).then(|| "c2hvcnQ=".to_owned());
        assert!(matches!(Keys::from_env(short), Err(Error::BadKey(_))));
    }

    crate::conformance_tests!({
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        std::mem::forget(dir);
        let options = crate::store::sqlite::Options { path, synchronous: crate::store::sqlite::Synchronous::Normal };
        let inner = crate::store::sqlite::SqliteStore::open(options).await.unwrap();
        EncryptedStore::new(Arc::new(inner), Arc::new(Keys::new(&[3; 32], &[])))
    });
}
