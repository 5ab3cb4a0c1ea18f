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
    let mut out = Vec::with_capacity(body.len());
    if write_plain_jcs(&value, &mut out).is_some() {
        return Some(out);
    }
    serde_jcs::to_vec(&value).ok()
}

/// Writes RFC 8785 bytes of `value` when it holds only what most bodies hold: the bytes
/// `serde_jcs` makes, at a fraction of its cost (it writes every key, parses it back and
/// sorts on its UTF-16 form, through a boxed writer per fragment). `None`, with `out`
/// half-written, when `value` holds something else, for `serde_jcs` to write:
/// - a number that is not an integer of at most 2^53 in magnitude (JCS prints numbers as
///   ECMAScript prints doubles; such an integer is exact, and printed as its digits);
/// - an object key with a character at or above U+E000 (below it, sorting keys by UTF-16
///   code units, as JCS does, and by UTF-8 bytes give the same order).
///
/// Strings are escaped by serde_json as JCS escapes them (`"`, `\`, and the control
/// characters as `\b \t \n \f \r` or `\u00xx`). `tests::plain_jcs_is_serde_jcs` holds the
/// two to the same bytes on arbitrary values.
fn write_plain_jcs(value: &Value, out: &mut Vec<u8>) -> Option<()> {
    const EXACT: u64 = 1 << 53;
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) if i.unsigned_abs() <= EXACT => out.extend_from_slice(i.to_string().as_bytes()),
            (_, Some(u)) if u <= EXACT => out.extend_from_slice(u.to_string().as_bytes()),
            _ => return None,
        },
        Value::String(s) => serde_json::to_writer(&mut *out, s).ok()?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_plain_jcs(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // The UTF-8 of U+E000 and above starts with 0xEE or higher.
            if entries.iter().any(|(key, _)| key.bytes().any(|b| b >= 0xEE)) {
                return None;
            }
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).ok()?;
                out.push(b':');
                write_plain_jcs(item, out)?;
            }
            out.push(b'}');
        }
    }
    Some(())
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
    use proptest::prelude::*;

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

    /// Any JSON value, with numbers and keys that take `write_plain_jcs`'s way and those
    /// that do not (floats, large integers, keys beyond U+E000).
    fn any_json() -> impl Strategy<Value = Value> {
        let number = prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-(1i64 << 53)..=(1i64 << 53)).prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ];
        let text = prop_oneof![
            "[a-z]{0,3}",
            "\\PC{0,3}",
            "[\u{0}-\u{1f}\"\\\\/\u{7f}]{0,3}",
            "[\u{e000}-\u{ffff}\u{10000}-\u{10ffff}a]{1,2}"
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number,
            text.clone().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((text.clone(), inner), 0..5)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn plain_jcs_is_serde_jcs(value in any_json()) {
            let mut out = Vec::new();
            if write_plain_jcs(&value, &mut out).is_some() {
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_jcs::to_string(&value).unwrap());
            }
        }
    }

    #[test]
    fn plain_jcs_takes_common_bodies_and_leaves_the_rest_to_serde_jcs() {
        let plain = |json: &str| write_plain_jcs(&serde_json::from_str(json).unwrap(), &mut Vec::new()).is_some();
        assert!(plain(r#"{"amount":4200,"currency":"EUR","items":[{"sku":"a","n":-2}],"note":null,"ok":true}"#));
        assert!(plain(r#"{"big":9007199254740992,"\u00e9t\u00e9":"\u20ac\n"}"#));
        assert!(!plain(r#"{"amount":42.5}"#));
        assert!(!plain(r#"{"big":9007199254740993}"#));
        assert!(!plain(r#"{"\ue000":1}"#));
        assert!(!plain(r#"{"\ud83d\ude00":1}"#));
        // By UTF-8 bytes U+FF61 sorts before U+1F600; by UTF-16 code units (JCS), after it.
        let out = canonical_json(&FingerprintSpec::default(), r#"{"\ud83d\ude00":1,"\uff61":2}"#.as_bytes());
        assert_eq!(String::from_utf8(out.unwrap()).unwrap(), "{\"\u{1f600}\":1,\"\u{ff61}\":2}");
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
