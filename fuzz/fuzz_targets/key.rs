//! Keys and tenants (`core::key`): validation, normalisation, keys from body pointers and
//! the tenant hash of a credential.
//!
//! Input, line by line: the raw key, the credential (`-` for none), the body pointers
//! separated by spaces, then the JSON body. The whole input is also validated as a key.

#![no_main]

use idem::core::key::{self, KeyError, MAX_KEY_LEN, Normalize};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(4, |b| *b == b'\n');
    let raw = lines.next().unwrap_or_default();
    let credential = lines.next().filter(|c| *c != b"-");
    let pointers: Vec<String> = String::from_utf8_lossy(lines.next().unwrap_or_default())
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let body = lines.next().unwrap_or_default();
    check_validate(data);
    check_validate(raw);
    check_from_header(raw);
    check_tenant(credential);
    check_from_body(body, &pointers);
});

/// A key is accepted exactly when it is 1–255 visible ASCII bytes, and comes back as sent.
fn check_validate(raw: &[u8]) {
    let visible = raw.iter().all(|b| (0x21..=0x7e).contains(b));
    match key::validate(raw) {
        Ok(text) => {
            assert_eq!(text.as_bytes(), raw, "a valid key comes back unchanged");
            assert!(!raw.is_empty() && raw.len() <= MAX_KEY_LEN && visible);
            assert_eq!(key::accept(raw, Normalize::None).as_deref(), Ok(text));
            let lower = key::accept(raw, Normalize::Lowercase).expect("a valid key normalises");
            assert_eq!(lower, text.to_ascii_lowercase());
            assert_eq!(key::validate(lower.as_bytes()), Ok(lower.as_str()), "a normalised key is still valid");
            assert_eq!(key::accept(lower.as_bytes(), Normalize::Lowercase).as_deref(), Ok(lower.as_str()));
        }
        Err(KeyError::Empty) => assert!(raw.is_empty()),
        Err(KeyError::TooLong(n)) => assert!(n == raw.len() && n > MAX_KEY_LEN),
        Err(KeyError::NotVisibleAscii) => assert!(!raw.is_empty() && raw.len() <= MAX_KEY_LEN && !visible),
        Err(KeyError::NotSfString) => panic!("validate never reads a Structured Field"),
    }
    assert_eq!(key::accept(raw, Normalize::Lowercase).is_ok(), key::validate(raw).is_ok());
    let hash = key::hash_for_logs(&String::from_utf8_lossy(raw));
    assert!(hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
}

/// A header value is the key itself unless it starts with `"`; then it is an sf-string, and
/// quoting the key it names again gives the value back byte for byte.
fn check_from_header(raw: &[u8]) {
    match key::from_header(raw) {
        Ok(named) if !raw.starts_with(b"\"") => assert_eq!(named.as_ref(), raw),
        Ok(named) => {
            let mut quoted = vec![b'"'];
            for &byte in named.iter() {
                if byte == b'"' || byte == b'\\' {
                    quoted.push(b'\\');
                }
                quoted.push(byte);
            }
            quoted.push(b'"');
            assert_eq!(quoted, raw, "an sf-string round-trips");
        }
        Err(error) => {
            assert_eq!(error, KeyError::NotSfString);
            assert!(raw.starts_with(b"\""), "only a quoted value can be a bad sf-string");
        }
    }
}

/// A body key is the pointed-at values joined by `|`: a string as its text, anything else as
/// its JSON; nothing when the body is not JSON or a pointer names nothing (or `null`).
fn check_from_body(body: &[u8], pointers: &[String]) {
    let derived = key::from_body(body, pointers);
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        assert_eq!(derived, None, "a body that is not JSON gives no key");
        return;
    };
    let expected: Option<Vec<String>> = pointers
        .iter()
        .map(|p| match value.pointer(p)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .collect();
    assert_eq!(derived, expected.map(|parts| parts.join("|")));
    // The same value sent with other whitespace and key order gives the same key.
    let pretty = serde_json::to_vec_pretty(&value).expect("a parsed value serialises");
    assert_eq!(key::from_body(&pretty, pointers), derived);
}

/// A credential becomes `h:` and 32 hex digits; no credential (or an empty one) is tenant `""`.
fn check_tenant(credential: Option<&[u8]>) {
    let tenant = key::tenant_from_credential(credential);
    match credential {
        Some(secret) if !secret.is_empty() => {
            assert_eq!(tenant.len(), 34);
            assert!(tenant.starts_with("h:") && tenant[2..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            assert!(key::validate(tenant.as_bytes()).is_ok(), "a tenant is a valid key-like string");
            assert_eq!(tenant, key::tenant_from_credential(Some(secret)), "deterministic");
        }
        _ => assert_eq!(tenant, ""),
    }
}
