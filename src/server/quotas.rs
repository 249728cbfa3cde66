//! What one credential may hold at once, and the server's file descriptors.
//!
//! Every credential is an [`Account`] with limits on connections and open handles (its
//! unfinished uploads and the bytes they declare are counted by the upload store, which alone
//! knows them across restarts). The limits have defaults derived from the server's capacity —
//! with more than one credential, none may take more than half of any of it — and per-line
//! overrides in the token file. File descriptors are a server-wide budget taken by every
//! connection and handle, so running out is a clear LimitExceeded, never a client left hanging.
//! A handle holds from one descriptor (a read) to 1025 (a TREE_WRITE), so counting handles does
//! not keep a credential from that budget: each account also has a share of the descriptors,
//! charged by what its handles hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::Failure;
use crate::protocol::ErrorCode;

/// Descriptors kept out of the budget for everything else the server opens for a moment
/// (directories while resolving paths, listings, manifests, the state directory, logs).
pub const FD_RESERVE: usize = 256;
/// Descriptors a handle may hold: an upload has its data (twice, for direct I/O), its log, its
/// sums, its lock; a read handle its file.
pub const FDS_PER_UPLOAD: u32 = 5;
pub const FDS_PER_READ: u32 = 1;

/// Default of [`Limits::uploads`].
pub const DEFAULT_UPLOADS: u64 = 1024;

/// Per-credential limits; 0 in a token-file override means "the default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    pub handles: usize,
    /// Unfinished resumable uploads (on disk, across restarts).
    pub uploads: u64,
    /// Sum of the declared sizes of those uploads.
    pub upload_bytes: u64,
}

/// One credential's usage.
pub struct Account {
    pub name: String,
    pub limits: Limits,
    /// Most descriptors its handles may hold at once: its share of the server's budget.
    fd_share: usize,
    /// Its share of the blocking pool: file-system work beyond it waits (without a thread),
    /// so one credential's slow work (manifests of big files, resumes) cannot queue the
    /// others' behind it.
    blocking: Arc<Semaphore>,
    /// With several credentials, its manifest fetches (a read and hash of a whole file) go
    /// one at a time: the hashing of every fetch shares one thread pool chunk by chunk, so a
    /// credential fetching eight at once had eight turns for the other's one (another
    /// credential's OPEN of a big file 0.15 -> 0.90 s; RENAME makes any file need a new one).
    hashing: Option<Mutex<()>>,
    /// Bytes of received DATA all its connections may have waiting to be stored
    /// ([`inbound_budgets`]): beyond, its connections stop reading their sockets.
    inbound: Arc<Semaphore>,
    connections: AtomicUsize,
    handles: AtomicUsize,
    fds: AtomicUsize,
}

/// A connection or a handle counted against its account (and the descriptors it holds against
/// the account's share and the server's budget) until dropped.
pub struct Held {
    account: Arc<Account>,
    kind: Kind,
    /// Descriptors charged to the account's share.
    fds: usize,
    _permit: Option<OwnedSemaphorePermit>,
}

enum Kind {
    Connection,
    Handle,
}

impl Account {
    /// `shared`: other credentials exist (then manifest fetches go one at a time).
    /// `inbound`: bytes of received DATA its connections may hold at once (at least one).
    pub fn new(
        name: &str,
        limits: Limits,
        fd_share: usize,
        blocking: usize,
        shared: bool,
        inbound: usize,
    ) -> Arc<Account> {
        Arc::new(Account {
            name: name.to_string(),
            limits,
            fd_share,
            blocking: Arc::new(Semaphore::new(blocking.max(1))),
            hashing: shared.then(|| Mutex::new(())),
            inbound: Arc::new(Semaphore::new(inbound.max(1))),
            connections: AtomicUsize::new(0),
            handles: AtomicUsize::new(0),
            fds: AtomicUsize::new(0),
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Relaxed)
    }

    /// Descriptors its handles hold.
    pub fn fds(&self) -> usize {
        self.fds.load(Ordering::Relaxed)
    }

    /// A place in this credential's share of the blocking pool, waited for; held while a
    /// blocking job of this credential runs.
    pub async fn blocking_slot(&self) -> OwnedSemaphorePermit {
        self.blocking
            .clone()
            .acquire_owned()
            .await
            .expect("the blocking share is never closed")
    }

    /// This credential's turn to fetch a manifest (see `hashing`), waited for on the blocking
    /// thread that fetches; None when it is the only credential.
    pub fn hashing_turn(&self) -> Option<MutexGuard<'_, ()>> {
        self.hashing
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// This credential's budget for received DATA ([`inbound_budgets`]).
    pub fn inbound(&self) -> &Arc<Semaphore> {
        &self.inbound
    }

    /// Counts an authenticated connection, or refuses it over the quota.
    pub fn connect(self: &Arc<Account>) -> Result<Held, Failure> {
        take(&self.connections, 1, self.limits.connections).map_err(|n| {
            Failure::new(
                ErrorCode::LimitExceeded,
                format!("credential {:?} has {n} connections, its quota", self.name),
            )
        })?;
        Ok(Held {
            account: self.clone(),
            kind: Kind::Connection,
            fds: 0,
            _permit: None,
        })
    }

    /// Counts a handle holding `n` descriptors, or refuses it over the credential's handle
    /// quota, its share of the descriptors, or the server's descriptors.
    pub fn open_handle(self: &Arc<Account>, fds: &Arc<Semaphore>, n: u32) -> Result<Held, Failure> {
        let refused = |m: String| Failure::new(ErrorCode::LimitExceeded, m);
        take(&self.handles, 1, self.limits.handles).map_err(|h| {
            refused(format!(
                "credential {:?} has {h} open handles, its quota",
                self.name
            ))
        })?;
        // From here on, dropping `held` gives back what was taken.
        let mut held = Held {
            account: self.clone(),
            kind: Kind::Handle,
            fds: 0,
            _permit: None,
        };
        let want = usize::try_from(n).expect("u32 fits usize");
        take(&self.fds, want, self.fd_share).map_err(|d| {
            refused(format!(
                "credential {:?}'s handles hold {d} of its {} descriptors; this one needs {n}",
                self.name, self.fd_share
            ))
        })?;
        held.fds = want;
        let permit = fds
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| refused("server out of file descriptors; try again later".into()))?;
        held._permit = Some(permit);
        Ok(held)
    }
}

