//! The problem collector: validators record every mistake with its path and carry on, so a
//! user sees all of them at once instead of one per run.

use std::fmt::Display;

use super::{Error, Kind};

/// Every problem found so far, each `path: message`, in the order found.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records a problem at `at` (a key path such as `routes[0].ttl`).
    pub fn push(&mut self, at: &str, message: impl Display) {
        self.0.push(format!("{at}: {message}"));
    }

    /// The value of a check, or `None` with its message recorded at `at`.
    pub fn check<T>(&mut self, at: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.push(at, message)).ok()
    }

    /// A duration key: its value, or `default` when it is not given.
    pub fn duration(&mut self, at: &str, value: Option<&str>, default: &str) -> Option<std::time::Duration> {
        self.check(at, super::check::duration(value.unwrap_or(default)))
    }

    /// A size key (`1MiB`): its value in bytes, or `default` when it is not given.
    pub fn size(&mut self, at: &str, value: Option<&str>, default: &str) -> Option<u64> {
        self.check(at, super::check::size(value.unwrap_or(default)))
    }

    /// A value that must be given: `None` is recorded as missing, with an example.
    pub fn required<T>(&mut self, at: &str, value: Option<T>, example: &str) -> Option<T> {
        if value.is_none() {
            self.push(at, format_args!("required, e.g. {example}"));
        }
        value
    }

    /// How many problems are recorded; a validator compares it before and after a table to
    /// know whether that table was clean.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when nothing is wrong so far.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The validated value when nothing is wrong, or every problem as an [`Error`] about a
    /// file of this `kind`.
    pub fn finish<T>(self, kind: Kind, value: Option<T>) -> Result<T, Error> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            // A validator returns `None` only after recording why; the fallback keeps a
            // refusal from ever being silent should one forget.
            None if self.0.is_empty() => Err(Error(vec![format!("invalid {kind}")], kind)),
            _ => Err(Error(self.0, kind)),
        }
    }
}

/// The path of `key` inside the table at `at` (`at` empty: the top level).
pub fn field(at: &str, key: &str) -> String {
    if at.is_empty() { key.to_owned() } else { format!("{at}.{key}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_kept_with_its_path() {
        let mut p = Problems::default();
        assert_eq!(p.check("a", Ok::<_, String>(1)), Some(1));
        assert_eq!(p.check::<u8>("b.c", Err("bad".into())), None);
        assert_eq!(p.required::<u8>(&field("d", "e"), None, "e = 1"), None);
        assert_eq!(p.len(), 2);
        let error = p.finish(Kind::Flow, Some(())).unwrap_err();
        assert_eq!(error.problems(), ["b.c: bad", "d.e: required, e.g. e = 1"]);
        assert_eq!(error.to_string(), "invalid flow:\n  b.c: bad\n  d.e: required, e.g. e = 1");
    }

    #[test]
    fn a_refusal_is_never_silent() {
        let error = Problems::default().finish::<()>(Kind::Gateway, None).unwrap_err();
        assert_eq!(error.to_string(), "invalid configuration:\n  invalid configuration");
        assert_eq!(Problems::default().finish(Kind::Consumer, Some(3)).unwrap(), 3);
    }
}
