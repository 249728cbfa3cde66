//! Resumable uploads: per upload a data file, a state record and a lock file in the state
//! directory. A chunk counts as present across restarts only once its bytes were fdatasync'ed
//! and the record saying so was renamed into place; on load every such chunk is re-verified
//! against its CRC32. Commit publishes by renaming the data file onto the destination beneath
//! the root, so nothing ever exists at the final path before the whole file is verified.
//!
//! An upload of at most one chunk has nothing to resume (the client re-sends it), so it keeps
//! no state at all: on a local disk its data goes to an anonymous O_TMPFILE (a crash leaves
//! nothing behind), commit links it into place, and the syncs are shared with concurrent commits
//! (one syncfs for many small files, [`GroupSync`]) instead of an fsync of the file and one of
//! its directory. On a shared file system, where O_TMPFILE and syncfs cannot be trusted
//! (crate::fskind), it is a named temporary file, fsynced, renamed (or linked) into place, its
//! directory fsynced; one left by a crash is removed after the upload TTL.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;
use prost::Message;

use super::identity::RootId;
use super::lease::{Lease, Refused};
use super::root::{FsError, Root};
use crate::direct::DirectFile;
use crate::durable::GroupSync;
use crate::fskind::FsKind;
use crate::integrity::{chunk_cv, RootHasher};
use crate::protocol::{
    checked_chunk_count, chunk_count, chunk_len, chunk_size_for, ErrorCode, MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
};
use crate::state::{CommitRecord, UploadRecord};

/// Sync policy: fdatasync after this many unsynced bytes (about one client window, so a crash
/// costs a resend of at most that much)...
pub const SYNC_BYTES: u64 = 8 * 1024 * 1024;
/// ...or when this long has passed since the last sync, whichever comes first. Syncs run in the
/// background, off the write path.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// Writers wait for a sync when this much is unsynced (the disk fell behind the network).
pub const MAX_UNSYNCED: u64 = 4 * SYNC_BYTES;
/// Chunks an opening of an upload may store over chunks already written, beyond its size
/// (`Upload::written_again`): room for a client's retries and endgame copies (fsc keeps at
/// most 8 WRITEs in flight per connection, 8 connections at most).
pub const REWRITE_SLACK_CHUNKS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload {id} is in use (open on another connection or server process)")]
    Busy { id: String },
    #[error("chunk {chunk} out of range (upload has {count} chunks)")]
    BadChunk { chunk: u32, count: u32 },
    #[error("chunk {chunk} is {got} bytes, expected {want}")]
    BadLength { chunk: u32, got: usize, want: u32 },
    #[error("{missing} of {count} chunks missing")]
    Incomplete { missing: u32, count: u32 },
    #[error("whole-file BLAKE3 mismatch: client {client}, server {server}")]
    HashMismatch { client: String, server: String },
    /// The upload was published (through this handle or another on it): it takes no more
    /// chunks and no second COMMIT; a new OPEN WRITE starts a fresh upload.
    #[error("upload {id} is already committed")]
    Committed { id: String },
    /// A COMMIT of this upload is in progress, or chunks are still being written.
    #[error("upload {id}: {why}")]
    Sealing { id: String, why: &'static str },
    /// Chunks written again with other bytes, more than the upload's size allows.
    #[error("upload {id}: chunks written again with other bytes past {max} bytes; CLOSE it and OPEN it again to go on")]
    Rewritten { id: String, max: u64 },
    #[error("{owner:?} has {count} unfinished uploads of {bytes} bytes; this one would pass its quota ({max_count} uploads, {max_bytes} bytes): finish or remove some")]
    Quota {
        owner: String,
        count: u64,
        bytes: u64,
        max_count: u64,
        max_bytes: u64,
    },
    #[error("{0}")]
    Fs(#[from] FsError),
    #[error("upload {id}: {source}")]
    Io { id: String, source: io::Error },
}

impl UploadError {
    pub fn code(&self) -> ErrorCode {
        match self {
            UploadError::Busy { .. } | UploadError::Sealing { .. } => ErrorCode::Busy,
            UploadError::Committed { .. } => ErrorCode::BadHandle,
            UploadError::Quota { .. } | UploadError::Rewritten { .. } => ErrorCode::LimitExceeded,
            UploadError::BadChunk { .. } | UploadError::BadLength { .. } => ErrorCode::BadRequest,
            UploadError::Incomplete { .. } => ErrorCode::Incomplete,
            UploadError::HashMismatch { .. } => ErrorCode::HashMismatch,
            UploadError::Fs(e) => e.code(),
            UploadError::Io { source, .. } => io_code(source),
        }
    }
}

fn io_code(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorCode::NoSpace,
        // The file system cannot do it (e.g. O_TMPFILE where --fs-kind local was forced on a
        // file system without it): retrying will not help.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => ErrorCode::Unsupported,
        _ if e.kind() == io::ErrorKind::StorageFull => ErrorCode::NoSpace,
        _ => ErrorCode::Io,
    }
}

/// What a client asks for when it opens an upload.
#[derive(Debug, Clone)]
pub struct UploadParams {
    pub owner: String,
    /// The destination inside the root: what identifies the upload.
    pub dest: String,
    /// The destination relative to the root it is published beneath (the credential's prefix
    /// directory, or the root): where it goes.
    pub path: String,
    pub size: u64,
    pub resume_key: String,
    pub base_chunk_size: u32,
    pub restart: bool,
    pub mode_bits: u32,
    pub mtime_ns: i64,
    pub no_clobber: bool,
    /// The owner's quota of unfinished resumable uploads: how many, and their declared bytes.
    pub max_uploads: u64,
    pub max_upload_bytes: u64,
}

impl UploadParams {
    /// Same credential, destination, size and source key: same upload. The destination is the
    /// full path inside the root, so two credentials (or prefixes) never share an upload.
    pub fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        for part in [
            &self.owner,
            &self.dest,
            &self.size.to_string(),
            &self.resume_key,
        ] {
            h.update(part.as_bytes());
            h.update(&[0]);
        }
        h.finalize().to_hex()[..32].to_string()
    }
}

/// Commits of small uploads wait this long for others to share their sync (fsd::durable).
const SYNC_GATHER: Duration = Duration::from_millis(1);
const SYNC_BATCH: usize = 32;

/// The unfinished resumable uploads on disk, by id and summed per owner: what the per-credential
/// quotas count. Rebuilt from the state records at start.
#[derive(Default)]
struct Tally {
    by_id: HashMap<String, (String, u64)>,
    by_owner: HashMap<String, (u64, u64)>,
}

impl Tally {
    /// The unfinished uploads in state directory `dir`, whichever node started them: those
    /// with a record and a data file (a record without one is what a publish cut off before
    /// its cleanup left, or a foreign file, and holds nothing).
    fn count(dir: &std::path::Path) -> io::Result<Tally> {
        let mut tally = Tally::default();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".state") else {
                continue;
            };
            if !dir.join(format!("{id}.data")).exists() {
                continue;
            }
            if let Some(r) = read_record(&e.path()).and_then(|b| UploadRecord::decode(&b[..]).ok())
            {
                tally.add(id, &r.owner, r.size);
            }
        }
        Ok(tally)
    }

    fn usage(&self, owner: &str) -> (u64, u64) {
        self.by_owner.get(owner).copied().unwrap_or((0, 0))
    }

    fn add(&mut self, id: &str, owner: &str, size: u64) {
        self.remove(id);
        self.by_id.insert(id.to_string(), (owner.to_string(), size));
        let t = self.by_owner.entry(owner.to_string()).or_default();
        t.0 += 1;
        t.1 = t.1.saturating_add(size);
    }

    fn remove(&mut self, id: &str) {
        if let Some((owner, size)) = self.by_id.remove(id) {
            if let Some(t) = self.by_owner.get_mut(&owner) {
                t.0 -= 1;
                t.1 = t.1.saturating_sub(size);
                if t.0 == 0 {
                    self.by_owner.remove(&owner);
                }
            }
        }
    }
}

/// The uploads directory.
pub struct UploadStore {
    dir: PathBuf,
    /// Shared by every upload: a tree upload stages many files at once, each holding one
    /// descriptor (its data), not two.
    dir_fd: Arc<File>,
    /// Where single-chunk uploads go: anonymous files (local disks) or named ones.
    kind: FsKind,
    group: Arc<GroupSync>,
    ttl: Duration,
    /// How long a dead node's upload lock keeps others out (fs::lease).
    lease: Duration,
    live: Arc<LiveMap>,
    /// Ids an OPEN is bringing up (lease, files, read-back) without holding `live`'s lock:
    /// another OPEN of the same id waits for it; OPENs of other uploads do not.
    opening: Mutex<HashSet<String>>,
    /// When an OPEN over a quota last had the uploads counted from the directory.
    recounted: Mutex<Option<Instant>>,
    /// The uploads whose leases [`UploadStore::renew_leases`] renews. Apart from `live`, whose
    /// lock an OPEN holds while it reads a whole upload back: a long OPEN must not hold up the
    /// renewals, or every other upload on this node would fence itself (fs::lease).
    held: Mutex<Vec<Weak<Upload>>>,
    tally: Arc<Mutex<Tally>>,
    reaper: Reaper,
}

