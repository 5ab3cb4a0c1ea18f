//! TLS for every connection idem opens or accepts, configured here once so that a
//! certificate is trusted the same way by the gateway's upstream client, the runner's and
//! the consumer's endpoints, and the store and broker clients.
//!
//! **Trust:** Mozilla's root programme (compiled in, so a minimal container still reaches
//! public APIs), the platform's store (or what `SSL_CERT_DIR`/`SSL_CERT_FILE` put in its
//! place), and the PEM bundle named by `SSL_CERT_FILE` — a private CA is added by pointing
//! `SSL_CERT_FILE` at it. Verification of the chain and the host name is always on: there
//! is no switch to turn it off. A client may check less only where its protocol's own
//! convention says so, and then only by name: PostgreSQL's `sslmode=verify-ca` checks the
//! chain but not the name ([`Check::Chain`]), and `sslmode=prefer` is libpq's opportunistic
//! encryption (see `store::postgres::tls`).
//!
//! A client that takes its roots as certificates rather than as a [`RootCertStore`] (the
//! redis crate) gets the same set from [`root_certificates`]; one that must trust a CA of
//! its own (`sslrootcert=`) builds its configuration with [`client_config_with`].
//!
//! **Serving:** a certificate chain and key from PEM files, HTTP/2 and HTTP/1.1 offered by
//! ALPN, re-read on demand ([`ServerTls::reload`], on SIGHUP) so a renewed certificate
//! needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// A TLS configuration that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("{0}")]
    Config(String),
}

/// The HTTP client builder for idem's own outbound calls other than the gateway's proxy
/// (runner steps, consumer deliveries, lookups): this module's one TLS configuration, so
/// `SSL_CERT_FILE` means for them what it means for the gateway's upstream (reqwest's own
/// roots would differ). A preconfigured config is used as given, so ALPN is offered here as
/// reqwest offers it for a config it builds (HTTP/2 where the server agrees).
pub fn http_client_builder() -> Result<reqwest::ClientBuilder, Error> {
    let mut tls = client_config()?.as_ref().clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION"))))
}

/// What a client checks of the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The chain up to a trusted root, and that the certificate names the host dialled.
    ChainAndName,
    /// The chain only: any name, as long as a trusted root signed it (PostgreSQL's
    /// `verify-ca`, for servers reached by an address their certificate does not name).
    Chain,
}

/// The one crypto provider: named explicitly, since several may be compiled in.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration every outgoing TLS connection uses, built once per process
/// (a bad `SSL_CERT_FILE` is reported on every call, so each client says so at start-up).
pub fn client_config() -> Result<Arc<ClientConfig>, Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, Error>> = OnceLock::new();
    CONFIG.get_or_init(|| client_config_with(roots()?, Check::ChainAndName)).clone()
}

/// A client configuration trusting `roots` only (not the defaults), checking `check`.
/// Built anew on every call: for a connection with a CA of its own, and for tests.
pub fn client_config_with(roots: RootCertStore, check: Check) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?;
    let config = match check {
        Check::ChainAndName => builder.with_root_certificates(roots).with_no_client_auth(),
        Check::Chain => {
            let chain_only = Lenient::new(roots, Forgives::AWrongName)?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(chain_only)).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The trusted roots (see the module docs).
pub fn roots() -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The platform's store. Its errors are not fatal (a host without a CA bundle still has
    // Mozilla's roots); an unreadable SSL_CERT_FILE is, below.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some((path, bundle)) = ssl_cert_file()? {
        let (_, refused) = roots.add_parsable_certificates(bundle);
        if refused > 0 {
            tracing::warn!(path = %path.display(), refused, "SSL_CERT_FILE: some certificates are not usable as roots");
        }
    }
    Ok(roots)
}

/// The same trusted roots as [`roots`], as whole certificates: Mozilla's programme, the
/// platform's store and `SSL_CERT_FILE`. Every one is usable as a root (the others are
/// left out), so a client that refuses a whole bundle for one bad entry accepts this one.
pub fn root_certificates() -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut all: Vec<CertificateDer<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS.to_vec();
    all.extend(rustls_native_certs::load_native_certs().certs);
    if let Some((_, bundle)) = ssl_cert_file()? {
        all.extend(bundle);
    }
    let mut check = RootCertStore::empty();
    all.retain(|certificate| check.add(certificate.clone()).is_ok());
    Ok(all)
}

/// The certificates of `SSL_CERT_FILE`, when it is set.
fn ssl_cert_file() -> Result<Option<(PathBuf, Vec<CertificateDer<'static>>)>, Error> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) else { return Ok(None) };
    let path = PathBuf::from(path);
    let bundle = read_certificates(&path).map_err(|e| match e {
        Error::File { path, reason } => Error::File { path, reason: format!("SSL_CERT_FILE: {reason}") },
        other => other,
    })?;
    Ok(Some((path, bundle)))
}

