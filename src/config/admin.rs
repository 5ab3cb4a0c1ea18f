//! `[admin]`, the table the gateway and the consumer share: where the admin API listens and
//! which environment variable holds its bearer token.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{Problems, check};

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Admin listener, `HOST:PORT`.
    pub listen: Option<String>,
    /// Name of the environment variable that holds the bearer token.
    pub token_env: Option<String>,
}

/// The admin listener, validated.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token, when one is configured.
    pub token: Option<String>,
    /// The variable the token was read from, for messages.
    pub token_env: String,
}

/// The variable the token is read from when `token_env` names none.
pub const DEFAULT_TOKEN_ENV: &str = "IDEM_ADMIN_TOKEN";

impl RawAdmin {
    /// Validates the table; `default_listen` is the listener when `listen` is not given
    /// (`None`: it must be given). The token is read through `env`, and an address off
    /// loopback without one is refused: the API could delete and resolve records.
    pub fn validate(
        self,
        default_listen: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
        p: &mut Problems,
    ) -> Option<Admin> {
        let listen = self.listen.or(default_listen.map(str::to_owned));
        let listen = p.required("admin.listen", listen, "listen = \"127.0.0.1:8082\"")?;
        let listen = p.check("admin.listen", check::socket_addr(&listen))?;
        let token_env = self.token_env.unwrap_or_else(|| DEFAULT_TOKEN_ENV.into());
        let token = env(&token_env).filter(|t| !t.is_empty());
        if !listen.ip().is_loopback() && token.is_none() {
            p.push(
                "admin.listen",
                format_args!(
                    "{listen} is not a loopback address, so the admin API needs a bearer token: set {token_env}"
                ),
            );
            return None;
        }
        Some(Admin { listen, token, token_env })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: Option<&str>, default: Option<&str>, token: Option<&str>) -> Result<Admin, Vec<String>> {
        let raw = RawAdmin { listen: listen.map(str::to_owned), token_env: None };
        let mut p = Problems::default();
        let env = |name: &str| (name == DEFAULT_TOKEN_ENV).then(|| token.map(str::to_owned)).flatten();
        let admin = raw.validate(default, &env, &mut p);
        p.finish(super::super::Kind::Gateway, admin).map_err(|e| e.0)
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let err = admin(Some("0.0.0.0:1"), None, None).unwrap_err();
        assert_eq!(
            err,
            [
                "admin.listen: 0.0.0.0:1 is not a loopback address, so the admin API needs a bearer token: set IDEM_ADMIN_TOKEN"
            ]
        );
        let ok = admin(Some("0.0.0.0:1"), None, Some("s3cret")).unwrap();
        assert_eq!(ok.token.as_deref(), Some("s3cret"));
        assert_eq!(
            admin(None, None, Some("")).unwrap_err(),
            ["admin.listen: required, e.g. listen = \"127.0.0.1:8082\""]
        );
    }

    #[test]
    fn the_default_listener_is_used_when_none_is_given() {
        let ok = admin(None, Some("127.0.0.1:8081"), None).unwrap();
        assert_eq!((ok.listen.port(), ok.token, ok.token_env.as_str()), (8081, None, DEFAULT_TOKEN_ENV));
        assert!(admin(Some("here"), Some("127.0.0.1:8081"), None).unwrap_err()[0].contains("invalid address \"here\""));
    }
}