/// Removes the links a replacing publish kept to the files it replaced ([`Root::keep_link`]) on
/// its own thread, so that freeing their blocks is not on any COMMIT's path. Its queue is
/// bounded: when it is full (or the thread could not be started) the caller removes the link
/// itself. A link left by a crash is removed by [`UploadStore::collect_garbage`].
#[derive(Clone)]
struct Reaper {
    dir_fd: Arc<File>,
    queue: Option<std::sync::mpsc::SyncSender<CString>>,
}

/// Kept links waiting for the reaper, at most.
const REAP_QUEUE: usize = 64;

impl Reaper {
    fn new(dir_fd: Arc<File>) -> Reaper {
        let (tx, rx) = std::sync::mpsc::sync_channel::<CString>(REAP_QUEUE);
        let fd = dir_fd.clone();
        let started = std::thread::Builder::new()
            .name("fsd-reaper".into())
            .spawn(move || {
                for name in rx {
                    remove_kept(&fd, &name);
                }
            });
        Reaper {
            dir_fd,
            queue: started.is_ok().then_some(tx),
        }
    }

    fn remove(&self, name: CString) {
        let name = match &self.queue {
            Some(q) => match q.try_send(name) {
                Ok(()) => return,
                Err(
                    std::sync::mpsc::TrySendError::Full(name)
                    | std::sync::mpsc::TrySendError::Disconnected(name),
                ) => name,
            },
            None => name,
        };
        remove_kept(&self.dir_fd, &name);
    }
}

fn remove_kept(dir: &File, name: &CStr) {
    match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        // Gone already: garbage collection took it first.
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            let name = name.to_string_lossy();
            tracing::warn!(%name, error = %e, "could not remove a replaced file's link");
        }
    }
}