/// Bytes of received DATA (WRITE, PUT and TREE_WRITE payloads waiting to be stored) the whole
/// server may hold, and one credential of it: as many frames as the blocking threads (or the
/// credential's share of them, see `blocking`) can store at once, but at least `per_connection`
/// (the budget of one connection, itself at least one frame). More waiting data would not store
/// any faster, only take memory; a connection that finds no room stops reading its socket.
/// Returns (server-wide, per credential).
pub fn inbound_budgets(
    blocking_threads: usize,
    blocking_share: usize,
    max_frame: u32,
    per_connection: u32,
) -> (usize, usize) {
    let frame = usize::try_from(max_frame).expect("u32 fits usize");
    let least = usize::try_from(per_connection.max(max_frame)).expect("u32 fits usize");
    let of = |threads: usize| threads.max(1).saturating_mul(frame).max(least);
    (of(blocking_threads), of(blocking_share))
}

/// Adds `n` to `count` unless that would pass `limit`; Err(count) then.
fn take(count: &AtomicUsize, n: usize, limit: usize) -> Result<(), usize> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            c.checked_add(n).filter(|&sum| sum <= limit)
        })
        .map(|_| ())
}

impl Drop for Held {
    fn drop(&mut self) {
        let a = &self.account;
        match self.kind {
            Kind::Connection => a.connections.fetch_sub(1, Ordering::AcqRel),
            Kind::Handle => a.handles.fetch_sub(1, Ordering::AcqRel),
        };
        a.fds.fetch_sub(self.fds, Ordering::AcqRel);
    }
}

/// Every credential's account, by name (names are unique: the token file refuses duplicates).
#[derive(Default)]
pub struct Accounts {
    by_name: HashMap<String, Arc<Account>>,
}

impl Accounts {
    pub fn new(accounts: impl IntoIterator<Item = Arc<Account>>) -> Accounts {
        Accounts {
            by_name: accounts.into_iter().map(|a| (a.name.clone(), a)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Account>> {
        self.by_name.get(name)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_count_and_give_back() {
        let limits = Limits {
            connections: 2,
            handles: 1,
            uploads: 1,
            upload_bytes: 1,
        };
        let a = Account::new("a", limits, 5, 1, true, 1);
        let fds = Arc::new(Semaphore::new(5));
        let c1 = a.connect().unwrap();
        let _c2 = a.connect().unwrap();
        assert!(a.connect().is_err());
        drop(c1);
        assert!(a.connect().is_ok());
        let h = a.open_handle(&fds, 4).unwrap();
        assert!(a.open_handle(&fds, 1).is_err(), "handle quota");
        drop(h);
        let b = Account::new("b", a.limits, 5, 1, true, 1);
        let _h = b.open_handle(&fds, 4).unwrap();
        assert!(a.open_handle(&fds, 4).is_err(), "server descriptors");
        assert_eq!((a.handles(), a.fds()), (0, 0));
    }

    #[test]
    fn handles_are_charged_their_descriptors() {
        let limits = Limits {
            handles: 10,
            ..Limits::default()
        };
        let a = Account::new("a", limits, 6, 1, true, 1);
        let fds = Arc::new(Semaphore::new(100));
        let h = a.open_handle(&fds, 5).unwrap();
        let e = a.open_handle(&fds, 2).err().expect("over the share");
        assert!(
            e.message.contains("5 of its 6 descriptors"),
            "{}",
            e.message
        );
        assert!(a.open_handle(&fds, 7).is_err(), "more than the share");
        let _one = a.open_handle(&fds, 1).unwrap();
        assert_eq!((a.handles(), a.fds()), (2, 6));
        assert_eq!(fds.available_permits(), 94);
        drop(h);
        assert_eq!((a.handles(), a.fds()), (1, 1));
        // Refused by the server's budget: nothing kept of the share.
        let few = Arc::new(Semaphore::new(2));
        assert!(a.open_handle(&few, 3).is_err());
        assert_eq!((a.handles(), a.fds()), (1, 1));
    }
}
