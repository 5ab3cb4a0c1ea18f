//! Reading a TOML file into a raw serde tree, naming the key path and the line of a bad key.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::{Error, Kind};

/// Reads a TOML file into a raw tree; the one problem names the file, the key path and the line.
pub fn read_toml<T: DeserializeOwned>(path: &Path, kind: Kind) -> Result<T, Error> {
    let in_file = |problem: String| Error(vec![format!("{}: {problem}", path.display())], kind);
    let text = std::fs::read_to_string(path).map_err(|e| in_file(format!("cannot read: {e}")))?;
    parse_toml(&text).map_err(in_file)
}

/// Parses TOML text into a raw tree, naming the path and line of a bad key
/// (`routes[1]: unknown field `ttll`, expected … (line 6)`).
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().to_owned();
        let position =
            inner.span().map(|span| line_of(text, span.start)).map(|l| format!(" (line {l})")).unwrap_or_default();
        if path == "." { format!("{message}{position}") } else { format!("{path}: {message}{position}") }
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tree {
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: Option<String>,
    }

    #[test]
    fn a_bad_key_is_named_by_path_and_line() {
        let tree: Tree = parse_toml("[[items]]\nname = \"a\"\n").unwrap();
        assert_eq!(tree.items[0].name.as_deref(), Some("a"));
        let err = parse_toml::<Tree>("[[items]]\nname = \"a\"\n\n[[items]]\nnme = \"b\"\n").unwrap_err();
        assert!(err.starts_with("items[1].nme: unknown field `nme`, expected `name`"), "{err}");
        assert!(err.ends_with("(line 5)"), "{err}");
        assert!(parse_toml::<Tree>("items = [").is_err());
    }

    #[test]
    fn a_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        let err = read_toml::<Tree>(&path, Kind::Flow).unwrap_err().to_string();
        assert!(err.starts_with(&format!("invalid flow:\n  {}: cannot read:", path.display())), "{err}");
        std::fs::write(&path, "[[items]]\nnme = 1\n").unwrap();
        let err = read_toml::<Tree>(&path, Kind::Flow).unwrap_err();
        assert!(err.problems()[0].starts_with(&format!("{}: items[0].nme: unknown field", path.display())), "{err}");
    }
}
