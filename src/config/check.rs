//! The value checks every config file uses, one rule each: a check turns the text a user
//! wrote into a typed value or says, in one sentence, what is wrong with it. The caller adds
//! the path ([`Problems::check`](super::Problems::check)).

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use crate::core::units::{parse_duration, parse_size};

/// A duration such as `"30s"` or `"24h"`: more than zero (nothing in idem can usefully wait,
/// keep or time out after no time at all) and at most [`MAX_DURATION`](crate::core::units::MAX_DURATION).
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() { Err(format!("{s:?} must be more than zero")) } else { Ok(d) }
}

/// A size such as `"1MiB"`, `"64KiB"` or a number of bytes.
pub fn size(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// An integer between `low` and `high` inclusive, as the type the setting is used as.
pub fn bounded<T: TryFrom<i64>>(n: i64, low: i64, high: i64) -> Result<T, String> {
    let out_of_range = || format!("{n} is not between {low} and {high}");
    if !(low..=high).contains(&n) {
        return Err(out_of_range());
    }
    T::try_from(n).map_err(|_| out_of_range())
}

/// An HTTP method, in any case (`"post"` is `POST`).
pub fn method(s: &str) -> Result<Method, String> {
    Method::from_bytes(s.to_ascii_uppercase().as_bytes()).map_err(|_| format!("invalid method {s:?}"))
}

/// A header name (stored lower case).
pub fn header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(s).map_err(|_| format!("invalid header name {s:?}"))
}

/// Text a header value can hold (no line breaks or other control characters).
pub fn header_value(s: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(s).map_err(|_| format!("{s:?} holds characters a header value cannot"))
}

/// A listener address, `IP:PORT` (a host name would be resolved at an unknown time).
pub fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("invalid address {s:?}; write HOST:PORT with an IP, e.g. \"127.0.0.1:8080\""))
}

/// A JSON pointer (RFC 6901) that names a field: it starts with `/`.
///
/// RFC 6901 also allows `""`, the whole document, but every key that takes a pointer
/// (a key in a body, a fingerprint's include or exclude, a capture, a message id, an
/// object's id or version) means one field of a document, and the whole document there is
/// a mistake (a key that is the entire body, a fingerprint that excludes everything), so
/// `""` is refused everywhere.
pub fn pointer(s: &str) -> Result<(), String> {
    match s {
        "" => Err("invalid JSON pointer \"\": it would name the whole document; name a field, e.g. \"/id\"".into()),
        _ if s.starts_with('/') => Ok(()),
        _ => Err(format!("invalid JSON pointer {s:?}; it must start with '/', e.g. \"/id\"")),
    }
}

/// A list of JSON pointers, each as [`pointer()`] checks it.
pub fn pointers(list: Vec<String>) -> Result<Vec<String>, String> {
    list.iter().try_for_each(|p| pointer(p))?;
    Ok(list)
}

/// An absolute URL whose scheme is one of `schemes`.
pub fn url(s: &str, schemes: &[&str]) -> Result<url::Url, String> {
    let parsed = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if schemes.contains(&parsed.scheme()) {
        Ok(parsed)
    } else {
        Err(format!("the scheme must be one of {}", schemes.join(", ")))
    }
}

/// An HTTP base URI, `http[s]://HOST[:PORT][/prefix]`: an upstream the gateway forwards to.
pub fn upstream(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        (Some(other), Some(_)) => {
            Err(format!("scheme {other:?} is not supported; the upstream must be http:// or https://HOST[:PORT]"))
        }
        _ => Err(format!("invalid URL {s:?}; write e.g. \"http://127.0.0.1:9000\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_positive_and_bounded() {
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("0s").unwrap_err(), "\"0s\" must be more than zero");
        assert!(duration("9000y").unwrap_err().contains("longer than 100 years"));
        assert!(duration("soon").unwrap_err().starts_with("invalid duration \"soon\""));
    }

    #[test]
    fn bounds_are_inclusive() {
        assert_eq!(bounded::<u32>(1, 1, 100), Ok(1));
        assert_eq!(bounded::<u32>(100, 1, 100), Ok(100));
        assert_eq!(bounded::<u32>(0, 1, 100).unwrap_err(), "0 is not between 1 and 100");
        assert_eq!(bounded::<u8>(300, 1, 1000).unwrap_err(), "300 is not between 1 and 1000");
    }

    #[test]
    fn methods_and_headers() {
        assert_eq!(method("patch"), Ok(Method::PATCH));
        assert_eq!(method("GE T").unwrap_err(), "invalid method \"GE T\"");
        assert_eq!(header_name("X-Key").unwrap().as_str(), "x-key");
        assert_eq!(header_name("Bad Name").unwrap_err(), "invalid header name \"Bad Name\"");
        assert!(header_value("ok\tvalue").is_ok());
        assert_eq!(header_value("a\nb").unwrap_err(), "\"a\\nb\" holds characters a header value cannot");
    }

    #[test]
    fn addresses_are_ip_and_port() {
        assert_eq!(socket_addr("127.0.0.1:8080").unwrap().port(), 8080);
        assert!(socket_addr("localhost:8080").unwrap_err().contains("HOST:PORT"));
    }

    #[test]
    fn a_pointer_names_a_field() {
        assert_eq!(pointer("/a/0/b~1c"), Ok(()));
        assert!(pointer("id").unwrap_err().starts_with("invalid JSON pointer \"id\"; it must start with '/'"));
        assert!(pointer("").unwrap_err().contains("whole document"));
        assert_eq!(pointers(vec!["/a".into(), "/b".into()]), Ok(vec!["/a".to_owned(), "/b".to_owned()]));
        assert!(pointers(vec!["/a".into(), "b".into()]).unwrap_err().contains("\"b\""));
    }

    #[test]
    fn urls_have_an_allowed_scheme() {
        assert!(url("nats://h:4222", &["nats", "tls"]).is_ok());
        assert_eq!(url("http://h", &["nats", "tls"]).unwrap_err(), "the scheme must be one of nats, tls");
        assert!(url("h:4222/x y", &["nats"]).is_err());
    }
}
