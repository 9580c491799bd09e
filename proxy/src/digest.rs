//! Content digests (`sha256:<hex>`), repository names and references, parsed
//! strictly: these strings become upstream URLs and cache paths.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// A validated `sha256:` digest. The hex is 64 lowercase characters, so it is
/// safe as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, Error> {
        let Some((algo, hex)) = s.split_once(':') else {
            return Err(Error::DigestInvalid(format!(
                "`{}` is not algorithm:hex",
                clip(s)
            )));
        };
        if algo != "sha256" {
            let known = matches!(algo, "sha384" | "sha512");
            let valid_algo = !algo.is_empty()
                && algo
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            return Err(if known || valid_algo {
                Error::Unsupported(format!(
                    "digest algorithm `{}` is not supported, only sha256",
                    clip(algo)
                ))
            } else {
                Error::DigestInvalid(format!("`{}` is not a digest", clip(s)))
            });
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::DigestInvalid(format!(
                "`{}` is not 64 lowercase hex digits",
                clip(hex)
            )));
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Whether a body of `size` bytes could have this digest without being
    /// read: only the empty blob has zero bytes. A zero-length body ends the
    /// moment its head goes out, before anything could be verified.
    pub fn admits_size(&self, size: u64) -> bool {
        size > 0 || self.hex == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    pub fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: hex(&h.finalize()),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Keeps error messages short when a client sends a megabyte of garbage.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks a repository name against the OCI distribution grammar:
/// components of `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`,
/// separated by `/`, at most 255 characters. This rules out `..`, `%`,
/// empty components and anything else that could escape a path.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty() && name.len() <= 255 && name.split('/').all(valid_component);
    if ok {
        Ok(())
    } else {
        Err(Error::NameInvalid(format!(
            "invalid repository name `{}`",
            clip(name)
        )))
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__`, or one or more `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A manifest reference: a tag, or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, Error> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        let b = s.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let ok = !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
        if ok {
            Ok(Reference::Tag(s.to_owned()))
        } else {
            Err(Error::TagInvalid(format!("invalid tag `{}`", clip(s))))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests_parse_and_hash() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(
            Digest::of(b""),
            d,
            "the digest of no bytes is the well-known one"
        );
    }

    #[test]
    fn bad_digests_are_refused_with_the_right_code() {
        for bad in [
            "sha256:abc",
            "sha256:../../etc/passwd",
            "nocolon",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "SHA256:00",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(Error::DigestInvalid(_))),
                "{bad} should be DIGEST_INVALID"
            );
        }
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert!(
            matches!(Digest::parse(&sha512), Err(Error::Unsupported(_))),
            "sha512 is valid but unsupported"
        );
    }

    #[test]
    fn names_follow_the_oci_grammar() {
        for good in ["app", "team/app", "a.b_c__d---e/f0", "library/ubuntu"] {
            assert!(validate_name(good).is_ok(), "{good} is a valid name");
        }
        for bad in [
            "",
            "..",
            "team/../etc",
            "a//b",
            "/a",
            "a/",
            "A",
            "a%2e",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "a.-b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad} is not a valid name");
        }
        assert!(
            validate_name(&"a".repeat(256)).is_err(),
            "names are capped at 255 characters"
        );
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert_eq!(
            Reference::parse("v1.0-rc_1").unwrap(),
            Reference::Tag("v1.0-rc_1".into())
        );
        assert!(matches!(
            Reference::parse(EMPTY).unwrap(),
            Reference::Digest(_)
        ));
        assert!(Reference::parse(".hidden").is_err());
        assert!(Reference::parse(&"t".repeat(129)).is_err());
        assert!(Reference::parse("a/b").is_err());
    }
}
