//! What a prefetch is asked for: a ref (`[HOST[:PORT]/]NAME(:TAG|@DIGEST)`)
//! and a platform (`os/arch[/variant]`), and which manifest of an index
//! that platform runs, matched the way containerd matches it.

use std::fmt;

use serde::Deserialize;

use crate::digest::{validate_name, Digest, Reference};

/// One image to prefetch.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The ref as the admin gave it, for messages and events.
    pub reference: String,
    /// The repository on this proxy's upstream.
    pub name: String,
    pub tag_or_digest: Reference,
    pub platform: Platform,
}

impl Target {
    /// Parses `reference`; `platform` defaults to the node's.
    pub fn parse(reference: &str, platform: Option<&str>) -> Result<Target, String> {
        let platform = match platform {
            Some(p) => Platform::parse(p)?,
            None => Platform::node(),
        };
        let (name, tag_or_digest) = parse_ref(reference)?;
        Ok(Target {
            reference: reference.to_owned(),
            name,
            tag_or_digest,
            platform,
        })
    }
}

/// `[HOST[:PORT]/]NAME(:TAG|@DIGEST)`. A first component with a `.` or `:`,
/// or `localhost`, names a registry: this proxy has one upstream, so it is
/// dropped. Neither tag nor digest means `latest`; with both, the digest
/// decides (as docker does).
pub fn parse_ref(s: &str) -> Result<(String, Reference), String> {
    let bad = |why: String| format!("`{s}` is not an image ref: {why}");
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => (
            rest,
            Some(Digest::parse(d).map_err(|e| bad(e.to_string()))?),
        ),
        None => (s, None),
    };
    // A tag's `:` comes after the last `/`; a port's comes before it.
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    let name = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => name,
    };
    validate_name(name).map_err(|e| bad(e.to_string()))?;
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d),
        (None, Some(t)) => match Reference::parse(t).map_err(|e| bad(e.to_string()))? {
            Reference::Tag(t) => Reference::Tag(t),
            Reference::Digest(_) => return Err(bad("a tag cannot be a digest".into())),
        },
        (None, None) => Reference::Tag("latest".into()),
    };
    Ok((name.to_owned(), reference))
}

