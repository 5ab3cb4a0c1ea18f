//! TLS for every connection idem opens or accepts, configured here once so that a
//! certificate is trusted the same way by the gateway's upstream client, the runner's and
//! the consumer's endpoints, and the store and broker clients.
//!
//! **Trust:** Mozilla's root programme (compiled in, so a minimal container still reaches
//! public APIs), the platform's store (or what `SSL_CERT_DIR`/`SSL_CERT_FILE` put in its
//! place), and the PEM bundle named by `SSL_CERT_FILE` — a private CA is added by pointing
//! `SSL_CERT_FILE` at it. Verification of the chain and the host name is always on: there
//! is no switch to turn it off.
//!
//! **Serving:** a certificate chain and key from PEM files, HTTP/2 and HTTP/1.1 offered by
//! ALPN, re-read on demand ([`ServerTls::reload`], on SIGHUP) so a renewed certificate
//! needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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

/// The one crypto provider: named explicitly, since several may be compiled in.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration every outgoing TLS connection uses, built once per process
/// (a bad `SSL_CERT_FILE` is reported on every call, so each client says so at start-up).
pub fn client_config() -> Result<Arc<ClientConfig>, Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(e.to_string()))?
                .with_root_certificates(roots()?)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// The trusted roots (see the module docs).
pub fn roots() -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The platform's store. Its errors are not fatal (a host without a CA bundle still has
    // Mozilla's roots); an unreadable SSL_CERT_FILE is, below.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let bundle = read_certificates(&path).map_err(|e| match e {
            Error::File { path, reason } => Error::File { path, reason: format!("SSL_CERT_FILE: {reason}") },
            other => other,
        })?;
        let (_, refused) = roots.add_parsable_certificates(bundle);
        if refused > 0 {
            tracing::warn!(path = %path.display(), refused, "SSL_CERT_FILE: some certificates are not usable as roots");
        }
    }
    Ok(roots)
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
    }
}
