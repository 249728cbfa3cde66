//! Upload locks that a dead node cannot hold forever.
//!
//! A resumable upload is held by one fsd process at a time through `flock` on `<id>.lock` in the
//! shared state directory. A process that dies releases it at once; but when a whole node dies
//! (or hangs, or loses its network), the shared file system may keep that node's session, and so
//! its flock, for as long as it likes (MooseFS: a day). So the holder also renews a lease, the
//! lock file's mtime, every quarter of `--upload-lease`; a lock whose lease is older than that is
//! taken over:
//!
//! 1. The taker creates `<id>.takeover.<ino>-<mtime_ns>` of the stale lock file with O_EXCL: of
//!    several nodes trying, exactly one gets it (the others answer Busy). A lease renewed since
//!    has another mtime, so a marker never blocks a later, legitimate takeover.
//! 2. It creates a fresh lock file under a private name, flocks and stamps it, and renames it
//!    over `<id>.lock`.
//! 3. The old holder, if it was only slow, sees at its next renewal (and before it publishes)
//!    that `<id>.lock` no longer names its file, and gives the upload up.
//!
//! Step 3 comes late for a holder that was stopped or starved: when it wakes, requests already
//! queued for it run before its renewal does. So a holder also fences itself: it touches the
//! upload only while its last successful renewal is younger than half the lease, by its own
//! boot clock ([`Lease::is_fresh`]). A taker waits a whole lease from that renewal's stamp, so
//! the other half is the margin for clock skew between the nodes and for the step that follows
//! the check. And the taker copies the upload into new files (fs::upload), so even a write the
//! old holder makes after all lands in files nobody publishes.
//!
//! The lease compares wall clocks of different nodes (the mtime is stamped by the holder's
//! clock): nodes must agree within a small part of the lease (NTP does).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// Default `--upload-lease`.
pub const UPLOAD_LEASE: Duration = Duration::from_secs(30);

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum Refused {
    /// Another live process holds it (or is taking it over).
    Busy,
    Io(io::Error),
}

impl From<io::Error> for Refused {
    fn from(e: io::Error) -> Refused {
        Refused::Io(e)
    }
}

/// A held upload lock.
pub struct Lease {
    lock: Flock<File>,
    path: PathBuf,
    ino: u64,
    /// How long the lease lasts (`--upload-lease`).
    term: Duration,
    /// [`boot_clock`] right before the last successful stamp: never later than the mtime the
    /// stamp set, which is what a taker measures from.
    stamped: Mutex<Duration>,
    /// Taken over from a holder whose lease ran out (that holder may still have the upload's
    /// files open).
    taken_over: bool,
}

impl Lease {
    /// Takes `<id>.lock` in `dir`, or takes it over if its holder's lease (`lease`) ran out.
    /// `tries` nonblocking attempts 50 ms apart (a handle of this process may be releasing it).
    pub fn acquire(dir: &Path, id: &str, lease: Duration, tries: u32) -> Result<Lease, Refused> {
        let path = dir.join(format!("{id}.lock"));
        // A takeover renames a new file over the name between our open and our flock: then
        // the file we locked is no longer the lock; try again (a couple of times at most).
        for _ in 0..3 {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            let mut file = file;
            let mut left = tries.max(1);
            let locked = loop {
                match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(l) => break Ok(l),
                    Err((f, _)) if left > 1 => {
                        left -= 1;
                        file = f;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err((f, _)) => break Err(f),
                }
            };
            match locked {
                Ok(lock) => {
                    let ino = lock.metadata()?.ino();
                    if names(&path, ino) {
                        return Ok(Lease::stamped(lock, path, ino, lease, false)?);
                    }
                }
                Err(held) => {
                    let meta = held.metadata()?;
                    let age = meta
                        .modified()
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .unwrap_or(Duration::ZERO);
                    if age < lease {
                        return Err(Refused::Busy);
                    }
                    return take_over(dir, id, &path, &meta, lease);
                }
            }
        }
        Err(Refused::Busy)
    }

    /// A lease on `lock`, stamped now.
    fn stamped(
        lock: Flock<File>,
        path: PathBuf,
        ino: u64,
        term: Duration,
        taken_over: bool,
    ) -> io::Result<Lease> {
        let lease = Lease {
            lock,
            path,
            ino,
            term,
            stamped: Mutex::new(Duration::ZERO),
            taken_over,
        };
        lease.stamp()?;
        Ok(lease)
    }

    /// Renews the lease. False if the lock was taken over (the upload is no longer ours).
    pub fn renew(&self) -> io::Result<bool> {
        if !self.is_ours() {
            return Ok(false);
        }
        self.stamp()?;
        Ok(true)
    }

