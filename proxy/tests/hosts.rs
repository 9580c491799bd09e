//! `regproxy hosts ...` run as the real binary, as the init containers and the
//! uninstall Job run it: in place, idempotent, reversible, safe in parallel.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_regproxy");
const NAME: &str = "knative.registry.svc.cluster.local";
const ORIGINAL: &str = "127.0.0.1\tlocalhost\n# The following lines are desirable for IPv6 capable hosts\n::1     ip6-localhost ip6-loopback\n10.0.0.4 node-1";

fn regproxy(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("regproxy should start")
}

fn spawn(args: &[String]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("regproxy should start")
}

/// Whether process `pid` has `file` open.
fn has_open(pid: u32, file: &Path) -> bool {
    let want = std::fs::canonicalize(file).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == want))
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "regproxy should succeed, got {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hosts_file(dir: &Path) -> String {
    let path = dir.join("hosts");
    std::fs::write(&path, ORIGINAL).unwrap();
    path.to_str().unwrap().to_owned()
}

fn ensure_args(file: &str, name: &str, address: &str) -> Vec<String> {
    [
        "hosts",
        "ensure",
        "--hosts-file",
        file,
        "--name",
        name,
        "--address",
        address,
    ]
    .map(String::from)
    .to_vec()
}

fn remove_args(file: &str, name: &str) -> Vec<String> {
    ["hosts", "remove", "--hosts-file", file, "--name", name]
        .map(String::from)
        .to_vec()
}

fn run(args: &[String]) -> String {
    ok(Command::new(BIN).args(args).output().unwrap())
}

#[test]
fn ensure_is_idempotent_and_remove_restores_the_exact_bytes_in_the_same_inode() {
    let dir = tempfile::tempdir().unwrap();
    let file = hosts_file(dir.path());
    let inode = std::fs::metadata(&file).unwrap().ino();
    // A container's bind mount holds the inode open; it must see every change.
    let held = std::fs::File::open(&file).unwrap();

    let said = run(&ensure_args(&file, NAME, "127.0.0.2"));
    assert!(
        said.contains("added"),
        "the first ensure should say it added the entry: {said}"
    );
    for _ in 0..3 {
        let said = run(&ensure_args(&file, NAME, "127.0.0.2"));
        assert!(
            said.contains("already present"),
            "a repeated ensure should change nothing: {said}"
        );
    }
    let with_entry = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        with_entry,
        format!("{ORIGINAL}\n127.0.0.2 {NAME} # regproxy-managed eol-added\n"),
        "exactly one marked line should be appended and no other line touched"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        inode,
        "ensure should keep the inode"
    );
    let seen = std::fs::read_to_string(format!("/proc/self/fd/{}", fd_of(&held))).unwrap();
    assert_eq!(
        seen, with_entry,
        "a reader holding the old inode should see the new entry"
    );

    let said = run(&remove_args(&file, NAME));
    assert!(
        said.contains("removed"),
        "remove should say it removed the entry: {said}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        ORIGINAL,
        "remove should restore the exact bytes"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        inode,
        "remove should keep the inode"
    );
    let said = run(&remove_args(&file, NAME));
    assert!(
        said.contains("nothing to remove"),
        "a second remove should change nothing: {said}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), ORIGINAL);
}

fn fd_of(file: &std::fs::File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

#[test]
fn many_processes_at_once_leave_one_entry_per_name_and_an_intact_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = hosts_file(dir.path());
    let inode = std::fs::metadata(&file).unwrap().ino();

    // 16 processes race to add the same name, 16 more each add their own.
    let others: Vec<String> = (0..16).map(|i| format!("node-{i}.regproxy.test")).collect();
    let mut children: Vec<Child> = (0..16)
        .map(|_| spawn(&ensure_args(&file, NAME, "127.0.0.2")))
        .chain(
            others
                .iter()
                .map(|n| spawn(&ensure_args(&file, n, "127.0.0.3"))),
        )
        .collect();
    for child in children.drain(..) {
        ok(child.wait_with_output().unwrap());
    }
    let content = std::fs::read_to_string(&file).unwrap();
    assert!(
        content.starts_with(ORIGINAL),
        "the original lines should be untouched:\n{content}"
    );
    assert_eq!(
        content
            .matches(&format!("127.0.0.2 {NAME} # regproxy-managed"))
            .count(),
        1,
        "16 concurrent ensures of one name should leave exactly one entry:\n{content}"
    );
    for n in &others {
        assert_eq!(
            content
                .matches(&format!("127.0.0.3 {n} # regproxy-managed\n"))
                .count(),
            1,
            "{n} should have exactly one entry:\n{content}"
        );
    }
    assert_eq!(
        content.lines().count(),
        ORIGINAL.lines().count() + 17,
        "no line should be lost or torn:\n{content}"
    );

    // And all of them removed at once, plus ensures of the name that is
    // already there: the file goes back to what it was.
    let mut children: Vec<Child> = others
        .iter()
        .map(|n| spawn(&remove_args(&file, n)))
        .chain((0..8).map(|_| spawn(&ensure_args(&file, NAME, "127.0.0.2"))))
        .collect();
    for child in children.drain(..) {
        ok(child.wait_with_output().unwrap());
    }
    run(&remove_args(&file, NAME));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        ORIGINAL,
        "after every remove the file should be as before"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        inode,
        "the inode should never change"
    );
}