impl UploadStore {
    /// The store in `dir`, on a file system of `kind` (crate::fskind).
    pub fn new(
        dir: PathBuf,
        ttl: Duration,
        lease: Duration,
        kind: FsKind,
    ) -> io::Result<UploadStore> {
        std::fs::create_dir_all(&dir)?;
        let dir_fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir)?;
        let group = GroupSync::with_kind(&dir_fd, kind, SYNC_GATHER, SYNC_BATCH)?;
        let tally = Tally::count(&dir)?;
        let dir_fd = Arc::new(dir_fd);
        Ok(UploadStore {
            dir,
            reaper: Reaper::new(dir_fd.clone()),
            dir_fd,
            kind,
            group,
            ttl,
            lease,
            live: Arc::default(),
            held: Mutex::new(Vec::new()),
            opening: Mutex::default(),
            recounted: Mutex::default(),
            tally: Arc::new(Mutex::new(tally)),
        })
    }

    /// Whether a count from the directory before a refusal is due (see [`RECOUNT_EVERY`]).
    fn may_recount(&self) -> bool {
        let mut last = self.recounted.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < RECOUNT_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// An owner's unfinished resumable uploads: (how many, their declared bytes).
    pub fn usage(&self, owner: &str) -> (u64, u64) {
        self.tally.lock().unwrap().usage(owner)
    }

    /// Whether resumable upload `id` of OPEN WRITE `p` lives in this process or has its record
    /// in the state directory (PUT and TREE_WRITE, without a resume key, have none).
    fn known(&self, p: &UploadParams, id: &str) -> bool {
        !p.resume_key.is_empty()
            && (self.live.lock().unwrap().contains_key(id) || self.path(id, "state").exists())
    }

    /// Opens (resuming when possible) or creates the upload for `p`. Blocking.
    pub fn open(&self, p: &UploadParams) -> Result<Arc<Upload>, UploadError> {
        let id = p.id();
        let io_err = |source| UploadError::Io {
            id: id.clone(),
            source,
        };
        let chunk_size = chunk_size_for(p.size, p.base_chunk_size);
        // One chunk at this connection's base: sent whole, without state, unless an upload of
        // it begun at a smaller base is here, to resume (it keeps its chunk size, PROTOCOL.md
        // §8.1; answering stateless left it orphaned until its TTL, counted in the quota) or,
        // with `restart`, to be refused while open elsewhere (Busy) and discarded otherwise.
        if chunk_count(p.size, chunk_size) <= 1 && !self.known(p, &id) {
            return self.open_stateless(p, id, chunk_size);
        }
        let mut waited = 0;
        let tries = loop {
            let live = self.live.lock().unwrap();
            // Dropped after `live` is let go (declared after it): were it the last handle, the
            // upload's drop takes its entry out of `live`.
            let found = live.get(&id).and_then(Weak::upgrade);
            if let Some(u) = &found {
                let phase = u.inner.lock().unwrap().phase.clone();
                match phase {
                    // Another handle in this process has it: share it (chunks are idempotent).
                    Phase::Open if !p.restart => return Ok(u.clone()),
                    Phase::Open | Phase::Sealing => return Err(UploadError::Busy { id }),
                    // Published: it is never written again; this OPEN starts a fresh upload
                    // (its files were removed when it was published).
                    Phase::Committed(_) => {}
                }
            }
            if self.opening.lock().unwrap().insert(id.clone()) {
                // If this process held the upload a moment ago, its last handle may still be
                // syncing it on drop: wait for that (briefly) instead of answering Busy.
                let tries = if live.contains_key(&id) { 40 } else { 1 };
                drop(live);
                break tries;
            }
            // Another OPEN is bringing this upload up: share it once it is there.
            drop(live);
            waited += 1;
            if waited > OPENING_WAITS {
                return Err(UploadError::Busy { id });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _opening = Opening {
            ids: &self.opening,
            id: id.clone(),
        };
        let lease = match Lease::acquire(&self.dir, &id, self.lease, tries) {
            Ok(l) => l,
            Err(Refused::Busy) => return Err(UploadError::Busy { id }),
            Err(Refused::Io(e)) => return Err(io_err(e)),
        };

        // A `<id>.data` with another name is the published file: a publish by link was cut off
        // before it removed this name (Root::publish). That upload is committed; this OPEN
        // starts afresh, in new files.
        let second_name =
            std::fs::symlink_metadata(self.path(&id, "data")).is_ok_and(|m| m.nlink() > 1);
        let record = if p.restart || second_name {
            None
        } else {
            read_record(&self.path(&id, "state"))
                .and_then(|b| UploadRecord::decode(&b[..]).ok())
                .filter(|r| {
                    r.path == p.dest
                        && r.size == p.size
                        && plausible_chunk_size(r.size, r.chunk_size)
                })
        };
        let fresh = record.is_none();
        if fresh && chunk_count(p.size, chunk_size) <= 1 {
            // Restarted, or what `known` saw was not resumable after all (damaged, another
            // file's): its files go, under the lease, so that no later OPEN resumes them.
            self.discard(&id).map_err(io_err)?;
            return self.open_stateless(p, id, chunk_size);
        }
        if fresh {
            self.check_space(p.size).map_err(io_err)?;
            // Counted from here until published or expired, across restarts.
            let mut tally = self.tally.lock().unwrap();
            tally.remove(&id);
            let over = |t: &Tally| {
                let (count, bytes) = t.usage(&p.owner);
                count >= p.max_uploads || bytes.saturating_add(p.size) > p.max_upload_bytes
            };
            // Before refusing, count again from the directory: uploads that other nodes
            // sharing it finished (or that expired there) still count here until then. At most
            // every RECOUNT_EVERY, and not holding the tally: a client over its quota must not
            // make every OPEN on the node wait for directory scans.
            if over(&tally) && self.may_recount() {
                drop(tally);
                let fresh = Tally::count(&self.dir);
                tally = self.tally.lock().unwrap();
                if let Ok(fresh) = fresh {
                    *tally = fresh;
                }
                tally.remove(&id);
            }
            let (count, bytes) = tally.usage(&p.owner);
            if over(&tally) {
                return Err(UploadError::Quota {
                    owner: p.owner.clone(),
                    count,
                    bytes,
                    max_count: p.max_uploads,
                    max_bytes: p.max_upload_bytes,
                });
            }
            tally.add(&id, &p.owner, p.size);
        }
        let chunk_size = record
            .as_ref()
            .map(|r| r.chunk_size)
            .unwrap_or_else(|| chunk_size_for(p.size, p.base_chunk_size));
        let count = chunk_count(p.size, chunk_size);
        let files = if fresh {
            self.create_files(&id, p.size)
                .map(|(d, l, s)| (d, l, s, Inner::new(count)))
        } else if lease.taken_over() {
            self.adopt(&id, p.size, chunk_size, &lease)
        } else {
            self.reopen_files(&id, p.size, chunk_size)
        };
        let (data, log, sums, inner) = files.map_err(|e| match e.kind() {
            io::ErrorKind::ResourceBusy => UploadError::Busy { id: id.clone() },
            _ => io_err(e),
        })?;
        if !fresh {
            tracing::info!(upload = %id, present = inner.present, "resumed upload");
        }
        // Reading an upload back (a resume checks every chunk) may have outlasted the lease.
        if !lease.is_fresh() && !lease.renew().map_err(io_err)? {
            return Err(UploadError::Busy { id });
        }
        let upload = Arc::new(Upload {
            id: id.clone(),
            // The latest request decides mode and mtime of the published file.
            params: p.clone(),
            chunk_size,
            count,
            direct: DirectFile::reopen(&data),
            data,
            temp_name: None,
            sums,
            log: Some(log),
            sync_lock: Mutex::new(()),
            dir: self.dir.clone(),
            dir_fd: self.dir_fd.clone(),
            group: self.group.clone(),
            tally: self.tally.clone(),
            reaper: self.reaper.clone(),
            reservable: self.kind == FsKind::Local,
            lease: Some(lease),
            live: Some(self.live.clone()),
            lost: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(inner),
        });
        if fresh && upload.resumable() {
            upload.write_header().map_err(io_err)?;
        }
        self.live
            .lock()
            .unwrap()
            .insert(id.clone(), Arc::downgrade(&upload));
        self.held.lock().unwrap().push(Arc::downgrade(&upload));
        Ok(upload)
    }

    /// New, empty data, log and sums files for a fresh upload; never old ones truncated: a node
    /// whose lease ran out may still write those (fs::lease). O_EXCL: a name that reappears
    /// meanwhile is not shared either.
    /// Removes upload `id`'s files and its count in the quota. The caller holds its lease.
    fn discard(&self, id: &str) -> io::Result<()> {
        for ext in ["state", "data", "log", "sums"] {
            match std::fs::remove_file(self.path(id, ext)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.tally.lock().unwrap().remove(id);
        Ok(())
    }

    fn create_files(&self, id: &str, size: u64) -> io::Result<(File, File, Sums)> {
        let new = |ext: &str, append: bool| {
            let path = self.path(id, ext);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => upload_file(&path, append, true),
            }
        };
        let data = new("data", false)?;
        // Sparse: space is taken chunk by chunk, so ENOSPC surfaces on the chunk that hits it.
        data.set_len(size)?;
        Ok((data, new("log", true)?, Sums::File(new("sums", false)?)))
    }

    /// The files of an upload resumed from a holder that let it go (closed it, or its process
    /// died), and the chunks their log vouches for.
    fn reopen_files(&self, id: &str, size: u64, chunk_size: u32) -> io::Result<Files> {
        let open = |ext: &str, append: bool| upload_file(&self.path(id, ext), append, false);
        let (data, log) = (open("data", false)?, open("log", true)?);
        let sums = Sums::File(open("sums", false)?);
        let mut inner = Inner::new(chunk_count(size, chunk_size));
        replay_log(&log, &data, None, &sums, size, chunk_size, &mut inner)?;
        Ok((data, log, sums, inner))
    }

    /// Resumes an upload taken over from a node whose lease ran out. That node may still have
    /// the upload's files open and write them when it wakes (its queued WRITEs run before it
    /// learns it lost the lease), so the chunks go into new files that replace the old names:
    /// what this node verifies and publishes is out of that node's reach. Each chunk is copied
    /// from the buffer its CRC32 was checked in (not copy_file_range, which would have to be
    /// read back to be checked), so what is copied is what was checked. Takeovers are rare.
    fn adopt(&self, id: &str, size: u64, chunk_size: u32, lease: &Lease) -> io::Result<Files> {
        let count = chunk_count(size, chunk_size);
        // `.tmp`: garbage collection removes what a crash leaves.
        let suffix = super::private_suffix();
        let temp = |ext: &str| self.dir.join(format!("{id}.{ext}.{suffix}.tmp"));
        let copied = (|| {
            let data = upload_file(&temp("data"), false, true)?;
            data.set_len(size)?;
            let sums = Sums::File(upload_file(&temp("sums"), false, true)?);
            let mut log = upload_file(&temp("log"), true, true)?;
            let mut inner = Inner::new(count);
            let old = |ext| match File::open(self.path(id, ext)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                r => r.map(Some),
            };
            if let (Some(old_data), Some(old_log)) = (old("data")?, old("log")?) {
                let copy = Some(&data);
                replay_log(
                    &old_log, &old_data, copy, &sums, size, chunk_size, &mut inner,
                )?;
            }
            data.sync_data()?;
            // The new log vouches for exactly the chunks copied.
            let mut first = 0;
            while first < count {
                let n = 4096.min(count - first);
                let mut entries = Vec::new();
                for (i, (crc, cv)) in (first..).zip(sums.get(first, n)?) {
                    if bit(&inner.durable, i) {
                        entries.extend_from_slice(&log_entry(i, crc, &cv));
                    }
                }
                log.write_all(&entries)?;
                first += n;
            }
            log.sync_data()?;
            // The copy may have outlasted the lease: never replace the files of a node that
            // took the upload over meanwhile.
            if !lease.renew()? {
                let e = "taken over by another node during the takeover copy";
                return Err(io::Error::new(io::ErrorKind::ResourceBusy, e));
            }
            for ext in ["data", "sums", "log"] {
                std::fs::rename(temp(ext), self.path(id, ext))?;
            }
            Ok((data, log, sums, inner))
        })();
        if copied.is_err() {
            for ext in ["data", "sums", "log"] {
                let _ = std::fs::remove_file(temp(ext));
            }
        }
        copied
    }

    /// A single-chunk upload: no lock, log or record; an anonymous file on a local disk, a
    /// named temporary one elsewhere.
    fn open_stateless(
        &self,
        p: &UploadParams,
        id: String,
        chunk_size: u32,
    ) -> Result<Arc<Upload>, UploadError> {
        use nix::fcntl::OFlag;
        let io_err = |source| UploadError::Io {
            id: id.clone(),
            source,
        };
        self.check_space(p.size).map_err(io_err)?;
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
        let (fd, temp_name) = if self.kind.keeps_anonymous_files() {
            let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
            let fd = nix::fcntl::openat(&self.dir_fd, c".", flags, mode);
            (fd.map_err(|e| io_err(e.into()))?, None)
        } else {
            let name = CString::new(format!("{id}.{}.tmp", super::private_suffix())).unwrap();
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC;
            let fd = nix::fcntl::openat(&self.dir_fd, name.as_c_str(), flags, mode);
            (fd.map_err(|e| io_err(e.into()))?, Some(name))
        };
        let count = chunk_count(p.size, chunk_size);
        Ok(Arc::new(Upload {
            id: id.clone(),
            params: p.clone(),
            chunk_size,
            count,
            data: File::from(fd),
            temp_name,
            direct: None,
            sums: Sums::Memory(Mutex::new(vec![(0, [0; 32]); count as usize])),
            log: None,
            sync_lock: Mutex::new(()),
            dir: self.dir.clone(),
            dir_fd: self.dir_fd.clone(),
            group: self.group.clone(),
            tally: self.tally.clone(),
            reaper: self.reaper.clone(),
            reservable: false,
            lease: None,
            live: None,
            lost: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner::new(count)),
        }))
    }

    /// Fails fast, before any data moves, when a file of `size` bytes cannot fit.
    fn check_space(&self, size: u64) -> io::Result<()> {
        let Some(free) = crate::fskind::free_bytes(&*self.dir_fd)? else {
            return Ok(());
        };
        if size > free {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{size} bytes do not fit: {free} bytes free"),
            ));
        }
        Ok(())
    }

    /// Renews the lease of every upload open in this process; one taken over by another node
    /// is marked lost, so that this process never writes or publishes it again. Blocking.
    pub fn renew_leases(&self) {
        let open: Vec<Arc<Upload>> = {
            let mut held = self.held.lock().unwrap();
            held.retain(|u| u.strong_count() > 0);
            held.iter().filter_map(Weak::upgrade).collect()
        };
        for u in open {
            let Some(lease) = &u.lease else { continue };
            match lease.renew() {
                Ok(true) => {}
                Ok(false) => u.lose(),
                Err(e) => {
                    tracing::warn!(upload = %u.id, error = %e, "could not renew the upload lease")
                }
            }
        }
    }

    /// The result of upload `id` if it was committed with `blake3` by `owner` (on any node
    /// sharing this state directory): COMMIT by upload id, for a client whose COMMIT's answer
    /// was lost. None if it was not (or not yet) published. Blocking.
    pub fn committed(
        &self,
        id: &str,
        owner: &str,
        blake3: &[u8],
        root: &Root,
        ids: &RootId,
    ) -> Option<(u64, String)> {
        // Ids are what UploadParams::id makes; anything else names no file of ours.
        if id.len() != 32
            || !id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        let bytes = read_record(&self.path(id, "done"))?;
        let r = CommitRecord::decode(&bytes[..]).ok()?;
        // Data still there: the rename has not happened (or a fresh upload reuses the id),
        // unless it is a second name of the published inode (a publish by link that was cut
        // off before the unlink, Root::publish).
        let published = match std::fs::symlink_metadata(self.path(id, "data")) {
            Ok(m) => m.nlink() > 1 && m.ino() == r.ino,
            Err(_) => true,
        };
        if !published || r.owner != owner || r.blake3 != blake3 {
            return None;
        }
        let identity = match root.open_read(&r.path) {
            Ok((_, meta)) if meta.ino() == r.ino => ids.identity(&meta),
            // Replaced or removed since: the identity it was published with.
            _ => r.identity,
        };
        Some((r.size, identity))
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    /// Uploads open in this process (held by at least one handle). Counts without pruning:
    /// `open` reads a dead entry as "held here a moment ago".
    pub fn live_count(&self) -> usize {
        let live = self.live.lock().unwrap();
        live.values().filter(|u| u.strong_count() > 0).count()
    }

    /// Removes uploads idle longer than the TTL that no process holds. Returns how many.
    pub fn collect_garbage(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".replaced") {
                // A replaced file's link that a crash kept from the reaper: nothing needs it.
                if std::fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
                continue;
            }
            if name.starts_with("replace.") {
                // The spare name of a small file being published over another
                // (Root::publish_anonymous), left by a crash between its link and the rename.
                // Aged by ctime, which the link set: its mtime is the client's. Review D
                // (stop 30): one was still there after a restart and 8 s of GC at a 2 s TTL.
                let age = e.metadata().ok().and_then(|m| {
                    let ctime =
                        std::time::UNIX_EPOCH + Duration::new(u64::try_from(m.ctime()).ok()?, 0);
                    ctime.elapsed().ok()
                });
                if age.is_some_and(|age| age >= self.ttl) && std::fs::remove_file(e.path()).is_ok()
                {
                    removed += 1;
                }
                continue;
            }
            // Chunk sums of an upload that is gone (published by a version that left them).
            let orphan_sums = name
                .strip_suffix(".sums")
                .is_some_and(|id| !self.path(id, "data").exists());
            // A record, log or lock a publish cut off before its cleanup left: removed under the
            // upload's lease, and only if it still has no data then (an OPEN of the same upload
            // may be bringing it up again).
            let orphan_state = [".state", ".log", ".lock"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext))
                .filter(|id| !self.path(id, "data").exists());
            if let Some(id) = orphan_state {
                let idle = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok()?.elapsed().ok());
                if idle.is_some_and(|idle| idle >= self.ttl) {
                    if let Ok(_lease) = Lease::acquire(&self.dir, id, self.lease, 1) {
                        if !self.path(id, "data").exists() {
                            for ext in ["state", "log", "sums", "lock"] {
                                let _ = std::fs::remove_file(self.path(id, ext));
                            }
                            removed += 1;
                        }
                    }
                }
                continue;
            }
            if name.ends_with(".tmp")
                || name.ends_with(".done")
                || name.contains(".takeover.")
                || orphan_sums
            {
                // A single-chunk upload's temporary file left by a crash (on a shared file
                // system, of any node: its age, not its pid, says it is dead), or the record
                // of a commit whose answer nobody asked for again.
                let idle = e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok()?.elapsed().ok());
                if idle.is_some_and(|idle| idle >= self.ttl)
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    removed += 1;
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".data") else {
                continue;
            };
            // Last activity: the newest write to the data, the header or the chunk log.
            let idle = ["data", "state", "log"]
                .iter()
                .filter_map(|ext| std::fs::metadata(self.path(id, ext)).ok()?.modified().ok())
                .max()
                .and_then(|t| t.elapsed().ok());
            if idle.is_none_or(|idle| idle < self.ttl) {
                continue;
            }
            // Held by a live process: not expired. Held by a dead node: taken over.
            if let Ok(_lease) = Lease::acquire(&self.dir, id, self.lease, 1) {
                for ext in ["data", "state", "log", "sums", "lock"] {
                    let _ = std::fs::remove_file(self.path(id, ext));
                }
                self.tally.lock().unwrap().remove(id);
                tracing::info!(upload = id, "expired upload removed");
                removed += 1;
            }
        }
        // In step with the directory again: what other nodes sharing it started, finished or
        // expired since (each node counted only its own changes).
        if let Ok(fresh) = Tally::count(&self.dir) {
            *self.tally.lock().unwrap() = fresh;
        }
        removed
    }
}

