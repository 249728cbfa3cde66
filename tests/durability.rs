//! Crash safety by syscall order (SECURITY.md): publishing an upload must fsync the data, then
//! rename it onto the final name, then fsync the directory. Checked on the real fsd under strace.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn publish_syncs_data_then_renames_then_syncs_the_directory() {
    // Needs strace and permission to ptrace (some containers forbid it).
    if !Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: strace missing or ptrace not permitted (apt-get install strace)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let log = dir.path().join("strace.log");
    // Attach to a running fsd rather than start it under strace: a tracee forked by strace
    // would outlive a killed strace as an orphan.
    let s = Fsd::start_on(&root, &[]);
    let mut tracer = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&log)
        .args(["-p", &s.pid().to_string()])
        .spawn()
        .unwrap();
    // strace writes nothing until a traced call happens; give the attach a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    write_random(&src, 3 << 20, 70);
    fsc_ok(&[
        "-q",
        "upload",
        &s.addr(),
        src.to_str().unwrap(),
        "published.bin",
    ]);
    assert_same_file(&src, &root.join("published.bin"));
    let _ = tracer.kill();
    let _ = tracer.wait();
    drop(s);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("unfinished")).collect();
    let find = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let rename =
        find(&|l| l.contains("rename") && l.contains(".data") && l.contains("published.bin"))
            .unwrap_or_else(|| panic!("no rename onto the final name in:\n{text}"));
    let data_sync = lines[..rename].iter().rposition(|l| {
        (l.contains("fsync(") || l.contains("fdatasync("))
            && l.contains(".data>")
            && l.ends_with("= 0")
    });
    assert!(
        data_sync.is_some(),
        "data file not synced before the rename:\n{text}"
    );
    let root_name = root.canonicalize().unwrap();
    let dir_sync = lines[rename + 1..].iter().any(|l| {
        l.contains("fsync(")
            && l.contains(&format!("<{}>", root_name.display()))
            && l.ends_with("= 0")
    });
    assert!(dir_sync, "directory not synced after the rename:\n{text}");
}