/// An OCI platform, normalized (`aarch64` is `arm64`, arm64's variant is
/// `v8` unless said otherwise, arm's `v7`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    #[serde(rename = "architecture")]
    pub arch: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        match parts[..] {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform::new(os, arch, None)),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform::new(os, arch, Some(v))),
            _ => Err(format!(
                "`{s}` is not a platform: os/arch[/variant], like linux/arm64"
            )),
        }
    }

    /// The platform this node runs.
    pub fn node() -> Platform {
        Platform::new("linux", std::env::consts::ARCH, None)
    }

    fn new(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_owned(),
            arch: arch.to_owned(),
            variant: variant.map(str::to_owned),
        }
        .normalized()
    }

    /// containerd's `platforms.Normalize`, for the architectures that matter.
    fn normalized(mut self) -> Platform {
        self.os = self.os.to_ascii_lowercase();
        let lower = self.arch.to_ascii_lowercase();
        let (arch, default_variant) = match lower.as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64", None),
            "i386" | "i686" | "x86" | "386" => ("386", None),
            "aarch64" | "arm64" => ("arm64", Some("v8")),
            "armhf" | "arm" => ("arm", Some("v7")),
            "armel" => ("arm", Some("v6")),
            other => (other, None),
        };
        self.arch = arch.to_owned();
        // amd64's baseline has no variant; `v1` says the same.
        if self.arch == "amd64" && self.variant.as_deref() == Some("v1") {
            self.variant = None;
        }
        if self.variant.as_deref().is_none_or(str::is_empty) {
            self.variant = default_variant.map(str::to_owned);
        }
        self
    }

    /// How well an index entry's platform serves this one: `None` when it
    /// cannot run here, lower is better. An exact match first; then, like
    /// containerd's `platforms.Only`, an older variant of the same
    /// architecture (arm v7 runs v6 and v5; amd64 v3 runs v2 and the
    /// baseline).
    pub fn rank(&self, other: &Platform) -> Option<u32> {
        let other = other.clone().normalized();
        if other.os != self.os || other.arch != self.arch {
            return None;
        }
        if other.variant == self.variant {
            return Some(0);
        }
        let level = |v: &Option<String>| match v.as_deref() {
            None => Some(1),
            Some(v) => v.strip_prefix('v')?.parse::<u32>().ok(),
        };
        let compatible = matches!(self.arch.as_str(), "arm" | "amd64");
        match (level(&self.variant), level(&other.variant)) {
            (Some(want), Some(have)) if compatible && have < want => Some(1 + want - have),
            _ => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn tag(s: &str) -> Reference {
        Reference::Tag(s.into())
    }

    #[test]
    fn refs_drop_the_host_and_default_to_latest() {
        let cases = [
            ("app", "app", tag("latest")),
            ("team/app:v1", "team/app", tag("v1")),
            ("localhost/app", "app", tag("latest")),
            ("localhost:5000/team/app:1.0", "team/app", tag("1.0")),
            ("registry.example.com/app:v2", "app", tag("v2")),
            ("10.0.0.1:5000/app", "app", tag("latest")),
            ("team/app/x", "team/app/x", tag("latest")),
        ];
        for (s, name, reference) in cases {
            assert_eq!(parse_ref(s).unwrap(), (name.to_owned(), reference), "{s}");
        }
        let by_digest = parse_ref(&format!("example.com:443/app:v1@{D}")).unwrap();
        assert_eq!(by_digest.0, "app");
        assert_eq!(by_digest.1.to_string(), D, "the digest wins over the tag");
    }

    #[test]
    fn bad_refs_are_refused() {
        for bad in [
            "",
            "App",
            "app:",
            "app:-x",
            "app@sha256:00",
            "/app",
            "a//b",
            "host.io/",
        ] {
            assert!(parse_ref(bad).is_err(), "{bad} is not a ref");
        }
    }

    #[test]
    fn platforms_normalize() {
        let p = |s| Platform::parse(s).unwrap().to_string();
        assert_eq!(p("linux/aarch64"), "linux/arm64/v8");
        assert_eq!(p("linux/arm64"), "linux/arm64/v8");
        assert_eq!(p("linux/x86_64"), "linux/amd64");
        assert_eq!(p("linux/amd64/v1"), "linux/amd64");
        assert_eq!(p("linux/arm"), "linux/arm/v7");
        assert_eq!(p("linux/arm/v6"), "linux/arm/v6");
        for bad in ["linux", "linux/", "Linux/amd64", "a/b/c/d", "linux/amd64/"] {
            assert!(Platform::parse(bad).is_err(), "{bad} is not a platform");
        }
        assert!(Platform::node().to_string().starts_with("linux/"));
    }

    #[test]
    fn platforms_match_like_containerd() {
        let want = |s| Platform::parse(s).unwrap();
        let entry = |os: &str, arch: &str, v: Option<&str>| Platform {
            os: os.into(),
            arch: arch.into(),
            variant: v.map(Into::into),
        };
        let arm64 = want("linux/arm64");
        assert_eq!(arm64.rank(&entry("linux", "arm64", None)), Some(0));
        assert_eq!(arm64.rank(&entry("linux", "arm64", Some("v8"))), Some(0));
        assert_eq!(arm64.rank(&entry("linux", "arm", Some("v7"))), None);
        assert_eq!(arm64.rank(&entry("windows", "arm64", None)), None);
        let v7 = want("linux/arm/v7");
        assert_eq!(v7.rank(&entry("linux", "arm", Some("v7"))), Some(0));
        assert!(
            v7.rank(&entry("linux", "arm", Some("v6")))
                < v7.rank(&entry("linux", "arm", Some("v5")))
        );
        assert_eq!(v7.rank(&entry("linux", "arm", Some("v8"))), None);
        let amd = want("linux/amd64");
        assert_eq!(amd.rank(&entry("linux", "amd64", None)), Some(0));
        assert_eq!(amd.rank(&entry("linux", "amd64", Some("v3"))), None);
        assert_eq!(
            want("linux/amd64/v3").rank(&entry("linux", "amd64", None)),
            Some(3)
        );
        assert_eq!(amd.rank(&entry("unknown", "unknown", None)), None);
    }
}