/// An open upload's data, log and sums files, and what they hold.
type Files = (File, File, Sums, Inner);

/// Opens an upload file in the state directory for reading and writing (the log: appending),
/// created if missing, or `new` (O_EXCL).
fn upload_file(path: &std::path::Path, append: bool, new: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!append)
        .append(append)
        .create(!new)
        .create_new(new)
        .open(path)
}

/// One chunk-log entry: chunk index, CRC32 and BLAKE3 chaining value, fixed size so that a torn
/// final entry (a crash mid-append) is recognisable and ignored.
const LOG_ENTRY: usize = 4 + 4 + 32;

fn log_entry(index: u32, crc: u32, cv: &[u8; 32]) -> [u8; LOG_ENTRY] {
    let mut e = [0u8; LOG_ENTRY];
    e[..4].copy_from_slice(&index.to_le_bytes());
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    e[8..].copy_from_slice(cv);
    e
}

/// Rebuilds the durable chunks from the log, trusting an entry only if the chunk's bytes still
/// match its CRC32, and writes their sums into their slots (and, given `copy`, the checked bytes
/// into it). Entries are read in order, a block at a time, so later entries for a chunk win and
/// memory does not grow with the log.
fn replay_log(
    log: &File,
    data: &File,
    copy: Option<&File>,
    sums: &Sums,
    size: u64,
    chunk_size: u32,
    inner: &mut Inner,
) -> io::Result<()> {
    let count = chunk_count(size, chunk_size);
    let mut block = vec![0u8; LOG_ENTRY * 1024];
    let mut buf = vec![0u8; chunk_size as usize];
    let mut at = 0u64;
    loop {
        let n = log.read_at(&mut block, at)?;
        let whole = n - n % LOG_ENTRY;
        if whole == 0 {
            break;
        }
        at += whole as u64;
        for e in block[..whole].chunks_exact(LOG_ENTRY) {
            let index = u32::from_le_bytes(e[..4].try_into().unwrap());
            if index >= count {
                continue;
            }
            let crc = u32::from_le_bytes(e[4..8].try_into().unwrap());
            let len = chunk_len(size, chunk_size, index) as usize;
            let offset = index as u64 * chunk_size as u64;
            let ok = data.read_exact_at(&mut buf[..len], offset).is_ok()
                && crc32fast::hash(&buf[..len]) == crc;
            if !ok {
                tracing::warn!(
                    chunk = index,
                    "logged chunk failed its CRC32 on reload; will be re-sent"
                );
                inner.mark(index, false, false);
                continue;
            }
            if let Some(copy) = copy {
                copy.write_all_at(&buf[..len], offset)?;
            }
            sums.put(index, (crc, e[8..].try_into().unwrap()))?;
            inner.mark(index, true, true);
        }
    }
    Ok(())
}

/// CRC32 and BLAKE3 chaining value of one chunk.
type Sum = (u32, [u8; 32]);
/// Bytes of one slot of a sums file: CRC32 (little-endian), then the chaining value.
const SUM_LEN: usize = 4 + 32;

/// Where an upload keeps its chunks' sums. Chunk indices and counts here are u32 bounded by
/// `MAX_CHUNKS_PER_FILE` (chunk_size_for), and pages by MANIFEST_PAGE or 4096: `as usize` only
/// widens. A stateful upload: a file of fixed slots beside its
/// data, so that what the server holds in memory per upload is its two bitmaps, not 36 bytes
/// per chunk (2^20 chunks of 64 KiB would pin 36 MiB each). The file needs no sync: the log
/// holds the sums of durable chunks, and a resume rewrites their slots from it. An anonymous
/// upload (one chunk): memory.
enum Sums {
    File(File),
    Memory(Mutex<Vec<Sum>>),
}

impl Sums {
    fn put(&self, index: u32, (crc, cv): Sum) -> io::Result<()> {
        match self {
            Sums::File(f) => {
                let mut slot = [0u8; SUM_LEN];
                slot[..4].copy_from_slice(&crc.to_le_bytes());
                slot[4..].copy_from_slice(&cv);
                f.write_all_at(&slot, index as u64 * SUM_LEN as u64)
            }
            Sums::Memory(v) => {
                v.lock().unwrap()[index as usize] = (crc, cv);
                Ok(())
            }
        }
    }