    /// Whether `<id>.lock` still names the file this lease holds.
    pub fn is_ours(&self) -> bool {
        names(&self.path, self.ino)
    }

    /// Whether the last renewal is recent enough for this holder to act: younger than half the
    /// lease (module comment). False once renewals stop, whatever the file system says.
    pub fn is_fresh(&self) -> bool {
        boot_clock().saturating_sub(*self.stamped.lock().unwrap()) < self.term / 2
    }

    /// [`Lease::is_fresh`], or made so: a renewal that is late (past half the lease, since the
    /// node's renewal pass waited behind other work) but still within the lease, of a lock
    /// still ours, is done right here. Past the whole lease another node may be taking the
    /// upload over: false then.
    pub fn catch_up(&self) -> bool {
        if self.is_fresh() {
            return true;
        }
        let since = boot_clock().saturating_sub(*self.stamped.lock().unwrap());
        since < self.term && self.renew().unwrap_or(false)
    }

    /// Whether this lock was taken over from a holder whose lease ran out.
    pub fn taken_over(&self) -> bool {
        self.taken_over
    }

    fn stamp(&self) -> io::Result<()> {
        let before = boot_clock();
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        nix::sys::stat::futimens(&*self.lock, &now, &now).map_err(io::Error::from)?;
        *self.stamped.lock().unwrap() = before;
        Ok(())
    }
}

/// Time since boot, on a clock that never goes back and, unlike `Instant`, keeps counting while
/// the machine is suspended: a node that slept past its lease must see that it did.
fn boot_clock() -> Duration {
    // Cannot fail on Linux (CLOCK_BOOTTIME is there since 2.6.39).
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    Duration::from(now)
}

/// Whether `path` names inode `ino` (a lock file replaced by a takeover does not).
fn names(path: &Path, ino: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.ino() == ino)
}

/// Takes a lock whose holder stopped renewing it (module comment, steps 1 and 2).
fn take_over(
    dir: &Path,
    id: &str,
    path: &Path,
    stale: &std::fs::Metadata,
    term: Duration,
) -> Result<Lease, Refused> {
    let stamp = stale.mtime() * 1_000_000_000 + stale.mtime_nsec();
    let marker = dir.join(format!("{id}.takeover.{:x}-{stamp}", stale.ino()));
    match File::options().write(true).create_new(true).open(&marker) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(Refused::Busy),
        Err(e) => return Err(e.into()),
    }
    let fresh = dir.join(format!("{id}.lock.{}", super::private_suffix()));
    let file = File::options().write(true).create_new(true).open(&fresh)?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| Refused::Io(e.into()))?;
    let ino = lock.metadata()?.ino();
    let lease = Lease::stamped(lock, path.to_path_buf(), ino, term, true)?;
    if let Err(e) = std::fs::rename(&fresh, path) {
        let _ = std::fs::remove_file(&fresh);
        return Err(e.into());
    }
    tracing::warn!(
        upload = id,
        "took over an upload whose holder stopped renewing its lease (a dead or hung node)"
    );
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_is_busy_until_it_runs_out_then_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lease::acquire(dir.path(), "u", Duration::from_secs(60), 1).unwrap();
        assert!(!first.taken_over());
        assert!(matches!(
            Lease::acquire(dir.path(), "u", Duration::from_secs(60), 1),
            Err(Refused::Busy)
        ));
        // The holder stops renewing: its stamp ages past a short lease.
        std::thread::sleep(Duration::from_millis(1100));
        let second = Lease::acquire(dir.path(), "u", Duration::from_secs(1), 1).unwrap();
        assert!(second.is_ours());
        assert!(second.taken_over());
        assert!(!first.is_ours());
        assert!(
            !first.renew().unwrap(),
            "the old holder learns it lost the lock"
        );
        // A third node that saw the same stale lock cannot take it again; the new holder's
        // fresh stamp keeps everyone else out.
        assert!(matches!(
            Lease::acquire(dir.path(), "u", Duration::from_secs(1), 1),
            Err(Refused::Busy)
        ));
        drop(second);
        // Released: taken normally.
        let third = Lease::acquire(dir.path(), "u", Duration::from_secs(60), 1).unwrap();
        assert!(third.is_ours());
    }

    #[test]
    fn a_holder_fences_itself_once_half_its_lease_passed_without_a_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let held = Lease::acquire(dir.path(), "u", Duration::from_secs(1), 1).unwrap();
        assert!(held.is_fresh());
        std::thread::sleep(Duration::from_millis(600));
        assert!(!held.is_fresh(), "no renewal for over half the lease");
        assert!(held.renew().unwrap());
        assert!(held.is_fresh());
    }
}
