//! The request fingerprint (`core::fingerprint::fingerprint`): what must not change it
//! (query order, form pair order, JSON whitespace and key order, the media type's case and
//! parameters) and what must (every framed part).
//!
//! Input: a request in the format of `idem_fuzz::Message`. `x-fuzz-allow`, `-include` and
//! `-exclude` (comma-separated) make the route's fingerprint spec; without `x-fuzz-allow`
//! the default allowlist (`content-type`) is used. The request's `content-type` header is
//! its media type.

#![no_main]

use idem::core::FingerprintSpec;
use idem::core::fingerprint::{BodyForm, RequestView, fingerprint};
use idem_fuzz::Message;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let message = Message::parse(data);
    let (method, target) = message.start_parts();
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target.as_str(), None),
    };
    let mut spec = FingerprintSpec {
        include: message.list("x-fuzz-include"),
        exclude: message.list("x-fuzz-exclude"),
        ..FingerprintSpec::default()
    };
    if message.all("x-fuzz-allow").next().is_some() {
        spec.headers = message.list("x-fuzz-allow").iter().map(|h| h.to_ascii_lowercase()).collect();
    }
    let media = message.text("content-type");
    let view = RequestView { method: &method, path, query, content_type: media.as_deref(), body: message.body };
    let headers = |name: &str| -> Vec<&[u8]> { message.all(name).collect() };
    let (fp, form) = fingerprint(&spec, view, headers);
    assert_eq!((fp, form), fingerprint(&spec, view, headers), "deterministic");

    // The query is a set of pairs: their order and empty pairs do not count.
    if let Some(query) = query {
        let mut pairs: Vec<&str> = query.split('&').collect();
        pairs.reverse();
        let shuffled = format!("&{}&", pairs.join("&&"));
        assert_eq!(fp, fingerprint(&spec, RequestView { query: Some(&shuffled), ..view }, headers).0);
    }

    // The media type's case and parameters do not change how the body is read.
    if let Some(media) = media.as_deref().filter(|m| !m.contains(';')) {
        let decorated = format!(" {} ; charset=utf-8", media.to_ascii_uppercase());
        let (_, again) = fingerprint(&spec, RequestView { content_type: Some(&decorated), ..view }, headers);
        assert_eq!(form, again, "{media:?} and {decorated:?} read the body alike");
    }

    match form {
        BodyForm::Json => {
            // Any serialisation of the same JSON value is the same request.
            let value: Value = serde_json::from_slice(view.body).expect("a JSON body form means the body parsed");
            let pretty = serde_json::to_vec_pretty(&value).expect("a parsed value serialises");
            let again = fingerprint(&spec, RequestView { body: &pretty, ..view }, headers);
            assert_eq!(again, (fp, BodyForm::Json), "pretty-printed {}", String::from_utf8_lossy(&pretty));
        }
        BodyForm::Form => {
            // Form pairs are a set: their order does not count.
            let mut pairs: Vec<&[u8]> = view.body.split(|b| *b == b'&').collect();
            pairs.reverse();
            let shuffled = pairs.join(&b'&');
            assert_eq!((fp, form), fingerprint(&spec, RequestView { body: &shuffled, ..view }, headers));
        }
        BodyForm::Raw => {
            let mut longer = view.body.to_vec();
            longer.push(b' ');
            assert_ne!(fp, fingerprint(&spec, RequestView { body: &longer, ..view }, headers).0);
        }
    }

    // Every part is framed: moving a character from the path to the method changes the hash.
    if let Some(first) = path.chars().next() {
        let moved_method = format!("{method}{first}");
        let moved = RequestView { method: &moved_method, path: &path[first.len_utf8()..], ..view };
        assert_ne!(fp, fingerprint(&spec, moved, headers).0, "method {method:?} + path {path:?}");
    }
    // An allowlisted header sent once more (even empty) changes the hash.
    if let Some(name) = spec.headers.first() {
        let more = |n: &str| -> Vec<&[u8]> {
            let mut values = headers(n);
            if n == name {
                values.push(b"");
            }
            values
        };
        assert_ne!(fp, fingerprint(&spec, view, more).0);
    }
});