    /// The sums of chunks `first..first + n` (zeros where never written).
    fn get(&self, first: u32, n: u32) -> io::Result<Vec<Sum>> {
        match self {
            Sums::File(f) => {
                let mut bytes = vec![0u8; n as usize * SUM_LEN];
                let mut got = 0;
                while got < bytes.len() {
                    match f.read_at(
                        &mut bytes[got..],
                        first as u64 * SUM_LEN as u64 + got as u64,
                    )? {
                        0 => break, // past the end: slots never written
                        k => got += k,
                    }
                }
                Ok(bytes
                    .chunks_exact(SUM_LEN)
                    .map(|s| {
                        let crc = u32::from_le_bytes(s[..4].try_into().unwrap());
                        (crc, s[4..].try_into().unwrap())
                    })
                    .collect())
            }
            Sums::Memory(v) => {
                let v = v.lock().unwrap();
                Ok(v[first as usize..(first + n) as usize].to_vec())
            }
        }
    }
}

fn bit(bits: &[u8], i: u32) -> bool {
    bits[i as usize / 8] & (1 << (i % 8)) != 0
}

fn set_bit(bits: &mut [u8], i: u32, on: bool) {
    if on {
        bits[i as usize / 8] |= 1 << (i % 8);
    } else {
        bits[i as usize / 8] &= !(1 << (i % 8));
    }
}

struct Inner {
    /// Chunks held, as the wire bitmap (bit i of byte i/8).
    written: Vec<u8>,
    /// Chunks whose sums are in the log (durable).
    durable: Vec<u8>,
    /// Bits set in `written`.
    present: u32,
    /// Written chunks not yet in the log, with their sums: at most a sync's worth.
    pending: HashMap<u32, Sum>,
    unsynced: u64,
    last_sync: Instant,
    /// A background sync is running.
    syncing: bool,
    /// WRITEs past the phase check and not yet recorded: a COMMIT must not hash around them.
    writers: u32,
    /// Bytes stored over chunks already written, since this process opened the upload.
    rewritten: u64,
    phase: Phase,
    /// The whole-file BLAKE3 that COMMIT verified (set when sealed).
    verified: [u8; 32],
    /// Chunks a SEED has already read from the destination (bit i of byte i/8; empty until
    /// the first SEED): each is tried once, so SEED costs at most one read of the old file.
    seed_tried: Vec<u8>,
}

/// Where an upload is in its life. Only `Open` takes chunks, so once COMMIT has verified the
/// whole-file hash nothing can change the bytes it verified, before or after they are published.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Open,
    /// Verified, being made durable and published; back to `Open` if that fails.
    Sealing,
    /// Published: (size, identity).
    Committed((u64, String)),
}

impl Inner {
    /// An upload of `count` chunks with none present.
    fn new(count: u32) -> Inner {
        let bytes = (count as usize).div_ceil(8);
        Inner {
            written: vec![0; bytes],
            durable: vec![0; bytes],
            present: 0,
            pending: HashMap::new(),
            unsynced: 0,
            last_sync: Instant::now(),
            syncing: false,
            writers: 0,
            rewritten: 0,
            phase: Phase::Open,
            verified: [0; 32],
            seed_tried: Vec::new(),
        }
    }

    fn mark(&mut self, index: u32, written: bool, durable: bool) {
        match (bit(&self.written, index), written) {
            (false, true) => self.present += 1,
            (true, false) => self.present -= 1,
            _ => {}
        }
        set_bit(&mut self.written, index, written);
        set_bit(&mut self.durable, index, durable);
    }
}

/// What storing a chunk did.
pub struct Written {
    /// The chunk is already durable (a sync covered it).
    pub durable: bool,
    /// A sync is due: the caller runs [`Upload::background_sync`] on a blocking thread.
    pub start_sync: bool,
}

/// A WRITE counted as being stored ([`Upload::begin_write`]) until it is recorded; dropped
/// unrecorded (refused, failed, cancelled), it stops counting.
pub struct Writing {
    upload: Arc<Upload>,
    counted: bool,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if self.counted {
            self.upload.inner.lock().unwrap().writers -= 1;
        }
    }
}

/// One open upload, shared by every handle on it in this process.
pub struct Upload {
    pub id: String,
    pub params: UploadParams,
    pub chunk_size: u32,
    pub count: u32,
    data: File,
    /// A single-chunk upload's named temporary file in `dir` (shared file systems); None for
    /// an anonymous one and for a resumable upload (`<id>.data`).
    temp_name: Option<CString>,
    /// The data file again, for direct writes of whole chunks (multi-chunk uploads,
    /// crate::direct).
    direct: Option<DirectFile>,
    /// Every chunk's CRC32 and chaining value.
    sums: Sums,
    /// Append-only log of durable chunks (`LOG_ENTRY` bytes each); None for an anonymous
    /// (single-chunk) upload, which keeps no state.
    log: Option<File>,
    /// Serializes syncs (background and foreground).
    sync_lock: Mutex<()>,
    dir: PathBuf,
    dir_fd: Arc<File>,
    group: Arc<GroupSync>,
    /// The upload lock of a resumable upload (fs::lease), renewed by [`UploadStore::renew_leases`].
    lease: Option<Lease>,
    /// The store's map of open uploads (resumable ones), which this one leaves when dropped.
    live: Option<Arc<LiveMap>>,
    /// The lease was taken over by another node: this process must not touch the upload again.
    lost: std::sync::atomic::AtomicBool,
    /// Where this upload counts against its owner's quota until published.
    tally: Arc<Mutex<Tally>>,
    /// Frees the file a publish replaced (resumable uploads; others are small).
    reaper: Reaper,
    /// Whether [`Upload::reserve`] may reserve the data file's blocks (a local disk).
    reservable: bool,
    inner: Mutex<Inner>,
}

impl Upload {
    /// Chunks held (bit i of byte i/8).
    pub fn bitmap(&self) -> Vec<u8> {
        self.inner.lock().unwrap().written.clone()
    }

    /// Reserves the data file's blocks at `offset..offset + len` on a local disk, just before a
    /// SEED writes there: direct writes into reserved blocks run side by side where ext4 takes
    /// writes into holes one at a time. Only where chunks matched is reserved (server::seed),
    /// never the declared size: what an abandoned upload holds on disk follows what it
    /// received or took from the destination. fallocate(2), not posix_fallocate:
    /// where the file system cannot reserve, nothing is written. Blocking.
    pub fn reserve(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        if !self.reservable || len == 0 {
            return;
        }
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = nix::fcntl::fallocate(&self.data, flags, off, len) {
            tracing::debug!(upload = %self.id, error = %e, "not reserved");
        }
    }

