//! Keys that take either of two shapes: a word or a small table (`in_flight = "reject"` or
//! `{ wait = "5s" }`), one string or a list of strings.
//!
//! serde's `untagged` enums would read them, but they accept unknown keys in the table (its
//! `deny_unknown_fields` does not reach an untagged variant) and refuse a wrong value with
//! "data did not match any variant". These visitors read the table with the table's own
//! `deny_unknown_fields` and name both shapes when the value is neither.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A key written as one word or as a table `T`.
#[derive(Debug, PartialEq, Eq)]
pub enum WordOr<T> {
    /// A keyword, checked by the validator (`"reject"`).
    Word(String),
    /// The table form.
    Table(T),
}

/// The table of a [`WordOr`]: it says what the two shapes look like, for the message a user
/// gets when the value is neither (`expected "reject" or { wait = "5s" }`).
pub trait Alternative {
    /// Both shapes, as a user would write them.
    const EXPECTED: &'static str;
}

impl<'de, T: Deserialize<'de> + Alternative> Deserialize<'de> for WordOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WordOrVisitor(PhantomData))
    }
}

struct WordOrVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + Alternative> Visitor<'de> for WordOrVisitor<T> {
    type Value = WordOr<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_str<E: de::Error>(self, word: &str) -> Result<Self::Value, E> {
        Ok(WordOr::Word(word.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(WordOr::Table)
    }
}

/// One string or a list of strings (`body = "/id"` or `body = ["/tenant", "/id"]`).
#[derive(Debug, PartialEq, Eq)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

struct OneOrManyVisitor;

impl<'de> Visitor<'de> for OneOrManyVisitor {
    type Value = OneOrMany;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a list of strings, e.g. \"/id\" or [\"/tenant\", \"/id\"]")
    }

    fn visit_str<E: de::Error>(self, one: &str) -> Result<Self::Value, E> {
        Ok(OneOrMany::One(one.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Vec::deserialize(SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::config::parse_toml;

    #[derive(Debug, PartialEq, Eq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wait {
        wait: String,
    }

    impl Alternative for Wait {
        const EXPECTED: &'static str = "\"reject\" or { wait = \"5s\" }";
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tree {
        in_flight: Option<WordOr<Wait>>,
        body: Option<OneOrMany>,
    }

    #[test]
    fn both_shapes_are_read() {
        let tree: Tree = parse_toml("in_flight = \"reject\"\nbody = [\"/a\", \"/b\"]").unwrap();
        assert_eq!(tree.in_flight, Some(WordOr::Word("reject".into())));
        assert_eq!(tree.body.map(OneOrMany::into_vec), Some(vec!["/a".to_owned(), "/b".to_owned()]));
        let tree: Tree = parse_toml("body = \"/a\"\n[in_flight]\nwait = \"5s\"").unwrap();
        assert_eq!(tree.in_flight, Some(WordOr::Table(Wait { wait: "5s".into() })));
        assert_eq!(tree.body, Some(OneOrMany::One("/a".into())));
    }

    #[test]
    fn an_unknown_key_in_the_table_is_refused_with_its_path() {
        let err = parse_toml::<Tree>("in_flight = { wait = \"5s\", typo = 1 }").unwrap_err();
        assert_eq!(err, "in_flight.typo: unknown field `typo`, expected `wait` (line 1)");
    }

    #[test]
    fn a_value_of_neither_shape_names_both() {
        let err = parse_toml::<Tree>("in_flight = 5").unwrap_err();
        assert_eq!(err, "in_flight: invalid type: integer `5`, expected \"reject\" or { wait = \"5s\" } (line 1)");
        let err = parse_toml::<Tree>("body = { a = 1 }").unwrap_err();
        assert!(err.starts_with("body: invalid type: map, expected a string or a list of strings"), "{err}");
        let err = parse_toml::<Tree>("body = [\"/a\", 2]").unwrap_err();
        assert!(err.starts_with("body[1]: invalid type: integer `2`, expected a string"), "{err}");
    }
}
