//! Idempotency keys and tenants (SPEC §3): validation, normalisation, derivation.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Why a key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No characters.
    #[error("the key is empty")]
    Empty,
    /// Over [`MAX_KEY_LEN`].
    #[error("the key is {0} characters long; at most 255 are allowed")]
    TooLong(usize),
    /// A space, a control character or a byte outside ASCII.
    #[error("the key may contain only visible ASCII characters")]
    NotVisibleAscii,
}

/// How a route normalises keys before use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Keys are used as sent.
    #[default]
    None,
    /// Keys are lower-cased, for destinations whose ids ignore case.
    Lowercase,
}

/// Validates a raw key: 1–255 visible ASCII characters (`!` to `~`).
pub fn validate(raw: &[u8]) -> Result<&str, KeyError> {
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    if raw.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(raw.len()));
    }
    if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::NotVisibleAscii);
    }
    // Only ASCII was accepted, so this cannot fail.
    std::str::from_utf8(raw).map_err(|_| KeyError::NotVisibleAscii)
}

/// Validates and normalises a key.
pub fn accept(raw: &[u8], normalize: Normalize) -> Result<String, KeyError> {
    let key = validate(raw)?;
    Ok(match normalize {
        Normalize::None => key.to_owned(),
        Normalize::Lowercase => key.to_ascii_lowercase(),
    })
}

/// Derives a key from JSON pointers into a body (a natural business key or a webhook's
/// event id). Strings count as their text, other values as their JSON; several pointers
/// are joined with `|`. `None` when the body is not JSON or a pointer names nothing.
pub fn from_body(body: &[u8], pointers: &[String]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let parts: Option<Vec<String>> = pointers
        .iter()
        .map(|p| match value.pointer(p)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        })
        .collect();
    Some(parts?.join("|"))
}

/// The tenant of a request without a tenant header: a hash of its credential, so the
/// credential itself is never stored. Requests without a credential share tenant `""`.
pub fn tenant_from_credential(credential: Option<&[u8]>) -> String {
    match credential {
        Some(secret) if !secret.is_empty() => {
            let digest = Sha256::digest(secret);
            format!("h:{}", hex::encode(&digest[..16]))
        }
        _ => String::new(),
    }
}

/// A short, stable, non-reversible name for a key, for logs (keys may be personal data).
pub fn hash_for_logs(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert_eq!(validate(b"order-1"), Ok("order-1"));
        assert_eq!(validate(b""), Err(KeyError::Empty));
        assert_eq!(validate(&[b'a'; 256]), Err(KeyError::TooLong(256)));
        assert!(validate(&[b'a'; 255]).is_ok());
        assert_eq!(validate(b"has space"), Err(KeyError::NotVisibleAscii));
        assert_eq!(validate("é".as_bytes()), Err(KeyError::NotVisibleAscii));
        assert_eq!(validate(b"a\r\nb"), Err(KeyError::NotVisibleAscii));
    }

    #[test]
    fn lowercase_normalisation() {
        assert_eq!(accept(b"ABC-1", Normalize::Lowercase).unwrap(), "abc-1");
        assert_eq!(accept(b"ABC-1", Normalize::None).unwrap(), "ABC-1");
    }

    #[test]
    fn body_keys() {
        let body = br#"{"order_id":42,"event":{"id":"evt_1"},"none":null}"#;
        assert_eq!(from_body(body, &["/order_id".into()]).as_deref(), Some("42"));
        assert_eq!(from_body(body, &["/event/id".into(), "/order_id".into()]).as_deref(), Some("evt_1|42"));
        assert_eq!(from_body(body, &["/missing".into()]), None);
        assert_eq!(from_body(body, &["/none".into()]), None);
        assert_eq!(from_body(b"not json", &["/a".into()]), None);
    }

    #[test]
    fn tenants_hash_credentials() {
        let a = tenant_from_credential(Some(b"Bearer sk_live_1"));
        assert!(a.starts_with("h:") && a.len() == 34);
        assert!(!a.contains("sk_live"));
        assert_ne!(a, tenant_from_credential(Some(b"Bearer sk_live_2")));
        assert_eq!(tenant_from_credential(None), "");
    }
}