    /// Whether a SEED may read chunk `index` from the destination: true the first time it is
    /// asked for a chunk the upload does not hold, false ever after (the answer would not
    /// change unless the destination did; the client sends the chunk instead).
    pub fn first_seed_of(&self, index: u32) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if index >= self.count || bit(&inner.written, index) {
            return false;
        }
        if inner.seed_tried.is_empty() {
            inner.seed_tried = vec![0; (self.count as usize).div_ceil(8)];
        }
        let first = !bit(&inner.seed_tried, index);
        set_bit(&mut inner.seed_tried, index, true);
        first
    }

    /// CRC32 of chunks `first..first + n`, 0 where absent. Blocking.
    pub fn crcs(&self, first: u32, n: u32) -> Result<Vec<u32>, UploadError> {
        let written = self.bitmap();
        let sums = self.sums.get(first, n).map_err(|e| self.io(e))?;
        Ok((first..)
            .zip(sums)
            .map(|(i, (crc, _))| if bit(&written, i) { crc } else { 0 })
            .collect())
    }

    /// Counts a WRITE as being stored from now on (COMMIT answers Busy until it is recorded or
    /// dropped): called when its DATA frame is accepted, before the decompression and the wait
    /// for a blocking thread that come before [`Upload::write_counted`]. A COMMIT sent right
    /// after the last WRITE, without waiting for its ack, would otherwise find the chunk
    /// missing (Incomplete, final) instead of Busy.
    pub fn begin_write(self: &Arc<Self>) -> Result<Writing, UploadError> {
        let mut inner = self.inner.lock().unwrap();
        match inner.phase {
            Phase::Open => inner.writers += 1,
            Phase::Sealing => return Err(self.sealing("a COMMIT is in progress")),
            Phase::Committed(_) => {
                return Err(UploadError::Committed {
                    id: self.id.clone(),
                })
            }
        }
        Ok(Writing {
            upload: self.clone(),
            counted: true,
        })
    }

    /// Stores chunk `index` whose CRC32 `crc` the codec already verified. Returns whether the
    /// chunk is durable now. Blocking.
    pub fn write_chunk(
        self: &Arc<Self>,
        index: u32,
        data: &[u8],
        crc: u32,
    ) -> Result<Written, UploadError> {
        self.write_counted(self.begin_write()?, index, data, crc)
    }

    /// [`Upload::write_chunk`] of a WRITE counted since [`Upload::begin_write`].
    pub fn write_counted(
        &self,
        writing: Writing,
        index: u32,
        data: &[u8],
        crc: u32,
    ) -> Result<Written, UploadError> {
        let cv = chunk_cv(data, index, self.chunk_size, self.params.size);
        self.write_hashed_chunk(writing, index, data, crc, cv)
    }

    /// [`Upload::write_counted`] of a chunk whose chaining value the caller has just computed
    /// from these very bytes (`chunk_cv(data, index, ..)` of this upload; SEED hashes to
    /// compare).
    pub fn write_hashed_chunk(
        &self,
        mut writing: Writing,
        index: u32,
        data: &[u8],
        crc: u32,
        cv: ChainingValue,
    ) -> Result<Written, UploadError> {
        debug_assert!(
            std::ptr::eq(&*writing.upload, self),
            "another upload's ticket"
        );
        if index >= self.count {
            return Err(UploadError::BadChunk {
                chunk: index,
                count: self.count,
            });
        }
        let want = chunk_len(self.params.size, self.chunk_size, index);
        if data.len() != want as usize {
            return Err(UploadError::BadLength {
                chunk: index,
                got: data.len(),
                want,
            });
        }
        let offset = index as u64 * self.chunk_size as u64;
        self.check_held()?;
        if let Some(durable) = self.written_again(index, (crc, cv), data.len())? {
            return Ok(Written {
                durable,
                start_sync: false,
            });
        }
        let stored = self.store(data, offset);
        let (start_sync, must_wait) = {
            let mut inner = self.inner.lock().unwrap();
            // Under the same lock as the chunk is marked present: a COMMIT sees either this
            // writer or the chunk.
            inner.writers -= 1;
            writing.counted = false;
            stored?;
            // Under the lock: a concurrent write of the same chunk cannot leave slot and
            // pending entry disagreeing.
            self.sums.put(index, (crc, cv)).map_err(|e| self.io(e))?;
            inner.mark(index, true, false);
            inner.pending.insert(index, (crc, cv));
            inner.unsynced += data.len() as u64;
            let due = self.resumable()
                && (inner.unsynced >= SYNC_BYTES || inner.last_sync.elapsed() >= SYNC_INTERVAL);
            let start = due && !inner.syncing;
            if start {
                inner.syncing = true;
            }
            (start, inner.unsynced >= MAX_UNSYNCED)
        };
        if must_wait {
            // The disk is slower than the network: hold this writer until a sync catches up,
            // which bounds what a crash can lose.
            self.sync()?;
        }
        Ok(Written {
            durable: bit(&self.inner.lock().unwrap().durable, index),
            start_sync,
        })
    }

    /// A WRITE of a chunk already written: Some(durable) if it holds these very bytes (nothing
    /// to store), an error once this opening of the upload has stored more than its size plus
    /// [`REWRITE_SLACK_CHUNKS`] chunks over written chunks, else None (store it). A compressed
    /// WRITE of a chunk of zeros is ~30,000 times smaller than what it makes fsd write: sent
    /// again and again, 72 KiB received had fsd write 2 GiB.
    fn written_again(&self, index: u32, sum: Sum, len: usize) -> Result<Option<bool>, UploadError> {
        let mut inner = self.inner.lock().unwrap();
        if !bit(&inner.written, index) {
            return Ok(None);
        }
        let held = self.sums.get(index, 1).map_err(|e| self.io(e))?;
        if held.first() == Some(&sum) {
            return Ok(Some(bit(&inner.durable, index)));
        }
        let max = self.params.size + REWRITE_SLACK_CHUNKS * u64::from(self.chunk_size);
        let rewritten = inner.rewritten + u64::try_from(len).unwrap_or(u64::MAX);
        if rewritten > max {
            return Err(UploadError::Rewritten {
                id: self.id.clone(),
                max,
            });
        }
        inner.rewritten = rewritten;
        Ok(None)
    }

    /// Writes a chunk's bytes at `offset`, directly where the chunk allows it.
    fn store(&self, data: &[u8], offset: u64) -> Result<(), UploadError> {
        let direct = match &self.direct {
            Some(d) => d.write_at(data, offset).map_err(|e| self.io(e))?,
            None => false,
        };
        if !direct {
            self.data
                .write_all_at(data, offset)
                .map_err(|source| self.io(source))?;
        }
        Ok(())
    }

    fn sealing(&self, why: &'static str) -> UploadError {
        UploadError::Sealing {
            id: self.id.clone(),
            why,
        }
    }

    /// Runs the sync that [`Written::start_sync`] asked for (on a blocking thread, off the
    /// write path). A failure is only logged: the chunks stay non-durable and the next sync,
    /// or COMMIT's, tries again and reports.
    pub fn background_sync(&self) {
        if let Err(e) = self.sync() {
            tracing::warn!(upload = %self.id, error = %e, "background sync failed");
        }
        self.inner.lock().unwrap().syncing = false;
    }

    /// Uploads of more than one chunk keep resumable state; a single chunk is simply re-sent.
    fn resumable(&self) -> bool {
        self.log.is_some()
    }

    /// Makes every written chunk durable and records it: fdatasync the data, then append the
    /// newly durable chunks to the log and fdatasync that. A crash between the two only loses
    /// log entries, never claims bytes that are not on disk.
    pub fn sync(&self) -> Result<(), UploadError> {
        // A node that may have lost the lease records nothing more in the upload's log.
        self.check_held()?;
        let _one_at_a_time = self.sync_lock.lock().unwrap();
        let (snapshot, pending) = {
            let inner = self.inner.lock().unwrap();
            let snapshot: Vec<(u32, Sum)> = inner.pending.iter().map(|(i, s)| (*i, *s)).collect();
            (snapshot, inner.unsynced)
        };
        nix::unistd::fdatasync(self.data.as_fd()).map_err(|e| self.io(e.into()))?;
        if let Some(log) = self.log.as_ref().filter(|_| !snapshot.is_empty()) {
            let mut entries = Vec::with_capacity(snapshot.len() * LOG_ENTRY);
            for (i, (crc, cv)) in &snapshot {
                entries.extend_from_slice(&log_entry(*i, *crc, cv));
            }
            (&*log).write_all(&entries).map_err(|e| self.io(e))?;
            nix::unistd::fdatasync(log.as_fd()).map_err(|e| self.io(e.into()))?;
        }
        let mut inner = self.inner.lock().unwrap();
        for (i, sum) in snapshot {
            // Rewritten since the snapshot with other bytes: still pending.
            if inner.pending.get(&i) == Some(&sum) {
                inner.pending.remove(&i);
                set_bit(&mut inner.durable, i, true);
            }
        }
        inner.unsynced = inner.unsynced.saturating_sub(pending);
        inner.last_sync = Instant::now();
        Ok(())
    }

    /// Writes the upload's header record (what it is, not which chunks it has) atomically:
    /// tmp file, fdatasync, rename. Once, when the upload is created.
    fn write_header(&self) -> io::Result<()> {
        let r = UploadRecord {
            path: self.params.dest.clone(),
            size: self.params.size,
            chunk_size: self.chunk_size,
            owner: self.params.owner.clone(),
            mode_bits: self.params.mode_bits,
            mtime_ns: self.params.mtime_ns,
            no_clobber: self.params.no_clobber,
        };
        let path = self.dir.join(format!("{}.state", self.id));
        let tmp = self.dir.join(format!("{}.state.tmp", self.id));
        let f = File::create(&tmp)?;
        f.write_all_at(&r.encode_to_vec(), 0)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)
    }

    /// Verifies the upload and gives the file its final mode and mtime: COMMIT's first step.
    /// From here the upload takes no more chunks; [`Upload::publish`] ends the commit, or
    /// [`Upload::unseal`] reopens it when a later step fails. Blocking.
    pub fn seal(&self, expected: &[u8]) -> Result<(), UploadError> {
        self.check_held()?;
        {
            let mut inner = self.inner.lock().unwrap();
            match inner.phase {
                Phase::Open if inner.writers > 0 => {
                    return Err(self.sealing("chunks are still being written"))
                }
                Phase::Open => {}
                Phase::Sealing => return Err(self.sealing("a COMMIT is in progress")),
                Phase::Committed(_) => {
                    return Err(UploadError::Committed {
                        id: self.id.clone(),
                    })
                }
            }
            let missing = self.count - inner.present;
            if missing > 0 {
                return Err(UploadError::Incomplete {
                    missing,
                    count: self.count,
                });
            }
            inner.phase = Phase::Sealing;
        }
        // Sealed: no chunk changes while the sums are read back.
        let server = match self.root_hash() {
            Ok(h) => h,
            Err(e) => {
                self.unseal();
                return Err(e);
            }
        };
        if expected != server {
            self.unseal();
            return Err(UploadError::HashMismatch {
                client: hex::encode(expected),
                server: hex::encode(server),
            });
        }
        self.inner.lock().unwrap().verified = server;
        let finished = self.finish_metadata();
        if finished.is_err() {
            self.unseal();
        }
        finished
    }

    /// The whole-file BLAKE3 from the chunks' sums, read back in order a block at a time.
    fn root_hash(&self) -> Result<[u8; 32], UploadError> {
        const BLOCK: u32 = 4096;
        let mut h = RootHasher::default();
        let mut first = 0;
        while first < self.count {
            let n = BLOCK.min(self.count - first);
            for (_, cv) in self.sums.get(first, n).map_err(|e| self.io(e))? {
                h.push(cv);
            }
            first += n;
        }
        Ok(h.finish())
    }

    /// Reopens a sealed upload whose commit failed after [`Upload::seal`], so that the client
    /// can retry it. A committed upload stays committed.
    pub fn unseal(&self) {
        let mut inner = self.inner.lock().unwrap();
        if inner.phase == Phase::Sealing {
            inner.phase = Phase::Open;
        }
    }

    /// The published file's mode and mtime, set on the data before it gets its name.
    fn finish_metadata(&self) -> Result<(), UploadError> {
        let mode = if self.params.mode_bits == 0 {
            0o644
        } else {
            // Permission bits only: a client never gets setuid, setgid or sticky files.
            self.params.mode_bits & 0o777
        };
        nix::sys::stat::fchmod(
            self.data.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(mode),
        )
        .map_err(|e| self.io(e.into()))?;
        if self.params.mtime_ns != 0 {
            let t = nix::sys::time::TimeSpec::new(
                self.params.mtime_ns.div_euclid(1_000_000_000),
                self.params.mtime_ns.rem_euclid(1_000_000_000),
            );
            nix::sys::stat::futimens(self.data.as_fd(), &t, &t).map_err(|e| self.io(e.into()))?;
        }
        Ok(())
    }

    /// The group sync an anonymous upload's commit shares: its data must be synced through it
    /// before [`Upload::publish`] and the new name after. None for a stateful upload, whose
    /// publish syncs by itself.
    pub fn group(&self) -> Option<&Arc<GroupSync>> {
        (!self.resumable() && self.temp_name.is_none()).then_some(&self.group)
    }

    /// Puts a sealed upload at its destination beneath `root`: COMMIT's second step, after
    /// [`Upload::seal`] (and for an anonymous upload a group sync). A stateful upload is
    /// fsynced, renamed into place and its directory fsynced; an anonymous one is linked into
    /// place, and its new name needs a group sync before it is reported durable. Blocking.
    pub fn publish(&self, root: &Root, ids: &RootId) -> Result<(u64, String), UploadError> {
        if self.inner.lock().unwrap().phase != Phase::Sealing {
            return Err(self.sealing("publish before seal"));
        }
        let published = self.link_into(root, ids);
        let mut inner = self.inner.lock().unwrap();
        // Committed from the moment the name is in place (link_into says so), even if a sync
        // after that fails: the data file is the published file now, and no WRITE may reach it.
        if published.is_err() && inner.phase == Phase::Sealing {
            inner.phase = Phase::Open;
        }
        published
    }

    /// The name is in place: from here the upload is committed, whatever fails next.
    fn named(&self, before: std::fs::Metadata, ids: &RootId) -> (u64, String) {
        // The identity as published (the rename changed the ctime), else as before it.
        let meta = self.data.metadata().unwrap_or(before);
        let done = (self.params.size, ids.identity(&meta));
        let mut inner = self.inner.lock().unwrap();
        inner.phase = Phase::Committed(done.clone());
        inner.unsynced = 0;
        done
    }

    /// [`Upload::publish`]'s file-system work.
    fn link_into(&self, root: &Root, ids: &RootId) -> Result<(u64, String), UploadError> {
        let (path, no_clobber) = (&self.params.path, self.params.no_clobber);
        // Taken before the name moves: on JuiceFS, once another node has replaced the name,
        // fstat of the published inode fails with ENOENT although the publish happened.
        let before = self.data.metadata().map_err(|e| self.io(e))?;
        let named = match &self.temp_name {
            _ if self.resumable() => Some(CString::new(format!("{}.data", self.id)).unwrap()),
            Some(name) => Some(name.clone()),
            None => None,
        };
        if let Some(name) = named {
            // Data durable before the name points at it; then the name itself.
            self.data.sync_all().map_err(|e| self.io(e))?;
            if self.resumable() {
                // Still ours: a node that took the upload over may be writing it (the periodic
                // renewal would only notice later).
                self.check_owned()?;
                self.write_commit_record(before.ino(), ids.identity(&before))?;
            }
            // The file this replaces is kept linked until the reply is on its way.
            let replaced = CString::new(format!("{}.replaced", self.id)).unwrap();
            let kept = self.resumable()
                && !no_clobber
                && root.keep_link(path, self.dir_fd.as_fd(), &replaced).is_ok();
            // And still ours right before the name moves: the syncs above may have stalled
            // past the lease.
            let owned = self.check_owned();
            let published = owned
                .and_then(|()| Ok(root.publish(self.dir_fd.as_fd(), &name, path, no_clobber)?));
            let parent = match published {
                Ok(parent) => parent,
                Err(e) => {
                    let _ = std::fs::remove_file(self.dir.join(format!("{}.done", self.id)));
                    if kept {
                        remove_kept(&self.dir_fd, &replaced);
                    }
                    return Err(e);
                }
            };

            let ino = before.ino();
            let done = self.named(before, ids);
            if self.resumable() {
                // The record again, with the identity the COMMIT answers (the rename changed
                // the ctime): a COMMIT retried after the name was replaced gets that one. Best
                // effort: a crash before it leaves the record from before the rename.
                let _ = self.write_commit_record(ino, done.1.clone());
                // `data` is gone after a rename; after a link whose unlink failed, this tries
                // again (the lock goes last: until then no other node can open the upload).
                for ext in ["data", "state", "log", "sums", "lock"] {
                    let _ = std::fs::remove_file(self.dir.join(format!("{}.{ext}", self.id)));
                }
                self.tally.lock().unwrap().remove(&self.id);
            }
            let synced = nix::unistd::fsync(parent);
            // After the sync: an unlink that frees a big file holds the journal meanwhile.
            if kept {
                self.reaper.remove(replaced);
            }
            synced.map_err(|e| self.io(e.into()))?;
            Ok(done)
        } else {
            root.publish_anonymous(self.data.as_fd(), self.dir_fd.as_fd(), path, no_clobber)?;
            Ok(self.named(before, ids))
        }
    }

    /// Marks the upload as taken over by another node.
    fn lose(&self) {
        if !self.lost.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(upload = %self.id, "upload lease taken over by another node; giving it up");
        }
    }

    /// Refuses to touch an upload whose lease another node took over, or may have: this node
    /// fences itself once its last renewal is older than half the lease (fs::lease), without
    /// waiting for the renewal that would tell it. Cheap (no file-system call): every WRITE asks.
    fn check_held(&self) -> Result<(), UploadError> {
        let why = if self.lost.load(std::sync::atomic::Ordering::Relaxed) {
            "taken over by another server node (this one's lease ran out)"
        } else if self.lease.as_ref().is_some_and(|l| !l.catch_up()) {
            "this server node's lease was not renewed in time (a pause or an overload): another node may have taken the upload over"
        } else {
            return Ok(());
        };
        Err(UploadError::Sealing {
            id: self.id.clone(),
            why,
        })
    }

    /// [`Upload::check_held`], and `<id>.lock` still names this node's lock file: right before
    /// a step that acts on the upload's files by name.
    fn check_owned(&self) -> Result<(), UploadError> {
        if self.lease.as_ref().is_some_and(|l| !l.is_ours()) {
            self.lose();
        }
        self.check_held()
    }

    /// `<id>.done`, synced before the publish: from the rename on, a COMMIT by upload id on
    /// any node is answered from it ([`UploadStore::committed`]).
    /// The commit record of this upload, whose data file is inode `ino`, published with
    /// `identity`.
    fn write_commit_record(&self, ino: u64, identity: String) -> Result<(), UploadError> {
        let record = CommitRecord {
            owner: self.params.owner.clone(),
            dest: self.params.dest.clone(),
            path: self.params.path.clone(),
            size: self.params.size,
            blake3: self.inner.lock().unwrap().verified.to_vec(),
            ino,
            identity,
        };
        let path = self.dir.join(format!("{}.done", self.id));
        let write = || -> io::Result<()> {
            let mut f = File::create(&path)?;
            f.write_all(&record.encode_to_vec())?;
            f.sync_all()
        };
        write().map_err(|e| self.io(e))
    }

    fn io(&self, source: io::Error) -> UploadError {
        UploadError::Io {
            id: self.id.clone(),
            source,
        }
    }
}

