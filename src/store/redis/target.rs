//! The `redis://` and `rediss://` store URL: idem's own `prefix` parameter is taken out,
//! the rest goes to the redis crate, and nothing that reaches a message carries the
//! password. `rediss://` is TLS, verified against the roots of [`crate::tls`] (or the
//! ones a caller names): the chain and the host name, always.

use base64::Engine as _;
use rustls::pki_types::CertificateDer;

use crate::store::Error;

/// The prefix every key starts with unless the URL names one.
pub const DEFAULT_PREFIX: &str = "idem";

/// A parsed store URL.
#[derive(Debug)]
pub struct Target {
    /// The client for everything but idem's parameters (connects lazily).
    pub client: redis::Client,
    /// What every key idem writes starts with.
    pub prefix: String,
    /// `host:port/db`, for messages: never the password.
    pub addr: String,
}

/// Whom a `rediss://` connection trusts.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// The roots of [`crate::tls`]: Mozilla's, the platform's and `SSL_CERT_FILE`.
    Default,
    /// These CA certificates only.
    Only(&'a [CertificateDer<'static>]),
}

/// Parses `redis[s]://[[user]:password@]host[:port][/db][?prefix=NAME]`.
pub fn parse(url: &str, trust: Trust<'_>) -> Result<Target, Error> {
    let bad = |reason: String| Error::BadUrl { url: redact(url), reason };
    let mut parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
    let tls = match parsed.scheme() {
        "redis" => false,
        "rediss" => true,
        other => return Err(bad(format!("scheme {other:?} is not redis or rediss"))),
    };
    let mut prefix = None;
    for (name, value) in parsed.query_pairs() {
        match &*name {
            "prefix" if prefix.is_some() => return Err(bad("prefix is given twice".into())),
            "prefix" => prefix = Some(check_prefix(&value).map_err(&bad)?),
            other => {
                // The redis crate ignores parameters it does not know, so a misspelt one
                // would silently do nothing: refuse it instead.
                return Err(bad(format!("unknown parameter {other:?}; the only parameter is prefix=NAME")));
            }
        }
    }
    parsed.set_query(None);
    match parsed.fragment() {
        None => {}
        // The redis crate reads `#insecure` as "accept any certificate"; idem verifies
        // every TLS connection, so the URL is refused rather than quietly obeyed.
        Some("insecure") => {
            return Err(bad("#insecure would turn off certificate verification, which idem never does; \
                            trust a private CA with SSL_CERT_FILE instead"
                .into()));
        }
        Some(_) => return Err(bad("a redis:// URL has no #fragment".into())),
    }
    let host = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host".into()))?.to_owned();
    let port = parsed.port().unwrap_or(6379);
    let db = match parsed.path().trim_matches('/') {
        "" => 0,
        path => path.parse::<u32>().map_err(|_| bad(format!("the path must be a database number, not {path:?}")))?,
    };
    let client = if tls {
        let roots = match trust {
            Trust::Default => crate::tls::root_certificates().map_err(|e| Error::Tls(e.to_string()))?,
            Trust::Only(roots) => roots.to_vec(),
        };
        // The redis crate takes its roots as PEM, and then trusts those alone.
        let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(pem(&roots)) };
        redis::Client::build_with_tls(parsed.as_str(), certificates).map_err(|e| bad(e.to_string()))?
    } else {
        redis::Client::open(parsed.as_str()).map_err(|e| bad(e.to_string()))?
    };
    Ok(Target {
        client,
        prefix: prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned()),
        addr: format!("{host}:{port}/{db}"),
    })
}

/// Certificates as one PEM bundle.
fn pem(certificates: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = String::new();
    for certificate in certificates {
        let base64 = base64::engine::general_purpose::STANDARD.encode(certificate.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in base64.as_bytes().chunks(64) {
            // Base64 is ASCII, so every chunk is valid UTF-8.
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// A prefix is 1–100 visible ASCII characters. Braces are allowed on purpose: a prefix such
/// as `{idem}` is a Redis Cluster hash tag (see the module comment).
fn check_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() || prefix.len() > 100 || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("prefix must be 1-100 visible ASCII characters, not {prefix:?}"));
    }
    Ok(prefix.to_owned())
}

pub use crate::store::redact;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, Error> {
        super::parse(url, Trust::Only(&[]))
    }

    fn reason(url: &str) -> String {
        match parse(url) {
            Err(Error::BadUrl { reason, url: shown }) => {
                assert!(!shown.contains("s3cret"), "{shown}");
                reason
            }
            other => panic!("{url}: expected BadUrl, got {other:?}"),
        }
    }

    #[test]
    fn prefix_is_taken_out_and_defaults_to_idem() {
        let t = parse("redis://127.0.0.1:6390/2?prefix=app_1").unwrap();
        assert_eq!((t.prefix.as_str(), t.addr.as_str()), ("app_1", "127.0.0.1:6390/2"));
        let t = parse("redis://:s3cret@localhost").unwrap();
        assert_eq!((t.prefix.as_str(), t.addr.as_str()), ("idem", "localhost:6379/0"));
        assert_eq!(parse("redis://h?prefix=%7Bidem%7D").unwrap().prefix, "{idem}");
        let t = parse("rediss://:s3cret@cache.example:6380/1?prefix=p").unwrap();
        assert_eq!((t.prefix.as_str(), t.addr.as_str()), ("p", "cache.example:6380/1"));
    }

    #[test]
    fn certificates_become_a_pem_bundle_that_reads_back() {
        let a = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap().cert;
        let b = rcgen::generate_simple_self_signed(vec!["b.example".into()]).unwrap().cert;
        let ders = [a.der().clone(), b.der().clone()];
        use rustls::pki_types::pem::PemObject;
        let back: Vec<_> = CertificateDer::pem_slice_iter(&pem(&ders)).collect::<Result<_, _>>().unwrap();
        assert_eq!(back, ders);
    }

    #[test]
    fn malformed_urls_and_unknown_parameters_are_bad() {
        assert!(reason("redis://:s3cret@h:6379/x").contains("database number"));
        assert!(reason("redis://:s3cret@h?prefx=a").contains("prefx"));
        assert!(reason("redis://h?prefix=a&prefix=b").contains("twice"));
        assert!(reason("redis://h?prefix=").contains("prefix"));
        assert!(reason("redis://h?prefix=a%20b").contains("prefix"));
        assert!(reason("rediss://:s3cret@h/0#insecure").contains("certificate verification"));
        assert!(reason("rediss://:s3cret@h#other").contains("fragment"));
        assert!(reason("rediss://:s3cret@h?insecure=1").contains("insecure"));
        assert!(reason("http://h").contains("not redis"));
        assert!(reason("redis://:s3cret@h:99999").contains("URL"));
        assert!(reason("redis:///0").contains("host"));
        assert!(reason("redis://h#x").contains("fragment"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:s3cret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:s3cret@h:99999"), "redis://u:***@h:99999");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
