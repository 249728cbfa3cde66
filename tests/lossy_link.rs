//! `-j auto` on a real long, lossy link (issue 15): two network namespaces joined by the
//! user-space link emulator (`scripts/wanlink.sh`: 50 ms RTT, 1 Gbit/s, a one-BDP queue), fsd
//! in one, fsc in the other. Where the link cannot be made (not root, no TUN, no
//! `../shared/wan`) the test prints SKIPPED with the reason.
//!
//! Its own test binary: nothing else runs beside it, so the emulator has its core.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const NET: &str = "10.81.0";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/wanlink.sh")
}

/// The link, removed when dropped.
struct Link(&'static str);

impl Link {
    /// `Err(reason)` where this machine cannot make it.
    fn up(name: &'static str, loss_s2c: &str, loss_c2s: &str) -> Result<Link, String> {
        let out = Command::new("bash")
            .arg(script())
            .args(["up", name, NET, loss_s2c, loss_c2s])
            .env("WANEM_MAX_SECS", "300")
            .output()
            .unwrap();
        match out.status.code() {
            Some(0) => Ok(Link(name)),
            Some(77) => Err(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            _ => panic!("wanlink.sh up failed: {out:?}"),
        }
    }

    fn server_ns(&self) -> String {
        format!("{}_s", self.0)
    }

    fn client_ns(&self) -> String {
        format!("{}_c", self.0)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", self.0])
            .status();
    }
}

/// fsc in the client namespace with `-j auto` (the default) logging its growth; its stderr.
fn fsc_over(link: &Link, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &link.client_ns()])
        .arg(fsc_bin())
        .args(args)
        .env("FSC_TOKEN", TOKEN)
        .env("RUST_LOG", "fsc::grow=debug")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{out:?}");
    log
}

/// With 1 % of packets lost at random both ways, the first connection sees losses while the
/// queue is empty and the run goes to four connections at once — downloads and uploads; the
/// files arrive intact. On the same link without loss the first connection, held by its send
/// buffer, never fills the queue: no such start (it grows one at a time, as before). Before
/// the lossy start, runs under loss added one connection per phase (the log never said it).
#[test]
fn j_auto_starts_with_several_connections_where_the_path_loses_packets_at_random() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    write_random(&root.join("f.bin"), 48 << 20, 11);
    let dest = dir.path().join("d.bin");
    let dest = dest.to_str().unwrap();
    let lossy = "random loss on the path";

    let link = match Link::up("fslossy", "0.01", "0.01") {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let listen = format!("{NET}.1:9000");
    let ns = link.server_ns();
    let s = Fsd::start_wrapped_on(&["ip", "netns", "exec", &ns], &root, &listen);
    let log = fsc_over(&link, &["download", "-q", &listen, "f.bin", dest]);
    assert_same_file(&root.join("f.bin"), Path::new(dest));
    assert!(log.contains(lossy), "download: {log}");
    let down = s.connections();
    assert!(down >= 4, "{down} connections: {}", s.log_text());
    let log = fsc_over(&link, &["upload", "-q", &listen, dest, "up.bin"]);
    assert_same_file(&root.join("f.bin"), &root.join("up.bin"));
    assert!(log.contains(lossy), "upload: {log}");
    assert!(s.connections() - down >= 4, "{}", s.log_text());
    drop(s);
    drop(link);

    let link = Link::up("fslossy", "0", "0").expect("the link came up a moment ago");
    let s = Fsd::start_wrapped_on(&["ip", "netns", "exec", &ns], &root, &listen);
    std::fs::remove_file(dest).unwrap();
    let log = fsc_over(&link, &["download", "-q", &listen, "f.bin", dest]);
    assert_same_file(&root.join("f.bin"), Path::new(dest));
    assert!(!log.contains(lossy), "no loss, download: {log}");
    let log = fsc_over(&link, &["upload", "-q", &listen, dest, "up2.bin"]);
    assert_same_file(&root.join("f.bin"), &root.join("up2.bin"));
    assert!(!log.contains(lossy), "no loss, upload: {log}");
    drop(s);
}
