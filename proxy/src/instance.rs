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
