//! The `postgres://` store URL: idem's own parameters (`schema`, `pool_size`) and the TLS
//! ones tokio-postgres does not know in full (`sslmode`, `sslrootcert`; see [`super::tls`])
//! are taken out, the rest is handed to `tokio_postgres::Config`, and defaults fill what
//! the URL leaves unsaid (connect timeout, keepalives, application name).

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode as PgSslMode, SslNegotiation};

/// The schema used when the URL names none.
pub const DEFAULT_SCHEMA: &str = "idem";
/// Connections per store when the URL says nothing.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// More connections than this is a typo, not a plan: PostgreSQL's own default limit is 100.
const MAX_POOL_SIZE: usize = 1024;

/// How long a connection attempt may take before the store counts as unreachable. Without
/// it, a host that drops packets would hold `open` (and every new connection) for minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive timing: a peer that vanished without closing its socket is noticed within
/// about a minute instead of the operating system's two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// A parsed store URL.
#[derive(Clone, Debug)]
pub struct Options {
    /// Everything tokio-postgres needs to connect.
    pub pg: tokio_postgres::Config,
    /// The schema holding idem's tables (a plain lowercase identifier).
    pub schema: String,
    /// The most connections the pool opens.
    pub pool_size: usize,
    /// `host:port/dbname`, for messages: never the password.
    pub target: String,
    /// How the connection is encrypted and what of the server's certificate is checked.
    pub tls: Tls,
}

/// libpq's `sslmode`: all five modes (tokio-postgres itself knows only the first three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext; no TLS is asked for.
    Disable,
    /// TLS if the server offers it, plaintext otherwise (the default).
    Prefer,
    /// TLS or no connection; the chain is checked, the name is not (stricter than libpq,
    /// which checks nothing in this mode unless it finds a root certificate file).
    Require,
    /// TLS or no connection; the chain is checked, the name is not.
    VerifyCa,
    /// TLS or no connection; the chain and the host name are checked.
    VerifyFull,
}

/// The TLS part of a store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: the CA file this connection trusts instead of the usual roots
    /// (`None`: the roots of [`crate::tls`], which is also what `sslrootcert=system` says).
    pub root: Option<PathBuf>,
}

impl Options {
    /// Parses `postgres://user@host:port/db[?schema=NAME&pool_size=N&<libpq options>]`.
    /// The error is the reason, naming the offending part.
    pub fn parse(url: &str) -> Result<Self, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("expected postgres://USER@HOST:PORT/DBNAME".into());
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut schema = None;
        let mut pool_size = None;
        let mut mode = None;
        let mut root = None;
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "schema" => set_once(&mut schema, name, parse_schema(value)?)?,
                "pool_size" => set_once(&mut pool_size, name, parse_pool_size(value)?)?,
                "sslmode" => set_once(&mut mode, name, parse_ssl_mode(value)?)?,
                "sslrootcert" => set_once(&mut root, name, decode(name, value)?)?,
                "sslcert" | "sslkey" | "sslpassword" => {
                    return Err(format!(
                        "`{name}`: client certificates are not supported; authenticate with a password"
                    ));
                }
                _ => passed.push(pair),
            }
        }
        let tls = tls_options(mode, root)?;
        let pg_url = if passed.is_empty() { base.to_owned() } else { format!("{base}?{}", passed.join("&")) };
        let mut pg: tokio_postgres::Config = pg_url.parse().map_err(|e: tokio_postgres::Error| describe_parse(&e))?;
        pg.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        check_connectable(&pg)?;
        let given = |option: &str| passed.iter().any(|p| p.split('=').next() == Some(option));
        fill_defaults(&mut pg, given);
        let target = target(&pg);
        Ok(Self {
            pg,
            schema: schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned()),
            pool_size: pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            target,
            tls,
        })
    }

    /// The schema name, quoted for SQL.
    pub fn quoted_schema(&self) -> String {
        // `parse_schema` admits only [a-z0-9_], so quoting needs no escaping.
        format!("\"{}\"", self.schema)
    }
}

pub use crate::store::redact;

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(format!("`{name}` is given twice")),
    }
}

