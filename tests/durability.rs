//! Crash safety by syscall order (SECURITY.md): publishing an upload must make the data durable,
//! then give it the final name, then make the name durable (fsync, rename, fsync of the directory;
//! for a single-chunk upload syncfs, linkat, syncfs). Checked on the real fsd under strace.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Command;

use common::*;

/// Uploads a random file of `size` bytes as `name` to an fsd traced for `calls`; returns the
/// trace lines (None where strace cannot run here) and the root.
fn traced_upload(
    size: usize,
    name: &str,
    calls: &str,
) -> Option<(Vec<String>, std::path::PathBuf, tempfile::TempDir)> {
    // Needs strace and permission to ptrace (some containers forbid it).
    if !Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: strace missing or ptrace not permitted (apt-get install strace)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let log = dir.path().join("strace.log");
    // Attach to a running fsd rather than start it under strace: a tracee forked by strace
    // would outlive a killed strace as an orphan.
    let s = Fsd::start_on(&root, &[]);
    let mut tracer = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", &format!("trace={calls}"), "-o"])
        .arg(&log)
        .args(["-p", &s.pid().to_string()])
        .spawn()
        .unwrap();
    // strace writes nothing until a traced call happens; give the attach a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    write_random(&src, size, 70);
    fsc_ok(&["-q", "upload", &s.addr(), src.to_str().unwrap(), name]);
    assert_same_file(&src, &root.join(name));
    let _ = tracer.kill();
    let _ = tracer.wait();
    drop(s);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines = text
        .lines()
        .filter(|l| !l.contains("unfinished"))
        .map(str::to_owned)
        .collect();
    Some((lines, root, dir))
}

#[test]
fn publish_syncs_data_then_renames_then_syncs_the_directory() {
    let Some((lines, root, _dir)) = traced_upload(
        3 << 20,
        "published.bin",
        "fsync,fdatasync,rename,renameat,renameat2",
    ) else {
        return;
    };
    let text = lines.join("\n");
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

/// A single-chunk upload shares its syncs with concurrent commits (syncfs) and is linked into
/// place from an anonymous file: sync, link, sync.
#[test]
fn single_chunk_publish_syncs_then_links_then_syncs() {
    let Some((lines, _root, _dir)) = traced_upload(
        4096,
        "small.bin",
        "fsync,fdatasync,syncfs,linkat,rename,renameat,renameat2",
    ) else {
        return;
    };
    let text = lines.join("\n");
    let link = lines
        .iter()
        .position(|l| {
            l.starts_with(|c: char| c.is_ascii_digit())
                && l.contains("linkat(")
                && l.contains("\"small.bin\"")
                && l.ends_with("= 0")
        })
        .unwrap_or_else(|| panic!("no link onto the final name in:\n{text}"));
    let synced = |l: &String| l.contains("syncfs(") && l.ends_with("= 0");
    assert!(
        lines[..link].iter().any(synced),
        "data not synced before the link:\n{text}"
    );
    assert!(
        lines[link + 1..].iter().any(synced),
        "name not synced after the link:\n{text}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("rename")),
        "a fresh name needs no rename:\n{text}"
    );
}
