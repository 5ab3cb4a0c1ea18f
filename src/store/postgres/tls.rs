//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert` turned into a rustls client
//! configuration built by [`crate::tls`], so the store trusts what every other client of
//! idem trusts.
//!
//! | `sslmode` | TLS | chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | if the server offers it, else plaintext | only against `sslrootcert` when given | no |
//! | `require` | always (a server without TLS is refused) | yes | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |
//!
//! The chain is checked against `sslrootcert` when it is given (that CA only), else
//! against [`crate::tls::roots`] (Mozilla's, the platform's and `SSL_CERT_FILE`).
//!
//! `require` is stricter than libpq, which checks no certificate in that mode unless a root
//! file exists: idem's rule is that a TLS connection it insists on is one it verifies. A
//! managed server whose CA is private (Amazon RDS, for one) therefore needs its CA bundle
//! in `sslrootcert` (or `SSL_CERT_FILE`) even under `require`; the error says so.
//!
//! `prefer` is libpq's opportunistic encryption, and the default so that a URL without
//! `sslmode` works against any server it worked against before, TLS or not, including the
//! self-signed "snakeoil" certificate a Debian PostgreSQL serves by default. It promises
//! nothing: whoever can alter the traffic can also answer "no TLS" and get plaintext, so
//! checking a certificate there would add no guarantee. It keeps passive listeners out, and
//! SCRAM's channel binding still ties a password login to the certificate the client saw.
//! Use `verify-full` for any server across a network you do not control.

use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::options::{SslMode, Tls};
use crate::store::Error;
use crate::tls::{self, Check};

/// The connector for `options`: used only when the mode asks for TLS (tokio-postgres
/// never calls it under `disable`, and falls back to plaintext under `prefer` when the
/// server declines). `url` is the redacted URL, for a bad `sslrootcert`.
pub fn connector(options: &Tls, url: &str) -> Result<MakeRustlsConnect, Error> {
    let root = match &options.root {
        Some(path) => Some(read_root(path).map_err(|reason| Error::BadUrl { url: url.to_owned(), reason })?),
        None => None,
    };
    let config = match (options.mode, root) {
        // Never used; trusting nothing keeps even a bad SSL_CERT_FILE out of the way.
        (SslMode::Disable, _) => tls::client_config_with(RootCertStore::empty(), Check::ChainAndName),
        (SslMode::Prefer, None) => Ok(tls::encryption_only_client_config()),
        (SslMode::VerifyFull, None) => tls::client_config(),
        (SslMode::VerifyFull, Some(root)) => tls::client_config_with(root, Check::ChainAndName),
        (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, Some(root)) => {
            tls::client_config_with(root, Check::Chain)
        }
        (SslMode::Require | SslMode::VerifyCa, None) => {
            tls::roots().and_then(|roots| tls::client_config_with(roots, Check::Chain))
        }
    }
    .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(MakeRustlsConnect::new(ClientConfig::clone(&config)))
}

/// The CA file of `sslrootcert`, as the only roots of this connection.
fn read_root(path: &std::path::Path) -> Result<RootCertStore, String> {
    let certificates = tls::read_certificates(path).map_err(|e| format!("sslrootcert: {e}"))?;
    let mut roots = RootCertStore::empty();
    let (_, refused) = roots.add_parsable_certificates(certificates);
    if roots.is_empty() {
        return Err(format!("sslrootcert: {}: none of its {refused} certificates is usable as a CA", path.display()));
    }
    Ok(roots)
}

/// A connection failure that TLS caused, as the reason to give: `None` for anything else.
/// tokio-postgres reports a server that declines TLS under `require` with this message
/// only (its error kinds are private), hence the comparison of text.
pub fn failure(error: &tokio_postgres::Error) -> Option<String> {
    if let Some(handshake) = tls::handshake_error(error) {
        let mut reason = tls::describe(handshake);
        match handshake {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                reason.push_str("; trust the server's CA with sslrootcert=PATH (or SSL_CERT_FILE)");
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => reason.push_str("; connect by a name the certificate holds, or use sslmode=verify-ca"),
            _ => {}
        }
        return Some(reason);
    }
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if current.to_string() == "server does not support TLS" {
            return Some("the server does not offer TLS, and sslmode asks for it".into());
        }
        cause = current.source();
    }
    None
}
