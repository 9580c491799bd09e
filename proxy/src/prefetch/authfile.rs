//! `--prefetch-auth-file`: a docker `config.json` whose entry for the
//! upstream becomes the `Authorization: Basic` header of every prefetch
//! request. The entry is the one whose key's host (scheme and path
//! stripped) is the upstream's `host[:port]`, else the file's only entry.

use std::path::Path;

use http::HeaderValue;
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Reads `path` and picks the credential for `upstream` (`host[:port]`).
pub fn load(path: &Path, upstream: &str) -> Result<HeaderValue, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    credential(&text, upstream).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `Authorization` value that `config.json` text gives `upstream`.
pub fn credential(text: &[u8], upstream: &str) -> Result<HeaderValue, String> {
    let file: File =
        serde_json::from_slice(text).map_err(|e| format!("not a docker config.json: {e}"))?;
    let upstream = upstream.to_ascii_lowercase();
    let entry = match file
        .auths
        .iter()
        .find(|(k, _)| same_registry(&host_of(k), &upstream))
    {
        Some((_, e)) => e,
        None if file.auths.len() == 1 => file.auths.values().next().expect("one entry"),
        None if file.auths.is_empty() => return Err("its `auths` has no entry".into()),
        None => {
            return Err(format!(
                "none of its {} `auths` entries is for {upstream}",
                file.auths.len()
            ))
        }
    };
    let user_pass = match (&entry.auth, &entry.username, &entry.password) {
        (Some(a), _, _) if !a.is_empty() => {
            let raw = decode_base64(a.trim()).ok_or("its `auth` is not base64")?;
            let s = String::from_utf8(raw).map_err(|_| "its `auth` is not UTF-8")?;
            if !s.contains(':') {
                return Err("its `auth` is not base64 of user:password".into());
            }
            s
        }
        (_, Some(u), Some(p)) => format!("{u}:{p}"),
        _ => return Err("the entry has neither `auth` nor `username` and `password`".into()),
    };
    let mut v = HeaderValue::try_from(format!("Basic {}", encode_base64(user_pass.as_bytes())))
        .map_err(|_| "the credential is not a header value")?;
    v.set_sensitive(true);
    Ok(v)
}

/// `https://host:port/v1/` → `host:port`.
fn host_of(key: &str) -> String {
    let k = key.split_once("://").map_or(key, |(_, rest)| rest);
    k.split('/').next().unwrap_or("").to_ascii_lowercase()
}

/// Docker Hub goes by several names; the rest must be equal.
fn same_registry(a: &str, b: &str) -> bool {
    const HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    a == b || (HUB.contains(&a) && HUB.contains(&b))
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn encode_base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padded or not.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(v: &HeaderValue) -> String {
        let s = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        String::from_utf8(decode_base64(s).unwrap()).unwrap()
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "user:pässword", "x:y:z\n"] {
            let e = encode_base64(s.as_bytes());
            assert_eq!(decode_base64(&e).unwrap(), s.as_bytes(), "{s}");
        }
        assert_eq!(encode_base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(decode_base64("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert!(decode_base64("d!==").is_none(), "not the alphabet");
        assert!(decode_base64("d").is_none(), "one char is no byte");
    }

    #[test]
    fn the_upstreams_entry_is_picked() {
        let file = br#"{"auths": {
            "https://other.example:5000/v1/": {"auth": "b3RoZXI6eA=="},
            "registry.example:5000": {"auth": "dXNlcjpwYXNz"},
            "third.example": {"username": "u", "password": "p"}
        }}"#;
        let v = credential(file, "registry.example:5000").unwrap();
        assert!(v.is_sensitive(), "the credential never shows in a log");
        assert_eq!(basic(&v), "user:pass");
        assert_eq!(
            basic(&credential(file, "other.example:5000").unwrap()),
            "other:x"
        );
        assert_eq!(basic(&credential(file, "THIRD.example").unwrap()), "u:p");
        let err = credential(file, "nowhere.example").unwrap_err();
        assert!(err.contains("none of its 3"), "{err}");
    }

    #[test]
    fn one_entry_serves_any_upstream_and_hub_has_aliases() {
        let one = br#"{"auths": {"whatever": {"username": "u", "password": "p:q"}}}"#;
        assert_eq!(basic(&credential(one, "127.0.0.1:5000").unwrap()), "u:p:q");
        let hub =
            br#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"}, "x.io": {}}}"#;
        assert_eq!(
            basic(&credential(hub, "registry-1.docker.io").unwrap()),
            "user:pass"
        );
    }

    #[test]
    fn broken_files_say_why() {
        let cases: [(&[u8], &str); 5] = [
            (b"nope", "not a docker config.json"),
            (br#"{"auths": {}}"#, "no entry"),
            (br#"{"credsStore": "desktop"}"#, "no entry"),
            (br#"{"auths": {"a": {"auth": "%%%"}}}"#, "not base64"),
            (
                br#"{"auths": {"a": {"auth": "dXNlcg=="}}}"#,
                "user:password",
            ),
        ];
        for (text, why) in cases {
            let err = credential(text, "a").unwrap_err();
            assert!(err.contains(why), "{err} should say {why}");
        }
        assert!(credential(br#"{"auths": {"a": {"username": "u"}}}"#, "a").is_err());
    }
}
