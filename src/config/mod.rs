//! The config toolkit shared by the three files idem reads — the gateway's configuration, the
//! runner's flow and the consumer's file: TOML parsing that names the key path and line, one
//! problem collector, one [`Error`], one set of value checks and the shared `[admin]` table.
//!
//! Every file is read the same way (STYLE rule 10): a raw serde tree in which every table,
//! including the ones a key may also give as a word, refuses unknown keys; then one small
//! validator per table turns its strings into typed values, recording each mistake with its
//! path (`routes[0].ttl: …`) in [`Problems`], so a user sees every mistake at once.

pub mod check;

mod admin;
mod file;
mod problems;
mod shape;

use std::fmt;

pub use admin::{Admin, RawAdmin};
pub use file::{parse_toml, read_toml};
pub use problems::{Problems, field};
pub use shape::{Alternative, OneOrMany, WordOr};

/// A route's `upstream_timeout` when it gives none.
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "30s";
/// A route's `lease` when it gives none.
pub const DEFAULT_LEASE: &str = "30s";
/// A call's budget when a flow or a consumer gives no `timeout`.
pub const DEFAULT_TIMEOUT: &str = "30s";

/// A file that cannot be used: every problem (`path: message`), and which file it was.
///
/// It is always bad input — something the user wrote, never a runtime failure — so callers
/// exit with status 2 ([`Error::is_bad_input`]).
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind}:\n  {problems}", kind = .1, problems = .0.join("\n  "))]
pub struct Error(pub Vec<String>, pub Kind);

/// Which of the three files an [`Error`] is about; it names the file in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The gateway's configuration (`idem gateway --config`).
    Gateway,
    /// A flow file (`idem run`).
    Flow,
    /// A consumer file (`idem consume`).
    Consumer,
}

impl Error {
    /// Always true: a config error is a mistake in what the user wrote (exit status 2).
    pub const fn is_bad_input(&self) -> bool {
        true
    }

    /// The problems, each `path: message`.
    pub fn problems(&self) -> &[String] {
        &self.0
    }

    /// The same error with every problem prefixed by the file it is in.
    pub fn in_file(self, path: &std::path::Path) -> Error {
        let Error(problems, kind) = self;
        Error(problems.into_iter().map(|p| format!("{}: {p}", path.display())).collect(), kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Gateway => "configuration",
            Kind::Flow => "flow",
            Kind::Consumer => "consumer",
        })
    }
}
