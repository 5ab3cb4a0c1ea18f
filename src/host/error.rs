//! The error every entry point returns. It knows its exit code, so the binary maps an
//! outcome to a status in one place (`main.rs`) and every subcommand agrees.

use crate::store;

/// Why an entry point (`idem gateway`, `idem run`, `idem consume`) stopped without success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is wrong and running again unchanged cannot help: a flag, a config, flow or
    /// consumer file, a store URL, an encryption key. Exit code 2.
    #[error("{0:#}")]
    BadInput(anyhow::Error),
    /// Something failed while running: a listener that cannot bind, a store that fails,
    /// a source that breaks off. Exit code 1.
    #[error("{0:#}")]
    Failed(anyhow::Error),
    /// The command ran and has already told the user what is not done: a runner record
    /// needs review or a stop came before the end (the summary says so), `idem log` found
    /// no such record. Exit code 1; printing it again would only repeat it.
    #[error("{0}")]
    Reported(String),
}

impl Error {
    /// The process exit status: 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::BadInput(_) => 2,
            Error::Failed(_) | Error::Reported(_) => 1,
        }
    }

    /// Whether the entry point already told the user.
    pub fn is_reported(&self) -> bool {
        matches!(self, Error::Reported(_))
    }

    /// A failure while running, with what was being done.
    pub fn failed(context: impl std::fmt::Display, error: impl Into<anyhow::Error>) -> Self {
        Error::Failed(error.into().context(context.to_string()))
    }
}

/// A store error is bad input when it is about the URL or the encryption key (nothing a
/// retry could fix), a failure otherwise.
impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        if error.is_bad_input() { Error::BadInput(error.into()) } else { Error::Failed(error.into()) }
    }
}

/// An error from deeper down is bad input when a store URL, an encryption key or a TLS
/// configuration (an unreadable `SSL_CERT_FILE`) is behind it, a failure otherwise.
impl From<anyhow::Error> for Error {
    fn from(error: anyhow::Error) -> Self {
        let bad_input = error.chain().any(|cause| {
            cause.downcast_ref::<store::Error>().is_some_and(store::Error::is_bad_input)
                || cause.downcast_ref::<crate::tls::Error>().is_some()
        });
        if bad_input { Error::BadInput(error) } else { Error::Failed(error) }
    }
}

impl Error {
    /// The same error, with what was being done when it happened.
    pub fn context(self, context: impl std::fmt::Display + Send + Sync + 'static) -> Self {
        match self {
            Error::BadInput(error) => Error::BadInput(error.context(context)),
            Error::Failed(error) => Error::Failed(error.context(context)),
            Error::Reported(what) => Error::Reported(what),
        }
    }
}