#[test]
fn ensure_waits_for_a_lock_held_on_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = hosts_file(dir.path());
    let holder = std::fs::File::open(&file).unwrap();
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();

    let child = spawn(&ensure_args(&file, NAME, "127.0.0.2"));
    // Once ensure has the file open it is at the lock; from then on the
    // holder keeps the lock for HOLD, which is the scenario, not a wait.
    const HOLD: Duration = Duration::from_millis(400);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_open(child.id(), Path::new(&file)) {
        assert!(Instant::now() < deadline, "ensure should open the file");
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = Instant::now();
    std::thread::sleep(HOLD);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        ORIGINAL,
        "ensure should not write while another process holds the lock"
    );
    drop(holder);
    ok(child.wait_with_output().unwrap());
    assert!(
        held.elapsed() >= HOLD,
        "ensure should have waited for the lock to be released"
    );
    assert!(
        std::fs::read_to_string(&file).unwrap().contains(NAME),
        "ensure should write once the lock is free"
    );
}

#[test]
fn an_entry_someone_else_wrote_is_a_clear_error_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hosts");
    let before = format!("127.0.0.1 localhost\n10.96.0.10 {NAME}\n");
    std::fs::write(&path, &before).unwrap();
    let out = regproxy(&[
        "hosts",
        "ensure",
        "--hosts-file",
        path.to_str().unwrap(),
        "--name",
        NAME,
        "--address",
        "127.0.0.2",
    ]);
    assert!(
        !out.status.success(),
        "a conflicting entry should fail the command"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2")
            && err.contains("10.96.0.10")
            && err.contains("not managed by regproxy"),
        "the error should say which line is in the way: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        before,
        "a refused ensure should not touch the file"
    );

    let out = regproxy(&[
        "hosts",
        "ensure",
        "--hosts-file",
        dir.path().join("missing").to_str().unwrap(),
        "--name",
        NAME,
        "--address",
        "127.0.0.2",
    ]);
    assert!(
        !out.status.success(),
        "a missing hosts file should be an error, not created"
    );
    let out = regproxy(&[
        "hosts",
        "ensure",
        "--hosts-file",
        path.to_str().unwrap(),
        "--name",
        "../etc",
        "--address",
        "127.0.0.2",
    ]);
    assert!(!out.status.success(), "a bad name should be refused");
}

#[test]
fn containerd_hosts_toml_is_written_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let certs = certs.to_str().unwrap();
    let ensure = [
        "hosts",
        "containerd",
        "ensure",
        "--certs-dir",
        certs,
        "--name",
        NAME,
        "--endpoint",
        "http://127.0.0.2:80",
        "--server",
        "http://10.96.0.20:5000",
    ];
    assert!(ok(regproxy(&ensure)).contains("added"));
    assert!(
        ok(regproxy(&ensure)).contains("already present"),
        "a second ensure should change nothing"
    );
    let toml =
        std::fs::read_to_string(dir.path().join("certs.d").join(NAME).join("hosts.toml")).unwrap();
    assert!(
        toml.contains("server = \"http://10.96.0.20:5000\""),
        "the fallback is the registry's own address, not the name (which leads to the proxy): {toml}"
    );
    assert!(toml.contains("[host.\"http://127.0.0.2:80\"]"), "{toml}");

    let remove = [
        "hosts",
        "containerd",
        "remove",
        "--certs-dir",
        certs,
        "--name",
        NAME,
    ];
    assert!(ok(regproxy(&remove)).contains("removed"));
    assert!(
        !dir.path().join("certs.d").join(NAME).exists(),
        "the folder should go with the file"
    );
    assert!(ok(regproxy(&remove)).contains("nothing to remove"));
}