impl Drop for Upload {
    /// Last handle gone (client closed, connection dropped, shutdown): keep what arrived; a
    /// named temporary file that was not published goes.
    fn drop(&mut self) {
        if let Some(name) = &self.temp_name {
            let committed = matches!(self.inner.lock().unwrap().phase, Phase::Committed(_));
            if !committed {
                let _ = nix::unistd::unlinkat(
                    &*self.dir_fd,
                    name.as_c_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
        }
        let pending = {
            let inner = self.inner.lock().unwrap();
            inner.phase == Phase::Open
                && inner.unsynced > 0
                && self.resumable()
                && self.check_held().is_ok()
        };
        if pending {
            if let Err(e) = self.sync() {
                tracing::warn!(upload = %self.id, error = %e, "could not persist upload on close");
            }
        }
        // Out of the map once synced and unlocked: until then an OPEN of this upload waits for
        // the lock rather than answering Busy. Nothing drops an upload while holding the map
        // (UploadStore::open lets it go first), but try_lock rather than risk a deadlock: the
        // map is held only for lookups and inserts, so a few tries get it.
        drop(self.lease.take());
        let Some(live) = &self.live else { return };
        for _ in 0..100 {
            if let Ok(mut live) = live.try_lock() {
                if live.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                    live.remove(&self.id);
                }
                return;
            }
            std::thread::yield_now();
        }
    }
}

/// Least time between two counts of the uploads from the directory on behalf of refused OPENs.
const RECOUNT_EVERY: Duration = Duration::from_secs(10);

/// How many times (10 ms apart) an OPEN waits for another OPEN of the same upload to bring it
/// up before it answers Busy: longer than a lease taken over after a crash takes (40 x 50 ms).
const OPENING_WAITS: u32 = 500;

/// An id in [`UploadStore::opening`], taken out when the OPEN that put it there ends.
struct Opening<'a> {
    ids: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.ids.lock().unwrap().remove(&self.id);
    }
}

