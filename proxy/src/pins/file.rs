//! The prefetch file (`--prefetch-file`): one image a line,
//! `REF [PLATFORM] [pin]`; `#` starts a comment; blank lines are skipped.
//! Parsed strictly: a line that is not of that shape is reported with its
//! number and skipped, and the others are used.

use crate::digest::Reference;
use crate::prefetch::Target;

/// What identifies an image to fetch: its ref, the registry host dropped,
/// and the platform.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// `NAME:TAG` or `NAME@DIGEST`.
    pub reference: String,
    /// `os/arch[/variant]`.
    pub platform: String,
}

impl Key {
    /// The key of `reference` for `platform` (the node's when `None`),
    /// parsed as a prefetch parses them.
    pub fn new(reference: &str, platform: Option<&str>) -> Result<Key, String> {
        Target::parse(reference, platform).map(|t| Key::of(&t))
    }

    /// The key of a prefetch's target.
    pub fn of(t: &Target) -> Key {
        let sep = match t.tag_or_digest {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        Key {
            reference: format!("{}{sep}{}", t.name, t.tag_or_digest),
            platform: t.platform.to_string(),
        }
    }

    /// Whether the ref names a tag, which may move.
    pub fn is_tag(&self) -> bool {
        !self.reference.contains('@')
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reference, self.platform)
    }
}

/// One line of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub pin: bool,
}

/// The entries of a prefetch file, and an error for each line skipped.
/// An image listed twice is one entry, pinned if either line pins it.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<String>) {
    let (mut entries, mut errors) = (Vec::<Entry>::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = match words[..] {
            [] => continue,
            [r] => Key::new(r, None).map(|k| (k, false)),
            [r, "pin"] => Key::new(r, None).map(|k| (k, true)),
            [r, p] => Key::new(r, Some(p)).map(|k| (k, false)),
            [r, p, "pin"] => Key::new(r, Some(p)).map(|k| (k, true)),
            [_, _, w] => Err(format!("`{w}` is not `pin`")),
            _ => Err("too many words: REF [PLATFORM] [pin]".to_owned()),
        };
        match parsed {
            Ok((key, pin)) => match entries.iter_mut().find(|e| e.key == key) {
                Some(e) => e.pin |= pin,
                None => entries.push(Entry { key, pin }),
            },
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    (entries, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn key(r: &str, p: &str) -> Key {
        Key {
            reference: r.into(),
            platform: p.into(),
        }
    }

    #[test]
    fn refs_lose_their_host_and_get_a_tag() {
        let k = |s: &str| Key::new(s, Some("linux/amd64")).map(|k| k.reference);
        assert_eq!(k("team/app").unwrap(), "team/app:latest");
        assert_eq!(
            k("registry.example:5000/team/app:v1").unwrap(),
            "team/app:v1"
        );
        assert_eq!(k("localhost/app:v1").unwrap(), "app:v1");
        assert_eq!(k("localhost:5000/app").unwrap(), "app:latest");
        assert_eq!(
            k(&format!("ghcr.io/a/b:v1@{D}")).unwrap(),
            format!("a/b@{D}")
        );
        assert!(!Key::new(&format!("a/b@{D}"), None).unwrap().is_tag());
        assert!(k("Team/app").is_err(), "names are lower case");
        assert!(k("team/app:").is_err(), "an empty tag is no tag");
        assert!(k("team/app@v1").is_err(), "after @ comes a digest");
        assert!(k("").is_err());
        assert_eq!(
            Key::new("app", None).unwrap().platform,
            crate::prefetch::Platform::node().to_string()
        );
        assert_eq!(
            Key::new("app", Some("linux/arm64")).unwrap().platform,
            "linux/arm64/v8",
            "platforms are normalized as a prefetch normalizes them"
        );
    }

    #[test]
    fn the_file_is_parsed_strictly_line_by_line() {
        let text = "\
# images for the rollout
team/app:v1
team/app:v1 pin   # again, pinned
team/db linux/arm64/v8 pin

team/web linux/amd64
team/bad linux/amd64 pinned
Team/Upper
team/x linux pin
team/y linux/amd64 pin extra
";
        let (entries, errors) = parse(text);
        let here = crate::prefetch::Platform::node().to_string();
        assert_eq!(
            entries,
            vec![
                Entry {
                    key: key("team/app:v1", &here),
                    pin: true
                },
                Entry {
                    key: key("team/db:latest", "linux/arm64/v8"),
                    pin: true
                },
                Entry {
                    key: key("team/web:latest", "linux/amd64"),
                    pin: false
                },
            ]
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        for (e, line) in errors.iter().zip([7, 8, 9, 10]) {
            assert!(
                e.starts_with(&format!("line {line}: ")),
                "each error names its line: {e}"
            );
        }
        assert!(errors[0].contains("`pinned` is not `pin`"), "{errors:?}");
        assert!(errors[2].contains("not a platform"), "{errors:?}");
    }
}
