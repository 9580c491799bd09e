//! containerd's `<certs-dir>/<name>/hosts.toml`, so that the CRI pulls the
//! registry name over plain HTTP from the proxy, and straight from the
//! registry (`server`) when the proxy does not answer. Written atomically
//! (temp file, then rename) and only ever replaced or removed when it is ours.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use super::{HostsError, Outcome};

/// First line of every `hosts.toml` we write.
pub(crate) const TOML_MARK: &str = "# managed by regproxy";

/// `<certs_dir>/<name>/hosts.toml`; containerd names the folder after the
/// registry host, port included when there is one.
pub fn containerd_hosts_toml(certs_dir: &Path, name: &str) -> PathBuf {
    certs_dir.join(name).join("hosts.toml")
}

/// The `hosts.toml` that sends pulls of `name` to the proxy at `endpoint`
/// over plain HTTP, and to `server` (the registry's own address, not the
/// name, which the node's `/etc/hosts` sends to the proxy) when the proxy
/// does not answer: containerd tries the `host` entries in order, then
/// `server`.
pub fn hosts_toml(name: &str, endpoint: &str, server: &str) -> String {
    format!(
        "{TOML_MARK}: `regproxy hosts containerd remove --name {name}` deletes this file.\n\
         # containerd pulls {name} through the regproxy on this node, over plain HTTP,\n\
         # and from the registry itself (server) when the proxy does not answer.\n\
         server = \"{server}\"\n\
         \n\
         [host.\"{endpoint}\"]\n  \
         capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Writes our `hosts.toml` for `name` (atomically: temp file, then rename),
/// unless an identical one is there; refuses to replace one we did not write.
pub fn ensure_containerd(
    certs_dir: &Path,
    name: &str,
    endpoint: &str,
    server: &str,
) -> Result<Outcome, HostsError> {
    let dir = certs_dir.join(name);
    let path = containerd_hosts_toml(certs_dir, name);
    let wanted = hosts_toml(name, endpoint, server);
    // Bytes, not text: a file of someone else's that is not UTF-8 is still
    // theirs, not a read error.
    let outcome = match std::fs::read(&path) {
        Ok(old) if old == wanted.as_bytes() => return Ok(Outcome::Unchanged),
        Ok(old) if old.starts_with(TOML_MARK.as_bytes()) => Outcome::Updated,
        Ok(_) => return Err(HostsError::NotOurs { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Added,
        Err(e) => return Err(HostsError::io("read", &path)(e)),
    };
    std::fs::create_dir_all(&dir).map_err(HostsError::io("create", &dir))?;
    // Named after this process's instance id, not its pid: two pods' proxies
    // (both pid 1 in their own pid namespaces) must not share a temp file.
    let tmp = dir.join(format!(".hosts.toml.regproxy-{}", crate::instance::id()));
    let write = || -> io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(wanted.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HostsError::io("write", &path)(e)
    })?;
    Ok(outcome)
}

/// Deletes our `hosts.toml` for `name`, and its folder when that is then empty.
pub fn remove_containerd(certs_dir: &Path, name: &str) -> Result<Outcome, HostsError> {
    let path = containerd_hosts_toml(certs_dir, name);
    match std::fs::read(&path) {
        Ok(old) if old.starts_with(TOML_MARK.as_bytes()) => {}
        Ok(_) => return Ok(Outcome::LeftAlone),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Absent),
        Err(e) => return Err(HostsError::io("read", &path)(e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Absent),
        Err(e) => return Err(HostsError::io("remove", &path)(e)),
    }
    // Fails harmlessly when the admin keeps other files (a CA) there.
    let _ = std::fs::remove_dir(certs_dir.join(name));
    Ok(Outcome::Removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "knative.registry.svc.cluster.local";
    const SERVER: &str = "http://10.96.0.20:80";

    #[test]
    fn hosts_toml_points_the_name_at_the_proxy_and_falls_back_to_the_server() {
        let toml = hosts_toml(NAME, "http://127.0.0.2:80", "http://10.96.0.20:80");
        assert!(toml.starts_with(TOML_MARK));
        assert!(toml.contains("server = \"http://10.96.0.20:80\"\n"));
        assert!(toml.contains(
            "[host.\"http://127.0.0.2:80\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }

    #[test]
    fn containerd_files_round_trip_and_foreign_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path();
        assert_eq!(
            ensure_containerd(certs, NAME, "http://127.0.0.2:80", SERVER).unwrap(),
            Outcome::Added
        );
        assert_eq!(
            ensure_containerd(certs, NAME, "http://127.0.0.2:80", SERVER).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            ensure_containerd(certs, NAME, "http://127.0.0.3:80", SERVER).unwrap(),
            Outcome::Updated
        );
        let written = std::fs::read_to_string(containerd_hosts_toml(certs, NAME)).unwrap();
        assert!(written.contains("127.0.0.3"));
        assert_eq!(remove_containerd(certs, NAME).unwrap(), Outcome::Removed);
        assert!(
            !certs.join(NAME).exists(),
            "the folder we created should go when empty"
        );
        assert_eq!(remove_containerd(certs, NAME).unwrap(), Outcome::Absent);

        std::fs::create_dir_all(certs.join("mine.example")).unwrap();
        std::fs::write(
            containerd_hosts_toml(certs, "mine.example"),
            "server = \"https://x\"\n",
        )
        .unwrap();
        assert!(matches!(
            ensure_containerd(certs, "mine.example", "http://127.0.0.2:80", SERVER),
            Err(HostsError::NotOurs { .. })
        ));
        assert_eq!(
            remove_containerd(certs, "mine.example").unwrap(),
            Outcome::LeftAlone
        );
        assert!(containerd_hosts_toml(certs, "mine.example").exists());

        // Found by the fuzzer: a foreign file that is not UTF-8 was a read
        // error, not someone else's file.
        let latin1 = containerd_hosts_toml(certs, "latin1.example");
        std::fs::create_dir_all(latin1.parent().unwrap()).unwrap();
        std::fs::write(&latin1, b"# caf\xe9\n").unwrap();
        assert!(matches!(
            ensure_containerd(certs, "latin1.example", "http://127.0.0.2:80", SERVER),
            Err(HostsError::NotOurs { .. })
        ));
        assert_eq!(
            remove_containerd(certs, "latin1.example").unwrap(),
            Outcome::LeftAlone
        );
        assert_eq!(std::fs::read(&latin1).unwrap(), b"# caf\xe9\n");
    }
}