/// The resumable uploads open in this process, by id: each entry goes when its upload is
/// dropped, so the map follows what is open, not every upload ever opened.
type LiveMap = Mutex<HashMap<String, Weak<Upload>>>;

/// Longest state or commit record read back (a path of at most 4096 bytes and a few fields):
/// a damaged or foreign file in a shared state directory is not read whole.
const MAX_RECORD: u64 = 64 * 1024;

/// The bytes of record file `path`, or None if it cannot be read or is longer than a record.
fn read_record(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)
        .ok()?
        .take(MAX_RECORD + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    u64::try_from(bytes.len())
        .is_ok_and(|n| n <= MAX_RECORD)
        .then_some(bytes)
}

/// Whether a recorded chunk size could have been given to an upload of `size` bytes. A state
/// record sizes the upload's bitmaps and buffers on resume: one that is damaged, or written by
/// something else in a shared state directory, starts the upload afresh instead.
fn plausible_chunk_size(size: u64, chunk_size: u32) -> bool {
    chunk_size.is_power_of_two()
        && chunk_size >= MIN_CHUNK_SIZE
        && chunk_size <= chunk_size_for(size, MAX_CHUNK_SIZE)
        && checked_chunk_count(size, chunk_size).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u32 = 64 * 1024;

    fn params(size: u64) -> UploadParams {
        UploadParams {
            owner: "o".into(),
            dest: "f".into(),
            path: "f".into(),
            size,
            resume_key: "k".into(),
            base_chunk_size: CHUNK,
            restart: false,
            mode_bits: 0,
            mtime_ns: 0,
            no_clobber: false,
            max_uploads: 10,
            max_upload_bytes: u64::MAX,
        }
    }

    /// A store in `dir`/state on a local disk, with a lease no test outlives.
    fn local_store(dir: &std::path::Path) -> UploadStore {
        let (ttl, lease) = (Duration::from_secs(60), Duration::from_secs(30));
        UploadStore::new(dir.join("state"), ttl, lease, FsKind::Local).unwrap()
    }

    /// A renewal pass that runs late (it waits for a blocking thread like any other work) is
    /// no reason to refuse a healthy upload: past half the lease but within it, a WRITE renews
    /// the lease itself and goes on.
    #[test]
    fn a_late_renewal_does_not_fence_a_healthy_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = UploadStore::new(
            dir.path().join("state"),
            Duration::from_secs(60),
            Duration::from_secs(1),
            FsKind::Local,
        )
        .unwrap();
        let up = store.open(&params(3 * u64::from(CHUNK))).unwrap();
        std::thread::sleep(Duration::from_millis(700)); // no renew_leases meanwhile
        let chunk = vec![5u8; usize::try_from(CHUNK).unwrap()];
        up.write_chunk(0, &chunk, crc32fast::hash(&chunk)).unwrap();
        up.sync().unwrap();
    }

    /// The map of open uploads follows what is open: an upload leaves it when its last handle
    /// goes, so opening many uploads one after another does not grow it (or the renewals'
    /// and live_count's walks over it) for good.
    #[test]
    fn the_map_of_open_uploads_holds_only_open_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path());
        let open = |k: u32| {
            let mut p = params(3 * u64::from(CHUNK));
            p.resume_key = format!("k{k}");
            p.max_uploads = 100;
            store.open(&p).unwrap()
        };
        for k in 0..50 {
            drop(open(k));
        }
        assert_eq!(store.live.lock().unwrap().len(), 0);
        let kept = open(50);
        // Reopened while held: the same upload, still one entry.
        assert!(Arc::ptr_eq(&kept, &open(50)));
        assert_eq!(store.live.lock().unwrap().len(), 1);
        drop(kept);
        assert_eq!(store.live.lock().unwrap().len(), 0);
        // And after it left the map, it is resumed as before (its lease was let go).
        drop(open(50));
    }

    /// An OPEN that takes long (a resume reads every chunk it holds back and checks it: here
    /// 512 MiB, held as a hole) holds up only OPENs of that upload, not another credential's
    /// OPEN of another one.
    #[test]
    fn a_slow_open_holds_up_only_its_own_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path());
        const CHUNKS: u32 = 8 * 1024;
        let p = params(u64::from(CHUNKS) * u64::from(CHUNK));
        let id = p.id();
        drop(store.open(&p).unwrap());
        // Every chunk logged as held: all zeros, which the sparse data file reads back as.
        let zeros = crc32fast::hash(&vec![0u8; CHUNK as usize]);
        let log: Vec<u8> = (0..CHUNKS)
            .flat_map(|i| log_entry(i, zeros, &[0; 32]))
            .collect();
        std::fs::write(store.path(&id, "log"), log).unwrap();
        let slow_done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let resumed = store.open(&p).unwrap();
                slow_done.store(true, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(resumed.inner.lock().unwrap().present, CHUNKS);
            });
            std::thread::sleep(Duration::from_millis(100));
            let mut other = params(3 * u64::from(CHUNK));
            other.owner = "another".into();
            drop(store.open(&other).unwrap());
            assert!(
                !slow_done.load(std::sync::atomic::Ordering::SeqCst),
                "another upload's OPEN waited for a resume's read-back"
            );
        });
    }

    /// Node A stops renewing (hung); node B takes the upload over after the lease. A's WRITE
    /// is refused by A itself (its renewal is too old), and even a write through the descriptor
    /// A still holds lands in a file B never publishes: B copied the chunks into new files.
    #[test]
    fn a_taken_over_upload_is_out_of_the_old_holder_s_reach() {
        let dir = tempfile::tempdir().unwrap();
        let root_dir = dir.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        let state = dir.path().join("state");
        let store = || {
            let lease = Duration::from_secs(1);
            UploadStore::new(
                state.clone(),
                Duration::from_secs(60),
                lease,
                FsKind::Shared,
            )
            .unwrap()
        };
        let (a, b) = (store(), store());
        let data: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        let p = params(data.len() as u64);
        let chunk = |i: u32| &data[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
        let crc = |d: &[u8]| crc32fast::hash(d);

        let held = a.open(&p).unwrap();
        held.write_chunk(0, chunk(0), crc(chunk(0))).unwrap();
        held.sync().unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let taken = b.open(&p).unwrap();
        assert_eq!(taken.bitmap(), vec![0b001], "chunk 0 carried over");
        assert_ne!(
            held.data.metadata().unwrap().ino(),
            taken.data.metadata().unwrap().ino(),
            "the taker resumed the old holder's data file"
        );

        let evil = vec![0xAA; CHUNK as usize];
        assert!(
            held.write_chunk(1, &evil, crc(&evil)).is_err(),
            "a node whose lease ran out still took a WRITE"
        );
        assert!(held.sync().is_err(), "and still synced its log");
        held.data.write_all_at(&evil, 0).unwrap();

        for i in 1..3 {
            taken.write_chunk(i, chunk(i), crc(chunk(i))).unwrap();
        }
        b.renew_leases(); // what fsd does every quarter of the lease
        taken.seal(blake3::hash(&data).as_bytes()).unwrap();
        let root = Root::open(&root_dir, None).unwrap();
        let ids = RootId::new([0; 16], 0);
        taken.publish(&root, &ids).unwrap();
        held.data.write_all_at(&evil, CHUNK as u64).unwrap();
        assert!(std::fs::read(root_dir.join("f")).unwrap() == data);
        drop(held);
        assert!(std::fs::read(root_dir.join("f")).unwrap() == data);
    }
}
