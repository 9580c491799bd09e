//! This process among the regproxy processes that share a cache dir.
//!
//! During a handover (a successor started beside the process it replaces,
//! both accepting on one address) two or three processes serve one cache
//! dir. Each has a random instance id, which names its own temp dir,
//! `<cache-dir>/tmp/<id>/`, holding an `owner` file once the process holds
//! that dir's `flock`. The id is also what the process answers on
//! [`PATH`], so a check that connects to the node's registry address can
//! tell a regproxy of this cache dir from any other server listening there.

use std::path::Path;
use std::sync::OnceLock;

/// Where the API listener answers with the instance id (outside `/v2/`, so
/// it cannot be a repository name).
pub const PATH: &str = "/_regproxy/instance";

/// The cache dir's folder of per-process temp dirs.
pub const TMP: &str = "tmp";

/// The file in a process's temp dir that says the dir is owned and locked.
pub const OWNER: &str = "owner";

/// The cache dir's secret: processes that share the dir prove it by an
/// HMAC of a checker's nonce, so a server that replays an id it read
/// elsewhere does not pass for this proxy.
pub const KEY_FILE: &str = "instance.key";

static KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// Loads the cache dir's key, creating it (0600) first when `create` and it
/// is missing. Two processes creating it at once end up with the same key:
/// it is linked into place only if absent, then read back.
pub fn init_key(cache_dir: &Path, create: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = cache_dir.join(KEY_FILE);
    if create && !path.exists() {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        let tmp = temp_for(&path)?;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Err(e) = f.write_all(&k).and_then(|()| f.sync_all()) {
            // A full disk: no temp file is left behind.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let key = <[u8; 32]>::try_from(std::fs::read(&path)?.as_slice())
        .map_err(|_| std::io::Error::other(format!("{} is not a key", path.display())))?;
    let _ = KEY.set(key);
    Ok(())
}

fn proof(key: &[u8; 32], nonce: &str, id: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    m.update(b"regproxy instance\0");
    m.update(nonce.as_bytes());
    m.update(b"\0");
    m.update(id.as_bytes());
    m.finalize()
        .into_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// What [`PATH`] answers to a request with `query`: the id, and with a
/// `nonce=` of up to 64 hex digits and the key known, its proof after a
/// space.
pub fn answer(query: Option<&str>) -> String {
    let nonce = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("nonce="))
        .filter(|n| !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    match (nonce, KEY.get()) {
        (Some(n), Some(k)) => format!("{} {}", id(), proof(k, n, id())),
        _ => id().to_owned(),
    }
}

/// A fresh nonce to ask [`PATH`] with, when this process knows the key.
pub fn challenge() -> Option<String> {
    KEY.get()?;
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The id in an answer to `nonce`, if its proof is right: a process that
/// holds this cache dir's key answered.
pub fn verify<'a>(nonce: &str, answer: &'a str) -> Option<&'a str> {
    let (id, got) = answer.trim().split_once(' ')?;
    let key = KEY.get()?;
    let want = proof(key, nonce, id);
    // Not secret-dependent timing that matters here: the nonce is fresh.
    (want == got).then_some(id)
}

/// This process's id: 32 hex digits, random, fixed for its lifetime.
pub fn id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).expect("the kernel's random source works");
        b.iter().map(|x| format!("{x:02x}")).collect()
    })
}

/// The ids of the processes that have a temp dir in `cache_dir`: this one,
/// and any other serving the same cache dir (or one that died and whose dir
/// is not swept yet: it answers nothing, so it vouches for nothing).
pub fn sharing(cache_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(cache_dir.join(TMP)) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.path().join(OWNER).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_id(n))
        .collect()
}

/// Where to write the next version of `path`, a file directly in the cache
/// dir, before renaming it over `path`: in this process's temp dir, so that
/// processes sharing the cache dir never write one temp file, and a crash
/// leaves nothing outside what the next process sweeps.
pub fn temp_for(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let dir = path.parent().unwrap_or(Path::new(".")).join(TMP).join(id());
    std::fs::create_dir_all(&dir)?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    Ok(dir.join(name))
}

/// Whether `s` has the shape of an instance id.
pub fn is_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_fixed_and_has_its_shape() {
        assert_eq!(id(), id());
        assert!(is_id(id()), "{}", id());
        assert!(!is_id("0123"), "too short");
        assert!(!is_id(&"A".repeat(32)), "upper case is not ours");
    }

    #[test]
    fn only_a_holder_of_the_key_proves_a_nonce() {
        let tmp = tempfile::tempdir().unwrap();
        init_key(tmp.path(), true).unwrap();
        init_key(tmp.path(), true).expect("an existing key is read back");
        let n = challenge().expect("the key is known");
        let a = answer(Some(&format!("x=1&nonce={n}")));
        assert_eq!(verify(&n, &a), Some(id()));
        assert_eq!(verify("00", &a), None, "a proof is for its own nonce");
        assert_eq!(verify(&n, id()), None, "a bare id proves nothing");
        let forged = format!("{} {}", id(), "0".repeat(64));
        assert_eq!(verify(&n, &forged), None);
        assert_eq!(answer(Some("nonce=../x")), id(), "no proof for a bad nonce");
    }

    #[test]
    fn sharing_lists_owned_temp_dirs_only() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join(TMP);
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        std::fs::create_dir_all(t.join(&a)).unwrap();
        std::fs::write(t.join(&a).join(OWNER), "1\n").unwrap();
        // Created but not yet owned: not listed.
        std::fs::create_dir_all(t.join(&b)).unwrap();
        std::fs::write(t.join("legacy-1.part"), "").unwrap();
        assert_eq!(sharing(tmp.path()), vec![a]);
    }
}
