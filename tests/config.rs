//! fsd refuses unsafe configurations at start, with a message naming what is wrong: state
//! directories clients could reach, ambiguous or weak credentials, metrics open to the network.
#![allow(clippy::disallowed_methods)] // test fixtures: the tests' own temp files

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `fsd --root ROOT --listen 127.0.0.1:0 ARGS` with `env`, expecting it to refuse to
/// start: returns its stderr. Panics if it fails to exit nonzero within 10 s.
fn refused(root: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(fsd_bin())
        .arg("--root")
        .arg(root)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("FSD_TOKEN")
        .env_remove("FSD_METRICS_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fsd");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    match status {
        Some(s) if !s.success() => err,
        _ => panic!("fsd {args:?} {env:?} started (status {status:?}); stderr:\n{err}"),
    }
}

fn assert_says(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "stderr lacks {w:?}:\n{err}");
    }
}

fn mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ---- item 12: credentials ----

#[test]
fn empty_or_short_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = refused(dir.path(), &["--token", ""], &[]);
    assert_says(&e, &["--token", "empty token"]);
    let e = refused(dir.path(), &["--token", "0123456789abcde"], &[]);
    assert_says(&e, &["--token", "shorter than 16 bytes"]);
    let e = refused(dir.path(), &[], &[("FSD_TOKEN", "")]);
    assert_says(&e, &["FSD_TOKEN", "empty token"]);
    let e = refused(dir.path(), &[], &[("FSD_TOKEN", "short")]);
    assert_says(&e, &["FSD_TOKEN", "shorter than 16 bytes"]);
}

#[test]
fn ambiguous_token_file_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tokens = dir.path().join("tokens");
    let file = tokens.to_str().unwrap();
    let cases = [
        // The same name twice would give both lines the same uploads (issue 13, item 2).
        (
            "a 0123456789abcdef0 rw pa\na 1123456789abcdef0 rw pb\n",
            "line 2: same name as line 1",
        ),
        (
            "a 0123456789abcdef0 rw\nb 0123456789abcdef0 read\n",
            "line 2: same token as line 1",
        ),
        (
            "# ops\na 0123456789abcdef0 rw pub#2\n",
            "line 2: `#` inside a field",
        ),
        (
            "a 0123456789abcdef0 rw /srv\n",
            "line 1: prefix \"/srv\" is absolute",
        ),
        (
            "a 0123456789abcdef0 rw x/../y\n",
            "line 1: prefix \"x/../y\" has a `.` or `..`",
        ),
        (
            "a 0123456789abcdef0 rw .fsd-state/u\n",
            "names the state directory",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&tokens, text).unwrap();
        mode(&tokens, 0o600);
        let e = refused(&root, &["--token-file", file], &[]);
        assert_says(&e, &[file, want]);
    }
}

#[test]
fn token_file_open_to_others_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("a {TOKEN} rw\n")).unwrap();
    let warning = "is accessible by group or others";
    for (m, warned) in [(0o600, false), (0o640, true), (0o604, true)] {
        mode(&tokens, m);
        let s = Fsd::start_on(&root, &["--token-file", tokens.to_str().unwrap()]);
        let log = s.log_text();
        assert_eq!(log.contains(warning), warned, "mode {m:o}:\n{log}");
    }
}

// ---- item 11: the state directory ----

#[test]
fn state_dir_clients_could_reach_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().canonicalize().unwrap();
    let root = top.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir(top.join("out")).unwrap();
    std::os::unix::fs::symlink(root.join("sub"), top.join("out/link")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases = [
        (s(&root.join("sub/state")), "is inside the root"),
        (s(&root.join("sub/.fsd-state")), "is inside the root"),
        (s(&root.join("sub/../sub/state")), "is inside the root"),
        // Through a symlink outside the root that leads back in.
        (s(&top.join("out/link/state")), "is inside the root"),
        (s(&root), "is the root"),
        (s(&root.join(".")), "is the root"),
        (s(&top), "holds the root"),
    ];
    for (state, why) in &cases {
        let e = refused(&root, &["--state-dir", state], &[]);
        assert_says(&e, &["--state-dir", state, why]);
    }
    // Refused before anything was created: the root holds only what the test made.
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["sub"]);
    assert_eq!(std::fs::read_dir(root.join("sub")).unwrap().count(), 0);

    // The default name, but a symlink to elsewhere in the root.
    let root2 = top.join("root2");
    std::fs::create_dir_all(root2.join("pub")).unwrap();
    std::os::unix::fs::symlink("pub", root2.join(".fsd-state")).unwrap();
    let e = refused(&root2, &[], &[]);
    assert_says(&e, &["root2/pub) is inside the root"]);
}

#[test]
fn state_dir_outside_the_root_or_the_hidden_default_starts() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path();
    let root = top.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"x").unwrap();
    let outside = top.join("state");
    let hidden = root.join(".fsd-state");
    for state in [&outside, &hidden] {
        let s = Fsd::start_on(&root, &["--state-dir", state.to_str().unwrap()]);
        assert!(state.join("uploads").is_dir(), "{}", s.log_text());
        // It serves: a STAT of the root's file answers.
        let mut c = Raw::authed(s.addr);
        let r = c.call(
            fsd::protocol::Cmd::STAT,
            1,
            &fsd::protocol::msg::StatRequest { path: "f".into() },
        );
        assert!(!r.header.is_error(), "{:?}", error_of(&r));
        let st: fsd::protocol::msg::StatResponse = prost::Message::decode(r.payload).unwrap();
        assert_eq!(st.entry.unwrap().size, 1);
    }
}

// ---- item 13: metrics ----

#[test]
fn public_metrics_need_a_token_or_metrics_public() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let t = ["--token", TOKEN];
    let e = refused(root, &[&t[..], &["--metrics", "0.0.0.0:0"]].concat(), &[]);
    assert_says(
        &e,
        &[
            "0.0.0.0:0 is not a loopback address",
            "--metrics-token",
            "--metrics-public",
        ],
    );
    let e = refused(
        root,
        &[&t[..], &["--metrics", "127.0.0.1:0"]].concat(),
        &[("FSD_METRICS_TOKEN", "short")],
    );
    assert_says(&e, &["FSD_METRICS_TOKEN", "shorter than 16 bytes"]);

    let warning = "--metrics-public: metrics on 0.0.0.0:0 without a token";
    let s = Fsd::start_on(root, &["--metrics", "0.0.0.0:0", "--metrics-public"]);
    assert!(s.log_text().contains(warning), "{}", s.log_text());
    let s = Fsd::start_on(
        root,
        &[
            "--metrics",
            "0.0.0.0:0",
            "--metrics-token",
            "metrics-0123456789abcdef",
        ],
    );
    assert!(!s.log_text().contains(warning), "{}", s.log_text());
    // Loopback needs neither.
    let s = Fsd::start_on(root, &["--metrics", "127.0.0.1:0"]);
    assert!(
        !s.log_text().contains("--metrics-public"),
        "{}",
        s.log_text()
    );
}
