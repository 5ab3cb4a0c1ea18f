//! The canonical request fingerprint of SPEC §3.
//!
//! SHA-256 over the method, the path, the sorted query, an allowlist of headers and the
//! body in canonical form: JSON as RFC 8785 (JCS) after `exclude`/`include` pointers,
//! form data as sorted pairs, anything else as raw bytes. Every part is length-prefixed,
//! so no two different requests frame to the same bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A SHA-256 fingerprint, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `bytes`: the fingerprint of whatever canonical description of an
    /// action the caller chooses (`Idem::run_once`).
    pub fn of(bytes: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(bytes.as_ref()).into())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..12])
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Fingerprint::from_hex(&s).ok_or_else(|| serde::de::Error::custom("a fingerprint is 64 hex characters"))
    }
}

/// What goes into a fingerprint, per route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FingerprintSpec {
    /// Lowercase header names whose values are part of the request's identity.
    pub headers: Vec<String>,
    /// When non-empty, only these JSON pointers of a JSON body count.
    pub include: Vec<String>,
    /// JSON pointers removed from a JSON body before hashing (noisy fields).
    pub exclude: Vec<String>,
}

impl Default for FingerprintSpec {
    fn default() -> Self {
        Self { headers: vec!["content-type".into()], include: vec![], exclude: vec![] }
    }
}

/// The parts of a request a fingerprint reads.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// Upper-case method.
    pub method: &'a str,
    /// The path, as received.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The body's media type, when the request declared one.
    pub content_type: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

/// How a body was canonicalised: part of the hash, so a JSON body and the same bytes
/// sent as text never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyForm {
    /// RFC 8785 canonical JSON.
    Json,
    /// Sorted, decoded form pairs.
    Form,
    /// The bytes as sent.
    Raw,
}

/// Computes the fingerprint. `headers` yields `(lowercase name, value)` for the
/// request's headers; only those on the spec's allowlist are read, in allowlist order.
pub fn fingerprint<'h>(
    spec: &FingerprintSpec,
    request: RequestView<'_>,
    headers: impl Fn(&str) -> Vec<&'h [u8]>,
) -> (Fingerprint, BodyForm) {
    let mut hash = Framed(Sha256::new());
    hash.part(b"idem-fingerprint-v1");
    hash.part(request.method.as_bytes());
    hash.part(request.path.as_bytes());
    let mut query: Vec<&str> = request.query.unwrap_or("").split('&').filter(|p| !p.is_empty()).collect();
    query.sort_unstable();
    hash.count(query.len());
    for pair in query {
        hash.part(pair.as_bytes());
    }
    hash.count(spec.headers.len());
    for name in &spec.headers {
        let values = headers(name);
        hash.part(name.as_bytes());
        hash.count(values.len());
        for value in values {
            hash.part(value);
        }
    }
    let form = canonical_body(spec, request.content_type, request.body, &mut hash);
    (Fingerprint(hash.0.finalize().into()), form)
}

/// Feeds the canonical body into the hash and says which form it took.
fn canonical_body(spec: &FingerprintSpec, content_type: Option<&str>, body: &[u8], hash: &mut Framed) -> BodyForm {
    let media = content_type.map(|ct| ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let media = media.as_deref().unwrap_or("");
    if media == "application/json" || media.ends_with("+json") {
        if let Some(canonical) = canonical_json(spec, body) {
            hash.part(b"json");
            hash.part(&canonical);
            return BodyForm::Json;
        }
    } else if media == "application/x-www-form-urlencoded" {
        let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
        pairs.sort_unstable();
        hash.part(b"form");
        hash.count(pairs.len());
        for (name, value) in pairs {
            hash.part(name.as_bytes());
            hash.part(value.as_bytes());
        }
        return BodyForm::Form;
    }
    hash.part(b"raw");
    hash.part(body);
    BodyForm::Raw
}

/// RFC 8785 bytes of a JSON body after `include`/`exclude`, or `None` when the body does
/// not parse (it is then fingerprinted as bytes). serde_json refuses nesting deeper than
/// 128 levels, so hostile input cannot exhaust the stack.
pub fn canonical_json(spec: &FingerprintSpec, body: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    for pointer in &spec.exclude {
        remove_pointer(&mut value, pointer);
    }
    if !spec.include.is_empty() {
        let kept: serde_json::Map<String, Value> =
            spec.include.iter().filter_map(|p| value.pointer(p).map(|v| (p.clone(), v.clone()))).collect();
        value = Value::Object(kept);
    }
    serde_jcs::to_vec(&value).ok()
}

/// Removes what a JSON pointer names. An array element is replaced by `null` rather than
/// removed, so the indices of its siblings keep their meaning.
fn remove_pointer(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.remove(&last);
        }
        Some(Value::Array(items)) => {
            if let Some(item) = array_index(&last).and_then(|i| items.get_mut(i)) {
                *item = Value::Null;
            }
        }
        _ => {}
    }
}

/// An array index as RFC 6901 writes it: `0`, or digits without a leading zero (never
/// `+1` nor `01`, which `usize::from_str` would take), as `Value::pointer` reads it.
fn array_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// A hasher that length-prefixes every part.
struct Framed(Sha256);

