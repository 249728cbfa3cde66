//! The race that string checks lose: one thread keeps swapping `root/dir` between a real
//! directory (holding `secret` = "inside") and a symlink to a directory outside the root (holding
//! `secret` = "OUTSIDE"), while another opens "dir/secret". Through [`Root`] it must never read
//! "OUTSIDE". A deliberately naive resolver (canonicalize, check the prefix, then open by name)
//! runs against the same swapper and must escape at least once: otherwise the race was never
//! really run and the first result proves nothing. Bounded in time and iterations.

// Test fixtures and the naive resolver use std::fs on purpose.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fsd::fs::root::{FsError, Root};
use nix::fcntl::{self, OFlag, RenameFlags};
use nix::sys::stat::Mode;

/// Each race runs until whichever comes first.
const MAX_TIME: Duration = Duration::from_secs(3);
const MAX_ITERATIONS: u64 = 20_000;
/// The naive resolver gets this many races to escape before the test calls itself insensitive
/// (on a busy two-CPU machine one race of 20,000 opens sometimes sees no escape).
const NAIVE_ATTEMPTS: usize = 5;

/// tmp/root/dir (real, secret = "inside"), tmp/root/alt (symlink to tmp/outside), and
/// tmp/outside/secret = "OUTSIDE".
struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("dir")).unwrap();
        fs::write(root.join("dir/secret"), "inside").unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        fs::write(tmp.path().join("outside/secret"), "OUTSIDE").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("alt")).unwrap();
        Setup { tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }
}

/// What the opener saw over one race.
#[derive(Debug, Default)]
struct Tally {
    iterations: u64,
    inside: u64,
    outside: u64,
    refused: u64,
}

/// Runs `open` ("dir/secret", returning its text or None when refused) against a thread that
/// keeps exchanging root/dir and root/alt (renameat2 RENAME_EXCHANGE: the name "dir" always
/// exists, as a directory or as the symlink out).
fn race(setup: &Setup, mut open: impl FnMut() -> Option<String>) -> Tally {
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let dirfd: OwnedFd = fcntl::open(
        &setup.root(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                fcntl::renameat2(&dirfd, "dir", &dirfd, "alt", RenameFlags::RENAME_EXCHANGE)
                    .unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut tally = Tally::default();
    let start = Instant::now();
    while tally.iterations < MAX_ITERATIONS && start.elapsed() < MAX_TIME {
        tally.iterations += 1;
        match open().as_deref() {
            Some("inside") => tally.inside += 1,
            Some("OUTSIDE") => tally.outside += 1,
            Some(other) => panic!("read {other:?}"),
            None => tally.refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(swaps.load(Ordering::Relaxed) > 0, "the swapper never ran");
    tally
}

/// Runs [`race`] until one run saw both sides of the swap (a success and a refusal), at most
/// three times: under load the two threads can fall into step and sample one side for a whole
/// run (seen on two busy CPUs). Returns every run's tally.
fn race_both_sides(setup: &Setup, mut open: impl FnMut() -> Option<String>) -> Vec<Tally> {
    let mut tallies = Vec::new();
    for _ in 0..3 {
        let tally = race(setup, &mut open);
        eprintln!("{tally:?}");
        let both = tally.inside > 0 && tally.refused > 0;
        tallies.push(tally);
        if both {
            return tallies;
        }
    }
    panic!("the race never saw both sides of the swap: {tallies:?}");
}

fn read_all(mut file: fs::File) -> String {
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    text
}

/// The resolver this project must not have: a string check, then an open by name. `root` is
/// canonical already, as a server would make it once at startup.
fn naive_open(root: &Path, path: &str) -> Option<String> {
    let full = root.join(path);
    let resolved = full.canonicalize().ok()?;
    if !resolved.starts_with(root) {
        return None;
    }
    fs::File::open(&full).ok().map(read_all)
}

fn outside_unchanged(setup: &Setup) {
    let names: Vec<_> = fs::read_dir(setup.outside())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"]);
    assert_eq!(
        fs::read_to_string(setup.outside().join("secret")).unwrap(),
        "OUTSIDE"
    );
}

#[test]
fn root_never_reads_outside_while_a_naive_resolver_does() {
    let setup = Setup::new();
    let root = Root::open(&setup.root(), None).unwrap();

    let confined = race_both_sides(&setup, || match root.open_read("dir/secret") {
        Ok((file, _)) => Some(read_all(file)),
        Err(FsError::Escapes { .. }) => None,
        Err(e) => panic!("unexpected refusal: {e}"),
    });
    assert!(
        confined.iter().all(|t| t.outside == 0),
        "Root read outside the root: {confined:?}"
    );

    let canonical_root = setup.root().canonicalize().unwrap();
    let mut escapes = Vec::new();
    for _ in 0..NAIVE_ATTEMPTS {
        let naive = race(&setup, || naive_open(&canonical_root, "dir/secret"));
        eprintln!("naive resolver: {naive:?}");
        escapes.push(naive.outside);
        if naive.outside > 0 {
            break;
        }
    }
    assert!(
        escapes.iter().any(|&n| n > 0),
        "the naive resolver never escaped ({escapes:?}): this race cannot tell good from bad"
    );
    outside_unchanged(&setup);
}

/// The same race against the write side: mkdir and remove of "dir/made" act on a parent opened
/// beneath the root, so nothing is ever created or removed outside.
#[test]
fn writes_never_land_outside_during_the_race() {
    let setup = Setup::new();
    let root = Root::open(&setup.root(), None).unwrap();
    let planted = setup.outside().join("made");
    race_both_sides(&setup, || {
        let made = root.mkdir("dir/made", false, 0o755);
        assert!(
            fs::symlink_metadata(&planted).is_err(),
            "mkdir landed outside"
        );
        match made {
            Ok(()) => {
                // The directory may have been swapped out of the way since: then "dir/made"
                // is refused and the one made stays in the real directory, for AlreadyExists.
                let _ = root.remove("dir/made", false);
                Some("inside".to_string())
            }
            Err(FsError::Escapes { .. }) => None,
            Err(FsError::AlreadyExists { .. }) => Some("inside".to_string()),
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    });
    outside_unchanged(&setup);
}
