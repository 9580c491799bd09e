//! The `/etc/hosts` line that maps the registry name to the proxy.
//!
//! `/etc/hosts` is bind-mounted into every container on a node, so it is only
//! ever rewritten in place (same inode, under `flock`), never replaced. Our line
//! carries a marker comment; `remove` deletes exactly that line, so the file
//! goes back to the bytes it had before `ensure`, final newline or not.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{HostsError, Outcome};

/// Every line `ensure` writes ends with this comment; it is how `remove` and a
/// later `ensure` recognise the line as ours.
const MARK: &str = "# regproxy-managed";
/// The marker when `ensure` had to end the file's last line with a newline
/// before appending; `remove` then takes that newline away again.
const MARK_EOL: &str = "# regproxy-managed eol-added";
/// How long to wait for another process's lock on the hosts file.
pub(super) const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds or corrects our line for `name` in the hosts file, in place.
pub fn ensure_hosts_file(path: &Path, name: &str, address: IpAddr) -> Result<Outcome, HostsError> {
    edit_in_place(path, |old| ensure_entry(old, name, address, path))
}

/// Deletes our line for `name` from the hosts file, in place.
pub fn remove_from_hosts_file(path: &Path, name: &str) -> Result<Outcome, HostsError> {
    edit_in_place(path, |old| Ok(remove_entry(old, name)))
}

/// The new content of a hosts file with `name` mapped to `address` by our
/// line, or `None` with the outcome when nothing needs to change.
///
/// A line we do not manage that maps `name` elsewhere is a conflict: the
/// resolver would use whichever comes first, and it is not ours to change.
pub fn ensure_entry(
    old: &[u8],
    name: &str,
    address: IpAddr,
    path: &Path,
) -> Result<(Option<Vec<u8>>, Outcome), HostsError> {
    let lines = split_lines(old);
    let mut ours = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        match parse_managed(line) {
            Some(m) if m.name.eq_ignore_ascii_case(name) => ours.push(i),
            Some(_) => {}
            None => {
                if let Some(existing) = unmanaged_address_of(line, name) {
                    if existing.parse::<IpAddr>() == Ok(address) {
                        return Ok((None, Outcome::PresentUnmanaged { line: i + 1 }));
                    }
                    return Err(HostsError::Conflict {
                        path: path.to_owned(),
                        line: i + 1,
                        name: name.to_owned(),
                        existing,
                        wanted: address,
                    });
                }
            }
        }
    }

    let Some((&first, rest)) = ours.split_first() else {
        // Append; a last line without its newline gets one, and the marker
        // remembers it so that `remove` can take it away again.
        let mut new = old.to_vec();
        let eol_added = !old.is_empty() && !old.ends_with(b"\n");
        if eol_added {
            new.push(b'\n');
        }
        new.extend_from_slice(managed_line(name, address, eol_added).as_bytes());
        return Ok((Some(new), Outcome::Added));
    };

    // Rewrite our first line where it stands (keeping its newline flag) and
    // drop any duplicates; every other line is copied byte for byte.
    let eol_added = parse_managed(lines[first]).is_some_and(|m| m.eol_added);
    let wanted = managed_line(name, address, eol_added);
    let mut new = Vec::with_capacity(old.len() + wanted.len());
    for (i, line) in lines.iter().enumerate() {
        if i == first {
            new.extend_from_slice(wanted.as_bytes());
        } else if !rest.contains(&i) {
            new.extend_from_slice(line);
        }
    }
    if new == old {
        Ok((None, Outcome::Unchanged))
    } else {
        Ok((Some(new), Outcome::Updated))
    }
}

/// The hosts file without our lines for `name`, or `None` when it has none.
pub fn remove_entry(old: &[u8], name: &str) -> (Option<Vec<u8>>, Outcome) {
    let lines = split_lines(old);
    let mut new = Vec::with_capacity(old.len());
    let mut removed = false;
    for (i, line) in lines.iter().enumerate() {
        match parse_managed(line) {
            Some(m) if m.name.eq_ignore_ascii_case(name) => {
                removed = true;
                // Undo the newline `ensure` added to the line before ours, but
                // only when ours is still last: joining two lines someone
                // wrote after us would break theirs.
                if m.eol_added && i + 1 == lines.len() && new.ends_with(b"\n") {
                    new.pop();
                }
            }
            _ => new.extend_from_slice(line),
        }
    }
    if removed {
        (Some(new), Outcome::Removed)
    } else {
        (None, Outcome::Absent)
    }
}

/// What a resolver reading this hosts file answers for `name`: the address
/// of the first line that lists it (first match wins), with its line number.
pub fn lookup(content: &[u8], name: &str) -> Option<(usize, String)> {
    split_lines(content)
        .iter()
        .enumerate()
        .find_map(|(i, line)| Some((i + 1, unmanaged_address_of(line, name)?)))
}