/// The rustls error behind a connection failure, if a TLS handshake is what failed: a
/// certificate that is not trusted, or a server that does not speak TLS as expected. Such
/// a failure is the configuration's, not an outage, so no retry fixes it.
pub fn handshake_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps, which is where tokio-rustls puts
        // the rustls error: look inside. Some clients (redis) keep their cause behind an
        // `Arc`, whose `source` skips it too.
        if let Some(inner) = current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            cause = Some(inner);
        } else if let Some(shared) = current.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            cause = Some(&**shared);
        } else {
            cause = current.source();
        }
    }
    None
}

/// A handshake failure in words an operator can act on: what is wrong, then rustls' own.
pub fn describe(error: &rustls::Error) -> String {
    let hint = match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA"
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            "the server's certificate does not name the host dialled"
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        rustls::Error::InvalidCertificate(_) => "the server's certificate is not valid",
        _ => "the TLS handshake failed",
    };
    format!("{hint} ({error})")
}

/// The certificates of a PEM file: at least one, else an error naming the file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file_error = |reason: String| Error::File { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(file_error("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certificates)
}

/// A listener's certificate and key, re-read on demand.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    /// The configuration handshakes use now; replaced whole by a successful reload, so a
    /// handshake always sees one consistent certificate and key.
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Reads `cert` (a PEM chain, leaf first) and `key` (a PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let config = server_config(cert, key)?;
        Ok(ServerTls { cert: cert.to_owned(), key: key.to_owned(), current: RwLock::new(config) })
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Reads the files again. On an error the certificate in use stays in use.
    pub fn reload(&self) -> Result<(), Error> {
        let config = server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        Ok(())
    }
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let chain = read_certificates(cert)?;
    let key_error = |reason: String| Error::File { path: key.to_owned(), reason };
    let pem = std::fs::read(key).map_err(|e| key_error(format!("cannot read: {e}")))?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| key_error(format!("no PEM private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| Error::Config(format!("{} and {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Encryption without authentication, for one caller only: PostgreSQL's `sslmode=prefer`
/// without `sslrootcert`, libpq's opportunistic mode (see `store::postgres::tls` for why it
/// adds no promise to break). The one exception to "verification is always on": nothing
/// else may use it.
pub fn encryption_only_client_config() -> Arc<ClientConfig> {
    // The roots are never consulted; webpki wants some to check handshake signatures with.
    let mozilla = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let anything = Lenient::new(mozilla, Forgives::Everything).expect("Mozilla's roots are not empty");
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(anything))
        .with_no_client_auth();
    Arc::new(config)
}

/// A verifier that checks less than webpki does, for the two cases that ask for it; the
/// handshake signatures are always checked (by webpki), so the session is bound to the
/// certificate presented even when nothing else about it is.
#[derive(Debug)]
struct Lenient {
    webpki: Arc<WebPkiServerVerifier>,
    forgives: Forgives,
}

/// What a [`Lenient`] verifier lets pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forgives {
    /// Only a certificate for another name (`verify-ca`). webpki checks the chain (and
    /// revocation) before the name, so a name error means the chain was good; every other
    /// error stands.
    AWrongName,
    /// Any certificate (`prefer` without a root): encryption only.
    Everything,
}

impl Lenient {
    fn new(roots: RootCertStore, forgives: Forgives) -> Result<Self, Error> {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Lenient { webpki, forgives })
    }
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.forgives == Forgives::Everything {
            return Ok(ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_server_certificate_loads_and_reloads_and_a_bad_reload_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let tls = ServerTls::load(&cert, &key).unwrap();
        assert_eq!(tls.config().alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let before = tls.config();
        self_signed(dir.path());
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.config()), "a reload replaces the configuration");
        std::fs::write(&key, "not a key").unwrap();
        let error = tls.reload().unwrap_err().to_string();
        assert!(error.contains("key.pem") && error.contains("no PEM private key"), "{error}");
    }

    #[test]
    fn files_without_certificates_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let error = read_certificates(&empty).unwrap_err().to_string();
        assert!(error.contains("empty.pem") && error.contains("no PEM certificate"), "{error}");
        let missing = read_certificates(&dir.path().join("missing.pem")).unwrap_err().to_string();
        assert!(missing.contains("missing.pem: cannot read"), "{missing}");
    }

    #[test]
    fn mozillas_roots_are_always_trusted() {
        assert!(roots().unwrap().len() >= webpki_roots::TLS_SERVER_ROOTS.len());
        assert!(root_certificates().unwrap().len() >= webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
    }
}
