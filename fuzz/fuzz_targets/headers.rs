//! The gateway's header handling outside a live exchange: hop-by-hop removal
//! (`layer::answer::strip_hop_by_hop`), the request rewrite for the upstream
//! (`Upstream::target`, `Upstream::prepare`), and stored answers' headers — kept as one
//! `char` per byte (`core::record::StoredResponse`), written as JSON by the stores, sealed
//! and opened by `store::encrypted::Keys`, which must refuse any forged or moved answer.
//!
//! Input: a message in the format of `idem_fuzz::Message`: the first line is the request
//! target, the headers are the request's (and the answer's), the body the answer's.
//! `x-fuzz-upstream` sets the upstream base URL.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use idem::core::{RecordId, StoredResponse};
use idem::layer::body::full;
use idem::gateway::upstream::{Upstream, strip_hop_by_hop};
use idem::store::encrypted::Keys;
use idem_fuzz::Message;
use libfuzzer_sys::fuzz_target;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

fuzz_target!(|data: &[u8]| {
    let message = Message::parse(data);
    let mut headers = HeaderMap::new();
    for (name, value) in &message.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    check_strip(&headers);
    check_prepare(&message, &headers);
    check_stored(&headers, message.body);
});

/// Hop-by-hop headers go, and so do those `Connection` names; every other header stays,
/// its values in order.
fn check_strip(headers: &HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped);
    for name in headers.keys() {
        let goes = HOP_BY_HOP.contains(&name.as_str()) || named.iter().any(|n| n == name.as_str());
        if goes {
            assert!(!stripped.contains_key(name), "{name} survived");
        } else {
            let before: Vec<_> = headers.get_all(name).iter().collect();
            let after: Vec<_> = stripped.get_all(name).iter().collect();
            assert_eq!(before, after, "{name} changed");
        }
    }
    assert!(stripped.keys().all(|name| headers.contains_key(name)), "nothing is added");
}

/// The upstream gets the request under its base path, its own `Host`, the forwarding
/// headers, and no hop-by-hop header.
fn check_prepare(message: &Message<'_>, headers: &HeaderMap) {
    let base = message.text("x-fuzz-upstream").unwrap_or_else(|| "http://127.0.0.1:9000".into());
    let Ok(base) = base.parse::<Uri>() else { return };
    if base.scheme_str() != Some("http") || base.authority().is_none() {
        return; // config validation refuses any other upstream
    }
    let Ok(uri) = Uri::try_from(message.start) else { return };
    let upstream = upstream(&base);
    let target = upstream.target(&uri);
    let prefix = base.path().trim_end_matches('/');
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(joined) = format!("{prefix}{path_and_query}").parse::<http::uri::PathAndQuery>() {
        assert_eq!(target.path_and_query(), Some(&joined), "{uri} under {base}");
        assert_eq!((target.scheme(), target.authority()), (base.scheme(), base.authority()));
    }

    let mut request = Request::new(full(Bytes::new()));
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 5555);
    upstream.prepare(&mut request, Some(peer), &HeaderValue::from_static("http"));
    let sent = request.headers();
    for name in HOP_BY_HOP {
        assert!(!sent.contains_key(name), "{name} was forwarded");
    }
    // The upstream's host travels in the URI (Host over HTTP/1.1, :authority over HTTP/2).
    assert!(!sent.contains_key(header::HOST), "the client's Host was forwarded");
    assert_eq!(request.uri().authority(), base.authority());
    assert_eq!(sent.get("x-forwarded-proto").map(|h| h.as_bytes()), Some(&b"http"[..]));
    let original_host = headers
        .get(header::HOST)
        .map(|h| h.as_bytes().to_vec())
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes().to_vec()));
    if let Some(host) = original_host {
        assert_eq!(sent.get("x-forwarded-host").map(|h| h.as_bytes().to_vec()), Some(host));
    }
    let forwarded_for = sent.get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let prior_is_text = headers.get("x-forwarded-for").is_none_or(|v| v.to_str().is_ok());
    if prior_is_text {
        assert!(forwarded_for.ends_with("192.0.2.7"), "x-forwarded-for {forwarded_for:?}");
    }
}

/// Header values keep their bytes through a store (one `char` per byte, as JSON) and through
/// sealing; a sealed answer opens only for its own record, and a forged one never opens.
fn check_stored(headers: &HeaderMap, body: &[u8]) {
    let stored: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().iter().map(|&b| char::from(b)).collect()))
        .collect();
    let json = serde_json::to_string(&stored).expect("headers serialise");
    let back: Vec<(String, String)> = serde_json::from_str(&json).expect("headers read back");
    assert_eq!(back.len(), headers.len());
    for ((name, value), (original_name, original)) in back.iter().zip(headers.iter()) {
        let bytes: Vec<u8> = value.chars().map(|c| u8::try_from(c).expect("one char per byte")).collect();
        assert_eq!((name.as_str(), bytes.as_slice()), (original_name.as_str(), original.as_bytes()));
    }

    let response = StoredResponse { status: 201, headers: stored, body: Bytes::copy_from_slice(body), retained: true };
    let id = RecordId::new("orders", "h:tenant", "order-1");
    let sealed = keys().seal(&id, &response);
    assert_eq!(keys().open(&id, sealed.clone()).expect("a sealed answer opens"), response);
    let moved = RecordId::new("orders", "h:tenant", "order-2");
    assert!(keys().open(&moved, sealed.clone()).is_err(), "a sealed answer moved to another record opens");
    let mut tampered = sealed.body.to_vec();
    let at = body.first().map_or(0, |b| usize::from(*b)) % tampered.len();
    tampered[at] ^= 1;
    let tampered = StoredResponse { body: Bytes::from(tampered), ..sealed.clone() };
    assert!(keys().open(&id, tampered).is_err(), "a tampered answer opens");
    // An answer that only looks sealed (the marker header over fuzzed bytes) never opens;
    // one that does not look sealed passes unchanged.
    let forged = StoredResponse { body: Bytes::copy_from_slice(body), ..sealed };
    assert!(keys().open(&id, forged).is_err(), "a forged answer opens");
    if !matches!(response.headers.as_slice(), [(name, _)] if name == "x-idem-sealed") {
        assert_eq!(keys().open(&id, response.clone()).ok(), Some(response));
    }
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::new(&[7; 32], &[[9; 32]]))
}

/// An `Upstream` per base URL; building one is not free, and the fuzzer uses few bases.
fn upstream(base: &Uri) -> Upstream {
    Upstream::new(base.clone()).expect("the TLS roots load")
}