fn managed_line(name: &str, address: IpAddr, eol_added: bool) -> String {
    let mark = if eol_added { MARK_EOL } else { MARK };
    format!("{address} {name} {mark}\n")
}

/// Lines with their terminating `\n` (the last one may lack it).
fn split_lines(content: &[u8]) -> Vec<&[u8]> {
    content.split_inclusive(|&b| b == b'\n').collect()
}

struct Managed<'a> {
    name: &'a str,
    eol_added: bool,
}

/// Recognises exactly the lines `managed_line` writes.
fn parse_managed(line: &[u8]) -> Option<Managed<'_>> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\n').unwrap_or(line);
    let (entry, eol_added) = if let Some(entry) = line.strip_suffix(MARK_EOL) {
        (entry, true)
    } else {
        (line.strip_suffix(MARK)?, false)
    };
    let mut fields = entry.split_ascii_whitespace();
    let (address, name) = (fields.next()?, fields.next()?);
    if fields.next().is_some() || address.parse::<IpAddr>().is_err() {
        return None;
    }
    Some(Managed { name, eol_added })
}

/// The address an ordinary hosts line gives `name`, if it names it at all.
fn unmanaged_address_of(line: &[u8], name: &str) -> Option<String> {
    let entry = line.split(|&b| b == b'#').next().unwrap_or_default();
    let mut fields = entry
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let address = fields.next()?;
    fields
        .any(|f| f.eq_ignore_ascii_case(name.as_bytes()))
        .then(|| String::from_utf8_lossy(address).into_owned())
}

/// Opens the file, holds an exclusive `flock` on it while `edit` computes the
/// new content from the old, and writes that content over the same inode:
/// only the bytes from the first difference on are written, then the length
/// is set. A reader never sees an empty file; an append is a pure append.
fn edit_in_place(
    path: &Path,
    edit: impl FnOnce(&[u8]) -> Result<(Option<Vec<u8>>, Outcome), HostsError>,
) -> Result<Outcome, HostsError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(HostsError::io("open", path))?;
    lock_exclusive(&file, path)?;
    let mut old = Vec::new();
    file.read_to_end(&mut old)
        .map_err(HostsError::io("read", path))?;
    let (new, outcome) = edit(&old)?;
    if let Some(new) = new {
        let same = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
        file.write_all_at(&new[same..], same as u64)
            .map_err(HostsError::io("write", path))?;
        file.set_len(new.len() as u64)
            .map_err(HostsError::io("truncate", path))?;
        file.sync_all().map_err(HostsError::io("sync", path))?;
    }
    // Closing the file releases the lock.
    Ok(outcome)
}