fn parse_ssl_mode(value: &str) -> Result<SslMode, String> {
    match value {
        "disable" => Ok(SslMode::Disable),
        "prefer" => Ok(SslMode::Prefer),
        "require" => Ok(SslMode::Require),
        "verify-ca" => Ok(SslMode::VerifyCa),
        "verify-full" => Ok(SslMode::VerifyFull),
        // libpq's `allow` tries plaintext first and TLS only if that is refused: never
        // more secure than `prefer`, and easily less; offering it would only invite it.
        "allow" => Err("`sslmode=allow` is not supported: use prefer, require, verify-ca or verify-full".into()),
        other => Err(format!("`sslmode={other}`: expected disable, prefer, require, verify-ca or verify-full")),
    }
}

/// A value as the URL spells it, percent-decoded (a path may hold `%2F` or spaces).
fn decode(name: &str, value: &str) -> Result<String, String> {
    let decoded = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| format!("`{name}` is not UTF-8 once percent-decoded"))?;
    if decoded.is_empty() {
        return Err(format!("`{name}=` names no file"));
    }
    Ok(decoded.into_owned())
}

/// `sslmode` defaults to `prefer`, as in libpq; `sslrootcert=system` (libpq 16) means the
/// usual roots and, as there, defaults to `verify-full` and refuses anything weaker, since
/// a "system" root that nobody checks the name against would trust any public certificate.
fn tls_options(mode: Option<SslMode>, root: Option<String>) -> Result<Tls, String> {
    match root.as_deref() {
        Some("system") => match mode.unwrap_or(SslMode::VerifyFull) {
            SslMode::VerifyFull => Ok(Tls { mode: SslMode::VerifyFull, root: None }),
            _ => Err("`sslrootcert=system` needs sslmode=verify-full (or no sslmode)".into()),
        },
        _ => Ok(Tls { mode: mode.unwrap_or(SslMode::Prefer), root: root.map(PathBuf::from) }),
    }
}

/// A schema name idem can put into SQL without surprises: lowercase letters, digits and
/// `_`, not starting with a digit, not in PostgreSQL's reserved `pg_` namespace.
fn parse_schema(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !value.as_bytes()[0].is_ascii_digit()
        && !value.starts_with("pg_");
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "`schema={value}`: a schema name is 1-63 lowercase letters, digits and _, not starting with a digit or pg_"
        ))
    }
}

fn parse_pool_size(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_POOL_SIZE).contains(&n) => Ok(n),
        _ => Err(format!("`pool_size={value}`: expected a number of connections from 1 to {MAX_POOL_SIZE}")),
    }
}

/// tokio-postgres says "invalid connection string"; the useful part is its cause.
fn describe_parse(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}

/// Refuses what would parse but can never connect, so a mistake is reported as a bad URL
/// at once rather than as an outage the gateway would wait out forever.
fn check_connectable(pg: &tokio_postgres::Config) -> Result<(), String> {
    if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
        return Err("no host; write postgres://USER@HOST:PORT/DBNAME".into());
    }
    if pg.get_user().is_none() {
        return Err("no user; write postgres://USER@HOST:PORT/DBNAME".into());
    }
    // As in libpq: a direct TLS handshake (no SSLRequest first) has no plaintext to fall
    // back to, so it needs a mode that insists on TLS.
    if pg.get_ssl_negotiation() == SslNegotiation::Direct && pg.get_ssl_mode() != PgSslMode::Require {
        return Err("`sslnegotiation=direct` needs sslmode=require, verify-ca or verify-full".into());
    }
    Ok(())
}

