//! What one credential may hold at once, and the server's file descriptors.
//!
//! Every credential is an [`Account`] with limits on connections and open handles (its
//! unfinished uploads and the bytes they declare are counted by the upload store, which alone
//! knows them across restarts). The limits have defaults derived from the server's capacity —
//! with more than one credential, none may take more than half of any of it — and per-line
//! overrides in the token file. File descriptors are a server-wide budget taken by every
//! connection and handle, so running out is a clear LimitExceeded, never a client left hanging.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    connections: AtomicUsize,
    handles: AtomicUsize,
}

/// A connection or a handle counted against its account (and the descriptors it holds against
/// the server's budget) until dropped.
pub struct Held {
    account: Arc<Account>,
    kind: Kind,
    _fds: Option<OwnedSemaphorePermit>,
}

enum Kind {
    Connection,
    Handle,
}

impl Account {
    pub fn new(name: &str, limits: Limits) -> Arc<Account> {
        Arc::new(Account {
            name: name.to_string(),
            limits,
            connections: AtomicUsize::new(0),
            handles: AtomicUsize::new(0),
        })
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Relaxed)
    }

    /// Counts an authenticated connection, or refuses it over the quota.
    pub fn connect(self: &Arc<Account>) -> Result<Held, Failure> {
        take(&self.connections, self.limits.connections).map_err(|n| {
            Failure::new(
                ErrorCode::LimitExceeded,
                format!("credential {:?} has {n} connections, its quota", self.name),
            )
        })?;
        Ok(Held {
            account: self.clone(),
            kind: Kind::Connection,
            _fds: None,
        })
    }

    /// Counts a handle holding `fds` descriptors, or refuses it over the credential's quota or
    /// the server's descriptors.
    pub fn open_handle(self: &Arc<Account>, fds: &Arc<Semaphore>, n: u32) -> Result<Held, Failure> {
        let permit = fds.clone().try_acquire_many_owned(n).map_err(|_| {
            Failure::new(
                ErrorCode::LimitExceeded,
                "server out of file descriptors; try again later",
            )
        })?;
        take(&self.handles, self.limits.handles).map_err(|n| {
            Failure::new(
                ErrorCode::LimitExceeded,
                format!("credential {:?} has {n} open handles, its quota", self.name),
            )
        })?;
        Ok(Held {
            account: self.clone(),
            kind: Kind::Handle,
            _fds: Some(permit),
        })
    }
}

/// Increments `count` unless it is at `limit`; Err(count) then.
fn take(count: &AtomicUsize, limit: usize) -> Result<(), usize> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .map(|_| ())
}

impl Drop for Held {
    fn drop(&mut self) {
        let c = match self.kind {
            Kind::Connection => &self.account.connections,
            Kind::Handle => &self.account.handles,
        };
        c.fetch_sub(1, Ordering::AcqRel);
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

/// Raises the soft limit on open files to the hard limit, as servers that hold many sockets
/// do (the fsd binary, at start).
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The soft limit on open files in force.
pub fn nofile() -> usize {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_count_and_give_back() {
        let a = Account::new(
            "a",
            Limits {
                connections: 2,
                handles: 1,
                uploads: 1,
                upload_bytes: 1,
            },
        );
        let fds = Arc::new(Semaphore::new(5));
        let c1 = a.connect().unwrap();
        let _c2 = a.connect().unwrap();
        assert!(a.connect().is_err());
        drop(c1);
        assert!(a.connect().is_ok());
        let h = a.open_handle(&fds, 4).unwrap();
        assert!(a.open_handle(&fds, 1).is_err(), "handle quota");
        drop(h);
        let b = Account::new("b", a.limits);
        let _h = b.open_handle(&fds, 4).unwrap();
        assert!(a.open_handle(&fds, 4).is_err(), "server descriptors");
        assert_eq!(a.handles(), 0);
    }
}