/// `flock(LOCK_EX)`, retried for at most [`LOCK_TIMEOUT`]; the lock is on the
/// inode, so it also holds against a process that reached the file through a
/// bind mount.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), HostsError> {
    use rustix::fs::{flock, FlockOperation};
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                if Instant::now() >= deadline {
                    return Err(HostsError::LockTimeout {
                        path: path.to_owned(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(HostsError::io("lock", path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "knative.registry.svc.cluster.local";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ensure(old: &str, addr: &str) -> (Option<String>, Outcome) {
        let (new, outcome) =
            ensure_entry(old.as_bytes(), NAME, ip(addr), Path::new("hosts")).unwrap();
        (new.map(|n| String::from_utf8(n).unwrap()), outcome)
    }

    fn remove(old: &str) -> (Option<String>, Outcome) {
        let (new, outcome) = remove_entry(old.as_bytes(), NAME);
        (new.map(|n| String::from_utf8(n).unwrap()), outcome)
    }

    #[test]
    fn lookup_answers_as_a_resolver_does_first_line_wins() {
        let hosts = format!(
            "# 10.0.0.9 {NAME}\n127.0.0.1 localhost\n10.0.0.1 a {NAME} # x\n127.0.0.2 {NAME}\n"
        );
        assert_eq!(
            lookup(hosts.as_bytes(), NAME),
            Some((3, "10.0.0.1".to_owned()))
        );
        assert_eq!(lookup(b"127.0.0.1 localhost", NAME), None);
    }

    #[test]
    fn ensure_appends_one_marked_line_and_remove_restores_the_bytes() {
        let original = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n";
        let (added, outcome) = ensure(original, "127.0.0.2");
        let added = added.expect("a missing entry should be added");
        assert_eq!(outcome, Outcome::Added);
        assert_eq!(
            added,
            format!("{original}127.0.0.2 {NAME} # regproxy-managed\n")
        );
        assert_eq!(
            ensure(&added, "127.0.0.2"),
            (None, Outcome::Unchanged),
            "a second ensure should change nothing"
        );
        assert_eq!(
            remove(&added),
            (Some(original.to_owned()), Outcome::Removed)
        );
        assert_eq!(
            remove(original),
            (None, Outcome::Absent),
            "removing twice should change nothing"
        );
    }

    #[test]
    fn a_missing_final_newline_is_added_and_taken_away_again() {
        let original = "127.0.0.1 localhost\n10.0.0.1 node1";
        let (added, _) = ensure(original, "127.0.0.2");
        let added = added.unwrap();
        assert_eq!(
            added,
            format!("{original}\n127.0.0.2 {NAME} # regproxy-managed eol-added\n")
        );
        assert_eq!(
            remove(&added).0.as_deref(),
            Some(original),
            "remove should restore the file without its final newline"
        );
    }

    #[test]
    fn empty_file_round_trips() {
        let (added, _) = ensure("", "127.0.0.2");
        assert_eq!(
            added.as_deref(),
            Some(format!("127.0.0.2 {NAME} # regproxy-managed\n").as_str())
        );
        assert_eq!(remove(&added.unwrap()).0.as_deref(), Some(""));
    }

    #[test]
    fn a_changed_address_rewrites_our_line_where_it_stands() {
        let before =
            format!("127.0.0.1 localhost\n127.0.0.2 {NAME} # regproxy-managed\n10.0.0.9 later\n");
        let (new, outcome) = ensure(&before, "127.0.0.3");
        assert_eq!(outcome, Outcome::Updated);
        assert_eq!(
            new.unwrap(),
            format!("127.0.0.1 localhost\n127.0.0.3 {NAME} # regproxy-managed\n10.0.0.9 later\n"),
            "only our line should change, in place"
        );
    }

    #[test]
    fn duplicates_of_our_line_collapse_to_one() {
        let before = format!(
            "a b\n127.0.0.2 {NAME} # regproxy-managed\nc d\n127.0.0.2 {NAME} # regproxy-managed\n"
        );
        let (new, outcome) = ensure(&before, "127.0.0.2");
        assert_eq!(outcome, Outcome::Updated);
        assert_eq!(
            new.unwrap(),
            format!("a b\n127.0.0.2 {NAME} # regproxy-managed\nc d\n")
        );
    }

    #[test]
    fn a_line_appended_after_ours_keeps_its_newline_on_remove() {
        let original = "127.0.0.1 localhost";
        let (added, _) = ensure(original, "127.0.0.2");
        let later = format!("{}10.1.1.1 other\n", added.unwrap());
        assert_eq!(
            remove(&later).0.unwrap(),
            "127.0.0.1 localhost\n10.1.1.1 other\n",
            "a line written after ours should not be joined to the one before"
        );
    }

    #[test]
    fn someone_elses_entry_for_the_name_is_never_touched() {
        let same = format!("127.0.0.2 {NAME}\n");
        assert_eq!(
            ensure(&same, "127.0.0.2"),
            (None, Outcome::PresentUnmanaged { line: 1 })
        );
        assert_eq!(
            remove(&same),
            (None, Outcome::Absent),
            "remove should leave an admin's own line alone"
        );

        let other = format!(
            "# c\n10.96.0.5   foo {}  # seed set-up\n",
            NAME.to_uppercase()
        );
        let err = ensure_entry(
            other.as_bytes(),
            NAME,
            ip("127.0.0.2"),
            Path::new("/etc/hosts"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 2") && msg.contains("10.96.0.5"),
            "the conflict should name the line: {msg}"
        );
        assert_eq!(
            ensure(&format!("# 10.0.0.1 {NAME}\n"), "127.0.0.2").1,
            Outcome::Added,
            "a commented-out mapping is no conflict"
        );
    }

    #[test]
    fn other_names_and_look_alike_lines_are_not_ours() {
        let before =
            "127.0.0.2 other.example # regproxy-managed\n127.0.0.2 x y # regproxy-managed\n";
        let (new, outcome) = ensure(before, "127.0.0.2");
        assert_eq!(outcome, Outcome::Added);
        assert!(
            new.unwrap().starts_with(before),
            "lines for other names should stay"
        );
        assert_eq!(remove(before).1, Outcome::Absent);
    }

    #[test]
    fn ipv6_addresses_work() {
        let (added, _) = ensure("", "::1");
        assert_eq!(added.unwrap(), format!("::1 {NAME} # regproxy-managed\n"));
    }

    #[test]
    fn non_utf8_bytes_elsewhere_survive() {
        let original = b"127.0.0.1 h\xffst\n".to_vec();
        let (added, _) = ensure_entry(&original, NAME, ip("127.0.0.2"), Path::new("h")).unwrap();
        let (restored, _) = remove_entry(&added.unwrap(), NAME);
        assert_eq!(restored.unwrap(), original);
    }
}
