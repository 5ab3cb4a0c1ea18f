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
    /// A value that starts with `"` but is not one Structured Field string.
    #[error(
        "a quoted key must be one Structured Field string (RFC 8941): printable ASCII between double quotes, \
         with \\ escaping only \" and \\, and nothing after the closing quote"
    )]
    NotSfString,
}

/// The key an idempotency-key header names. The IETF draft defines the header as a
/// Structured Field string (`"abc"`), Stripe-style clients send the key bare (`abc`): both
/// name the key `abc`. A value that starts with a double quote must be a valid sf-string
/// (RFC 8941 §3.3.3), so a typo never silently becomes part of a key; parameters after it
/// (`"abc";x=1`) are refused too, since no key is defined to carry any.
pub fn from_header(value: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, KeyError> {
    let Some(quoted) = value.strip_prefix(b"\"") else { return Ok(value.into()) };
    let mut key = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'"' if bytes.as_slice().is_empty() => return Ok(key.into()),
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                _ => return Err(KeyError::NotSfString),
            },
            0x20..=0x7e if byte != b'"' => key.push(byte),
            _ => return Err(KeyError::NotSfString),
        }
    }
    Err(KeyError::NotSfString)
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
    fn a_structured_field_string_and_a_bare_token_name_the_same_key() {
        assert_eq!(from_header(b"abc").unwrap().as_ref(), b"abc");
        assert_eq!(from_header(b"\"abc\"").unwrap().as_ref(), b"abc");
        assert_eq!(from_header(br#""a\"b\\c""#).unwrap().as_ref(), br#"a"b\c"#);
        // Unescaped it may hold a space, which the key rules then refuse as they would bare.
        assert_eq!(from_header(b"\"a b\"").unwrap().as_ref(), b"a b");
        for bad in [&b"\""[..], b"\"abc", b"\"a\"b\"", b"\"abc\";x=1", b"\"a\\x\"", b"\"a\tb\"", "\"é\"".as_bytes()] {
            assert_eq!(from_header(bad), Err(KeyError::NotSfString), "{:?}", String::from_utf8_lossy(bad));
        }
    }

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