impl Framed {
    fn part(&mut self, bytes: &[u8]) {
        self.count(bytes.len());
        self.0.update(bytes);
    }

    fn count(&mut self, n: usize) {
        self.0.update((n as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(spec: &FingerprintSpec, ct: Option<&str>, body: &[u8]) -> (Fingerprint, BodyForm) {
        let view = RequestView { method: "POST", path: "/v1/orders", query: None, content_type: ct, body };
        fingerprint(spec, view, |name| {
            if name == "content-type" { ct.map(|c| vec![c.as_bytes()]).unwrap_or_default() } else { vec![] }
        })
    }

    #[test]
    fn json_key_order_and_whitespace_do_not_matter() {
        let spec = FingerprintSpec::default();
        let a = fp(&spec, Some("application/json"), br#"{"b":1,"a":[1,2,{"y":true,"x":null}]}"#);
        let b = fp(&spec, Some("application/json"), b"{ \"a\": [1, 2, {\"x\": null, \"y\": true}],\n \"b\": 1.0 }");
        assert_eq!(a, b);
        assert_eq!(a.1, BodyForm::Json);
    }

    #[test]
    fn jcs_output_matches_rfc_8785() {
        let spec = FingerprintSpec::default();
        let out = canonical_json(&spec, br#"{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"string":"\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/","literals":[null,true,false]}"#).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn exclusions_name_array_elements_as_json_pointers_do() {
        // Fuzz findings: "/items/+1" and "/items/01" are not indices (RFC 6901), so they
        // exclude nothing, as `Value::pointer` finds nothing there.
        for pointer in ["/items/+1", "/items/01"] {
            let spec = FingerprintSpec { exclude: vec![pointer.into()], ..Default::default() };
            let a = fp(&spec, Some("application/json"), br#"{"items":[1,2]}"#);
            let b = fp(&spec, Some("application/json"), br#"{"items":[1,3]}"#);
            assert_ne!(a, b, "{pointer} excluded an element");
        }
        let spec = FingerprintSpec { exclude: vec!["/items/1".into()], ..Default::default() };
        let a = fp(&spec, Some("application/json"), br#"{"items":[1,2]}"#);
        assert_eq!(a, fp(&spec, Some("application/json"), br#"{"items":[1,3]}"#));
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("10"), Some(10));
        assert_eq!(array_index(""), None);
    }

    #[test]
    fn excluded_fields_do_not_break_retries() {
        let spec =
            FingerprintSpec { exclude: vec!["/client_sent_at".into(), "/items/0/ts".into()], ..Default::default() };
        let a =
            fp(&spec, Some("application/json"), br#"{"order":1,"client_sent_at":"10:00","items":[{"ts":1,"q":2}]}"#);
        let b =
            fp(&spec, Some("application/json"), br#"{"order":1,"client_sent_at":"10:05","items":[{"ts":9,"q":2}]}"#);
        let c =
            fp(&spec, Some("application/json"), br#"{"order":2,"client_sent_at":"10:05","items":[{"ts":9,"q":2}]}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn include_keeps_only_named_fields() {
        let spec = FingerprintSpec { include: vec!["/order_id".into()], ..Default::default() };
        let a = fp(&spec, Some("application/json"), br#"{"order_id":7,"note":"a"}"#);
        let b = fp(&spec, Some("application/json"), br#"{"order_id":7,"note":"b"}"#);
        assert_eq!(a, b);
    }

    #[test]
    fn form_pairs_are_sorted_and_decoded() {
        let spec = FingerprintSpec::default();
        let ct = Some("application/x-www-form-urlencoded");
        assert_eq!(fp(&spec, ct, b"b=2&a=hello+world"), fp(&spec, ct, b"a=hello%20world&b=2"));
        assert_ne!(fp(&spec, ct, b"a=1&b=2"), fp(&spec, ct, b"a=1&b=3"));
    }

    #[test]
    fn broken_json_is_hashed_as_bytes() {
        let spec = FingerprintSpec::default();
        let (_, form) = fp(&spec, Some("application/json"), b"{\"a\":");
        assert_eq!(form, BodyForm::Raw);
        let deep = "[".repeat(100_000);
        let (_, form) = fp(&spec, Some("application/json"), deep.as_bytes());
        assert_eq!(form, BodyForm::Raw);
    }

    #[test]
    fn method_path_query_and_headers_count() {
        let spec = FingerprintSpec::default();
        let base = RequestView { method: "POST", path: "/a", query: Some("x=1&y=2"), content_type: None, body: b"" };
        let none = |_: &str| Vec::<&[u8]>::new();
        let one = fingerprint(&spec, base, none).0;
        assert_eq!(one, fingerprint(&spec, RequestView { query: Some("y=2&x=1"), ..base }, none).0);
        assert_ne!(one, fingerprint(&spec, RequestView { method: "PATCH", ..base }, none).0);
        assert_ne!(one, fingerprint(&spec, RequestView { path: "/b", ..base }, none).0);
        let typed = fingerprint(&spec, base, |_| vec![b"text/plain".as_slice()]).0;
        assert_ne!(one, typed);
    }
}