fn fill_defaults(pg: &mut tokio_postgres::Config, given: impl Fn(&str) -> bool) {
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    if !given("keepalives_idle") {
        pg.keepalives_idle(KEEPALIVE_IDLE);
    }
    if !given("keepalives_interval") {
        pg.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if !given("keepalives_retries") {
        pg.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if pg.get_application_name().is_none() {
        // Makes idem's sessions recognisable in pg_stat_activity.
        pg.application_name("idem");
    }
}

fn target(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => pg.get_hostaddrs().first().map(|a| a.to_string()).unwrap_or_default(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", pg.get_dbname().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idem_parameters_are_taken_out() {
        let o =
            Options::parse("postgres://root@db.example:6543/app?schema=idem_1&pool_size=4&sslmode=disable").unwrap();
        assert_eq!((o.schema.as_str(), o.pool_size), ("idem_1", 4));
        assert_eq!(o.target, "db.example:6543/app");
        assert_eq!(o.pg.get_ssl_mode(), PgSslMode::Disable);
        assert_eq!(o.tls, Tls { mode: SslMode::Disable, root: None });
        assert_eq!(o.pg.get_application_name(), Some("idem"));
        assert_eq!(o.pg.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn defaults_apply_and_explicit_options_win() {
        let o = Options::parse("postgresql://u@h/d?connect_timeout=1&application_name=me&keepalives_idle=7").unwrap();
        assert_eq!((o.schema.as_str(), o.pool_size), (DEFAULT_SCHEMA, DEFAULT_POOL_SIZE));
        assert_eq!(o.pg.get_connect_timeout(), Some(&Duration::from_secs(1)));
        assert_eq!(o.pg.get_application_name(), Some("me"));
        assert_eq!(o.pg.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(o.target, "h:5432/d");
    }

    #[test]
    fn sslmode_has_libpqs_five_modes_and_prefer_is_the_default() {
        let tls = |url: &str| {
            let o = Options::parse(url).unwrap();
            (o.tls.mode, o.pg.get_ssl_mode(), o.tls.root.map(|p| p.display().to_string()))
        };
        assert_eq!(tls("postgres://u@h/d"), (SslMode::Prefer, PgSslMode::Prefer, None));
        assert_eq!(tls("postgres://u@h/d?sslmode=disable"), (SslMode::Disable, PgSslMode::Disable, None));
        assert_eq!(tls("postgres://u@h/d?sslmode=prefer"), (SslMode::Prefer, PgSslMode::Prefer, None));
        assert_eq!(tls("postgres://u@h/d?sslmode=require"), (SslMode::Require, PgSslMode::Require, None));
        assert_eq!(tls("postgres://u@h/d?sslmode=verify-ca"), (SslMode::VerifyCa, PgSslMode::Require, None));
        assert_eq!(
            tls("postgres://u@h/d?sslmode=verify-full&sslrootcert=/etc/ssl/db%20ca.pem"),
            (SslMode::VerifyFull, PgSslMode::Require, Some("/etc/ssl/db ca.pem".into()))
        );
        assert_eq!(tls("postgres://u@h/d?sslrootcert=system"), (SslMode::VerifyFull, PgSslMode::Require, None));
        let direct = Options::parse("postgres://u@h/d?sslmode=verify-full&sslnegotiation=direct").unwrap();
        assert_eq!(direct.pg.get_ssl_negotiation(), SslNegotiation::Direct);
    }

    #[test]
    fn passwords_are_redacted_even_from_broken_urls() {
        assert_eq!(redact("postgres://u:pw@h:99999/d?x=1"), "postgres://u:***@h:99999/d?x=1");
        assert_eq!(redact("postgres://u:p@ss@h/d"), "postgres://u:***@h/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact("postgres://h/d?user=a@b"), "postgres://h/d?user=a@b");
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("postgres://u@h/d?schema=Bad-Name", "schema=Bad-Name"),
            ("postgres://u@h/d?schema=pg_catalog", "schema=pg_catalog"),
            ("postgres://u@h/d?schema=", "schema="),
            ("postgres://u@h/d?schema=a&schema=b", "`schema` is given twice"),
            ("postgres://u@h/d?pool_size=0", "pool_size=0"),
            ("postgres://u@h/d?pool_size=many", "pool_size=many"),
            ("postgres://u@h/d?bogus=1", "bogus"),
            ("postgres://u@h:port/d", "port"),
            ("postgres://u@h/d?sslmode=verify", "sslmode=verify"),
            ("postgres://u@h/d?sslmode=allow", "not supported"),
            ("postgres://u@h/d?sslmode=require&sslmode=disable", "`sslmode` is given twice"),
            ("postgres://u@h/d?sslrootcert=", "names no file"),
            ("postgres://u@h/d?sslrootcert=system&sslmode=require", "verify-full"),
            ("postgres://u@h/d?sslcert=c.pem", "client certificates"),
            ("postgres://u@h/d?sslnegotiation=direct", "sslnegotiation=direct"),
            ("postgres:///d", "no host"),
            ("postgres://h/d", "no user"),
            ("mysql://u@h/d", "postgres://"),
        ];
        for (url, expected) in cases {
            let reason = Options::parse(url).expect_err(url);
            assert!(reason.contains(expected), "{url}: {reason}");
        }
    }
}
