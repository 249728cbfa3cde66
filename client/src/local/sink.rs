//! The local side of one download: the part file (or stdout), the chunks present and their
//! BLAKE3 chaining values, the resume state, preallocation and, once verified, publishing.
//!
//! `download` drives the network side and hands every chunk to [`Sink::put`]; nothing here
//! talks to the server. A multi-chunk file is written into a named part in the destination's
//! working directory ([`Work`]) with a state file beside it; a file of at most one chunk into
//! an anonymous (O_TMPFILE) file. Either is published by linking the inode that was written
//! and hashed ([`publish`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use fsd::direct::{AlignedBuf, DirectFile};
use fsd::durable::GroupSync;
use fsd::integrity::{chunk_cv, hash_chunk, root_hash};
use fsd::protocol::chunk_len;
use nix::unistd::Whence;
use tracing::debug;

use super::state::{Bitmap, PartState};
use super::{lacks_space, new_mode, publish, punch_hole, LocalDir, Work};
use crate::error::{Error, Result};

/// Write the resume state at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Chunks up to this size are written on the async thread (see `Sink::put`).
const INLINE_WRITE: usize = 64 * 1024;
/// To stdout, lanes fetch no chunk this far or further past the next one stdout needs: the
/// chunks in between wait in memory (`Reorder`). At most this many chunks, and at most
/// [`STDOUT_AHEAD_BYTES`] of them (chunk sizes are the server's choice), whatever `-j`.
const STDOUT_AHEAD: u32 = 32;
const STDOUT_AHEAD_BYTES: u32 = 32 << 20;

/// The local side of one file download.
#[derive(Clone)]
pub(crate) enum Out {
    File {
        dir: LocalDir,
        name: String,
        /// Where its working files go.
        work: Work,
        /// How the file is made durable before its rename: alone (fsync of the file, and of
        /// the directory after), or with others in one group sync (a tree, which syncs each
        /// directory once at the end).
        group: Option<Arc<GroupSync>>,
    },
    Stdout,
}

/// What OPEN(READ) said about the file.
///
/// Built only from an OpenResponse that passed its checks (download.rs `open_read`): `chunk_size`
/// is a power of two ≤ the frame limit (16 MiB) and `count` ≤ `MAX_CHUNKS_PER_FILE` (2^20),
/// computed in u64. So `as usize` on either (widening on the 64-bit targets fsc builds for)
/// sizes at most a 16 MiB buffer or a 2^20-entry table.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) handle: u32,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) identity: String,
    pub(crate) chunk_size: u32,
    pub(crate) count: u32,
    pub(crate) blake3: [u8; 32],
    pub(crate) mode: u32,
}

pub(crate) async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The local side of one download: the part file (or stdout), the chunks present and their
/// BLAKE3 chaining values, and the resume state.
pub(crate) struct Sink {
    remote: String,
    identity: String,
    pub(crate) size: u64,
    pub(crate) chunk_size: u32,
    count: u32,
    blake3: [u8; 32],
    mode: u32,
    mtime_ns: i64,
    /// Give the file the server's mode exactly rather than less the umask.
    preserve: bool,
    /// Manifest CRCs; empty for files of at most one chunk.
    crcs: Vec<u32>,
    out: SinkOut,
    st: Mutex<Have>,
    /// Serializes checkpoints (state writes).
    saving: Mutex<()>,
    /// Serializes pwrites: buffered writes to one file contend on its inode lock anyway, and
    /// a futex wait is cheaper than the kernel's spinning on 2 cores.
    writing: Mutex<()>,
    /// Signalled when stdout's next chunk advances (lanes wait on it, see `Sink::may_fetch`).
    pub(crate) advanced: tokio::sync::Notify,
    /// Signalled when a chunk is stored for the first time (a READ that another connection
    /// was also asked for ends once every chunk it has left is in, see `download`).
    pub(crate) stored: tokio::sync::Notify,
}

enum SinkOut {
    File {
        dir: LocalDir,
        name: String,
        work: Work,
        /// The working directory, when the part has a name there (`stateful`).
        wd: Option<LocalDir>,
        part: File,
        /// The part again, for direct writes of whole chunks (multi-chunk files, fsd::direct).
        direct: Option<DirectFile>,
        /// Whether a state file is kept (multi-chunk files only).
        stateful: bool,
        group: Option<Arc<GroupSync>>,
    },
    Stdout(Mutex<Reorder>),
}

struct Have {
    have: Bitmap,
    /// Chunks stored or being written. A chunk is written once: a second copy (the other READ
    /// of an endgame, a retry) is dropped unwritten, so the part holds exactly the bytes whose
    /// chaining values the whole-file hash is built from. Were a copy written over a stored
    /// chunk, a peer could change the file after it was hashed (a CRC32 is easily matched).
    claimed: Bitmap,
    cvs: Vec<ChainingValue>,
    done_bytes: u64,
    unsaved: u32,
    last_save: Instant,
}

/// Chunks that arrived ahead of the next one stdout needs. Lanes fetch only within reach of it
/// (`Sink::fetch_limit`), so this holds at most [`STDOUT_AHEAD_BYTES`] (or one chunk).
struct Reorder {
    next: u32,
    pending: BTreeMap<u32, Bytes>,
    /// Bytes handed to stdout (counted before each write: a write that fails half way may
    /// have emitted some). Stdout cannot take bytes back, so once this is not 0 the download
    /// can no longer start over (see `Sink::emitted`).
    emitted: u64,
}

/// How a fresh part recognises the chunks of the destination's old version that are still
/// current (chunk delta, [`seed_from_old`]).
pub(crate) enum Seed {
    /// Equal to the server's BLAKE3 chaining value of that chunk.
    Cvs(Vec<ChainingValue>),
    /// Equal CRC32, from a server that sends no chaining values: a chunk kept wrongly makes the
    /// whole-file BLAKE3 fail, and the download is redone without seeding.
    Crcs,
}

impl Sink {
    /// Opens or creates the part file; with a matching `state`, keeps every chunk already on
    /// disk that passes its CRC32 (claimed in the state or not: data written just before a
    /// kill is in the page cache even if the state did not yet claim it). Without one, and
    /// with `seed`, takes what is still current from the destination's old version
    /// ([`seed_from_old`]).
    pub(crate) fn create(
        remote: String,
        m: Meta,
        crcs: Vec<u32>,
        out: Out,
        state: Option<PartState>,
        preserve: bool,
        seed: Option<Seed>,
    ) -> Result<Arc<Sink>> {
        let mut state = state;
        let mut have = Have {
            have: Bitmap::new(m.count),
            claimed: Bitmap::new(m.count),
            cvs: vec![[0; 32]; m.count as usize],
            done_bytes: 0,
            unsaved: 0,
            last_save: Instant::now(),
        };
        let out = match out {
            Out::Stdout => SinkOut::Stdout(Mutex::new(Reorder {
                next: 0,
                pending: BTreeMap::new(),
                emitted: 0,
            })),
            Out::File {
                dir,
                name,
                work,
                group,
            } => {
                let err = |e| Error::io(dir.display(&name), e);
                let stateful = m.count > 1;
                // Nothing to resume in one chunk: an unnamed file, linked in when complete.
                let anonymous = (!stateful).then(|| dir.create_anonymous()).flatten();
                let wd = match anonymous {
                    Some(_) => None,
                    None => Some(work.dir().map_err(err)?),
                };
                let part = match (anonymous, &wd) {
                    (Some(f), _) => f,
                    (None, Some(wd)) => open_part(wd, &work, &mut state).map_err(err)?,
                    (None, None) => unreachable!("a named part has a working directory"),
                };
                if let Some(st) = &state {
                    let claimed = st.bitmap(m.count);
                    verify_part(&part, &m, &crcs, &claimed, &mut have).map_err(err)?;
                    debug!(%remote, chunks = have.have.count(), "resuming");
                }
                if stateful {
                    // The server's size must fit before any of it is reserved.
                    if let Some((needed, free)) = lacks_space(&part, m.size).map_err(err)? {
                        drop(part);
                        if state.is_none() {
                            if let Some(wd) = &wd {
                                let _ = wd.remove(&work.part());
                                let _ = wd.remove(&work.state());
                            }
                            work.tidy();
                        }
                        return Err(Error::NoSpace {
                            path: dir.display(&name),
                            needed,
                            free,
                        });
                    }
                    part.set_len(m.size).map_err(err)?;
                }
                if stateful && state.is_none() {
                    // Reserve the space now: fewer fragments. A reservation that fails half
                    // way (the space went to someone else since the check) is given back.
                    // fallocate(2), not posix_fallocate: where the file system cannot reserve
                    // (ramfs, ext2, many FUSE file systems), glibc would write a byte into
                    // every block of the file first.
                    let len = i64::try_from(m.size).unwrap_or(i64::MAX);
                    let flags = nix::fcntl::FallocateFlags::empty();
                    if let Err(e) = nix::fcntl::fallocate(&part, flags, 0, len) {
                        debug!("fallocate: {e}");
                        let _ = punch_hole(&part, 0, m.size);
                    }
                }
                let direct = stateful.then(|| DirectFile::reopen(&part)).flatten();
                if let (Some(seed), None, true) = (&seed, &state, stateful) {
                    let old = Old {
                        dir: &dir,
                        name: &name,
                        seed,
                        crcs: &crcs,
                        clone: clone_range,
                    };
                    old.seed(&part, direct.as_ref(), &m, &mut have)
                        .map_err(err)?;
                    debug!(%remote, chunks = have.have.count(), "kept from the old version");
                }
                SinkOut::File {
                    direct,
                    dir,
                    name,
                    work,
                    wd,
                    part,
                    stateful,
                    group,
                }
            }
        };
        have.claimed = have.have.clone();
        let sink = Sink {
            remote,
            identity: m.identity,
            size: m.size,
            chunk_size: m.chunk_size,
            count: m.count,
            blake3: m.blake3,
            mode: m.mode,
            mtime_ns: m.mtime_ns,
            preserve,
            crcs,
            out,
            st: Mutex::new(have),
            saving: Mutex::new(()),
            advanced: tokio::sync::Notify::new(),
            stored: tokio::sync::Notify::new(),
            writing: Mutex::new(()),
        };
        if let SinkOut::File { stateful: true, .. } = sink.out {
            // Record what the part belongs to before any chunk is written into it.
            sink.checkpoint()?;
        }
        Ok(Arc::new(sink))
    }

    pub(crate) fn same_version(&self, m: &Meta) -> bool {
        self.identity == m.identity
            && self.size == m.size
            && self.chunk_size == m.chunk_size
            && self.blake3 == m.blake3
    }

    pub(crate) fn chunk_len(&self, i: u32) -> u32 {
        chunk_len(self.size, self.chunk_size, i)
    }

    pub(crate) fn crc(&self, i: u32) -> Option<u32> {
        self.crcs.get(i as usize).copied()
    }

    pub(crate) fn missing(&self) -> Vec<u32> {
        let st = self.st.lock().unwrap();
        (0..self.count).filter(|&i| !st.have.get(i)).collect()
    }

    pub(crate) fn done_bytes(&self) -> u64 {
        self.st.lock().unwrap().done_bytes
    }

    pub(crate) fn done_chunks(&self) -> u32 {
        self.st.lock().unwrap().have.count()
    }

    /// Bytes this sink has put where they cannot be taken back: those handed to stdout. A
    /// part file can always be discarded, so for a file this is 0.
    pub(crate) fn emitted(&self) -> u64 {
        match &self.out {
            SinkOut::File { .. } => 0,
            SinkOut::Stdout(r) => r.lock().unwrap().emitted,
        }
    }

    /// How many chunks from `first` on a lane may fetch now: any number for a file; to stdout
    /// only those within [`STDOUT_AHEAD`] chunks and [`STDOUT_AHEAD_BYTES`] of the next chunk
    /// stdout needs (0: none yet), which bounds the reorder buffer in bytes.
    pub(crate) fn fetch_limit(&self, first: u32) -> u32 {
        match &self.out {
            SinkOut::File { .. } => u32::MAX,
            SinkOut::Stdout(r) => {
                let ahead = (STDOUT_AHEAD_BYTES / self.chunk_size).clamp(1, STDOUT_AHEAD);
                let reach = r.lock().unwrap().next.saturating_add(ahead);
                reach.saturating_sub(first)
            }
        }
    }

    /// Whether chunk `i` is stored.
    pub(crate) fn has(&self, i: u32) -> bool {
        self.st.lock().unwrap().have.get(i)
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.st.lock().unwrap().have.is_full()
    }

    /// Checks chunk `i` against `crc` (the connection's codec leaves that to us, see
    /// `conn::reader`) and the manifest, and writes it (off the reactor: disk and hashing
    /// block) unless it is stored or being written already. Ok(false): the chunk failed its
    /// CRC32 and was not stored.
    pub(crate) async fn put(self: &Arc<Self>, i: u32, data: Bytes, crc: u32) -> Result<bool> {
        if data.len() <= INLINE_WRITE
            && matches!(
                self.out,
                SinkOut::File {
                    stateful: false,
                    ..
                }
            )
        {
            // A few KiB into the page cache costs less than the hop to a blocking thread.
            return self.put_blocking(i, data, crc);
        }
        let me = self.clone();
        spawn_blocking(move || me.put_blocking(i, data, crc)).await
    }

    pub(crate) fn put_blocking(&self, i: u32, data: Bytes, crc: u32) -> Result<bool> {
        // Both hashes in one visit, while the chunk is in this core's cache.
        // Exactly chunk `i` of this file, or nothing: its chaining value is computed for that
        // place, and a longer write would cover chunks hashed already.
        if i >= self.count || u64::try_from(data.len()) != Ok(u64::from(self.chunk_len(i))) {
            return Ok(false);
        }
        let (actual, cv) = hash_chunk(&data, i, self.chunk_size, self.size);
        if actual != crc || self.crc(i).is_some_and(|c| c != crc) {
            return Ok(false);
        }
        let len = data.len() as u64;
        {
            let mut st = self.st.lock().unwrap();
            if st.claimed.get(i) {
                return Ok(true);
            }
            st.claimed.set(i);
        }
        let written = self.write_chunk(i, data);
        let mut st = self.st.lock().unwrap();
        if let Err(e) = written {
            st.claimed.clear(i);
            return Err(e);
        }
        st.have.set(i);
        // i < count (checked above), and cvs has count entries.
        st.cvs[usize::try_from(i).expect("a chunk index fits usize")] = cv;
        st.done_bytes += len;
        st.unsaved += 1;
        let checkpoint = matches!(self.out, SinkOut::File { stateful: true, .. })
            && st.last_save.elapsed() >= SAVE_EVERY;
        drop(st);
        self.stored.notify_waiters();
        if checkpoint {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// Chunk `i`, claimed by the caller, into the part or (in order) to stdout.
    fn write_chunk(&self, i: u32, data: Bytes) -> Result<()> {
        match &self.out {
            SinkOut::File {
                dir,
                name,
                part,
                direct,
                ..
            } => {
                let off = u64::from(i) * u64::from(self.chunk_size);
                let err = |e| Error::io(dir.display(name), e);
                let written = match direct {
                    Some(d) => d.write_at(&data, off).map_err(err)?,
                    None => false,
                };
                if !written {
                    let _one_writer = self.writing.lock().unwrap();
                    part.write_all_at(&data, off).map_err(err)?;
                }
            }
            SinkOut::Stdout(r) => {
                let mut r = r.lock().unwrap();
                if i >= r.next {
                    r.pending.insert(i, data);
                }
                let before = r.next;
                while let Some(d) = {
                    let n = r.next;
                    r.pending.remove(&n)
                } {
                    r.emitted += u64::try_from(d.len()).unwrap_or(u64::MAX);
                    write_stdout(&d)?;
                    r.next += 1;
                }
                if r.next != before {
                    self.advanced.notify_waiters();
                }
            }
        }
        Ok(())
    }

    /// Records the chunks the part now holds. Not synced, and the part is not either: a claim
    /// only says where to look, since resuming verifies every chunk on disk by its CRC32.
    pub(crate) fn checkpoint(&self) -> Result<()> {
        let SinkOut::File {
            dir,
            name,
            work,
            wd: Some(wd),
            ..
        } = &self.out
        else {
            return Ok(());
        };
        let Ok(_one_at_a_time) = self.saving.try_lock() else {
            return Ok(());
        };
        let have = {
            let mut st = self.st.lock().unwrap();
            st.unsaved = 0;
            st.last_save = Instant::now();
            st.have.clone()
        };
        let err = |e| Error::io(dir.display(name), e);
        PartState::new(
            &self.remote,
            &self.identity,
            self.size,
            self.chunk_size,
            &self.blake3,
            &have,
        )
        .save(wd, &work.state())
        .map_err(err)
    }

    /// Verifies the whole-file BLAKE3 and publishes: metadata, durable, named, state removed.
    /// A one-chunk file of a tree does its few syscalls right here and awaits its shared sync
    /// holding no thread; anything else runs on a blocking thread.
    pub(crate) async fn finish(self: &Arc<Self>) -> Result<[u8; 32]> {
        let (part, group) = match &self.out {
            SinkOut::File {
                part,
                group: Some(g),
                ..
            } if self.count <= 1 => (part, g.clone()),
            _ => {
                let me = self.clone();
                return spawn_blocking(move || me.finish_blocking()).await;
            }
        };
        let root = self.seal()?;
        group.sync(part).await.map_err(|e| self.local_error(e))?;
        self.name()?;
        Ok(root)
    }

    /// [`Sink::finish`] on the current (blocking) thread.
    pub(crate) fn finish_blocking(&self) -> Result<[u8; 32]> {
        let root = self.seal()?;
        if let SinkOut::File { part, group, .. } = &self.out {
            // Data durable before the name points at it.
            match group {
                Some(g) => tokio::runtime::Handle::current().block_on(g.sync(part)),
                None => part.sync_all(),
            }
            .map_err(|e| self.local_error(e))?;
        }
        self.name()?;
        Ok(root)
    }

    /// Checks the whole-file BLAKE3 and sets the file's mode and mtime.
    pub(crate) fn seal(&self) -> Result<[u8; 32]> {
        let root = {
            let st = self.st.lock().unwrap();
            if !st.have.is_full() {
                return Err(Error::Integrity {
                    path: self.remote.clone(),
                    detail: format!("{} of {} chunks stored", st.have.count(), self.count),
                });
            }
            root_hash(&st.cvs, self.chunk_size, self.size)
        };
        if root != self.blake3 {
            return Err(Error::Integrity {
                path: self.remote.clone(),
                detail: format!(
                    "whole-file BLAKE3 {} differs from the server's {}",
                    hex::encode(root),
                    hex::encode(self.blake3)
                ),
            });
        }
        if let SinkOut::File { part, .. } = &self.out {
            // The hash covers the chunks that arrived; the file must also be exactly as long
            // as declared (nothing past the last chunk, no chunk math gone wrong).
            let len = part.metadata().map_err(|e| self.local_error(e))?.len();
            if len != self.size {
                return Err(Error::Integrity {
                    path: self.remote.clone(),
                    detail: format!(
                        "local file has {len} bytes, the server declared {}",
                        self.size
                    ),
                });
            }
            crate::local::set_meta(part, new_mode(self.mode, self.preserve), self.mtime_ns)
                .map_err(|e| self.local_error(e))?;
        }
        Ok(root)
    }

    /// Gives the (durable, verified) part its final name, makes that durable unless a tree
    /// does it for the whole directory, and drops the working files.
    pub(crate) fn name(&self) -> Result<()> {
        let SinkOut::File {
            dir,
            name,
            part,
            group,
            work,
            wd,
            ..
        } = &self.out
        else {
            return Ok(());
        };
        let err = |e| self.local_error(e);
        // The inode we wrote and hashed, whatever carries the working name by now.
        publish(part, dir, name, work).map_err(err)?;
        if group.is_none() {
            dir.sync().map_err(err)?;
        }
        if let Some(wd) = wd {
            wd.remove(&work.part()).map_err(err)?;
            wd.remove(&work.state()).map_err(err)?;
        }
        if group.is_none() {
            work.tidy();
        }
        Ok(())
    }

    /// An I/O error on the local file.
    pub(crate) fn local_error(&self, e: std::io::Error) -> Error {
        match &self.out {
            SinkOut::File { dir, name, .. } => Error::io(dir.display(name), e),
            SinkOut::Stdout(_) => Error::io("<stdout>", e),
        }
    }

    /// After a download failed for good: a part with nothing received goes, with its state;
    /// otherwise the part stays for a resume, but the space reserved for the chunks that never
    /// arrived is given back.
    pub(crate) fn abandon(&self) {
        let SinkOut::File {
            part, wd: Some(_), ..
        } = &self.out
        else {
            return;
        };
        let have = self.st.lock().unwrap().have.clone();
        if have.count() == 0 {
            self.discard();
            return;
        }
        let cs = u64::from(self.chunk_size);
        let mut i = 0;
        while i < self.count {
            if have.get(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < self.count && !have.get(i) {
                i += 1;
            }
            let off = u64::from(start) * cs;
            let end = (u64::from(i) * cs).min(self.size);
            if let Err(e) = punch_hole(part, off, end - off) {
                debug!("punching unreceived chunks out of the part: {e}");
                break;
            }
        }
        let _ = self.checkpoint();
    }

    /// Deletes the part and state files (before starting over).
    pub(crate) fn discard(&self) {
        if let SinkOut::File {
            work, wd: Some(wd), ..
        } = &self.out
        {
            let _ = wd.remove(&work.state());
            let _ = wd.remove(&work.part());
            work.tidy();
        }
    }
}

fn write_stdout(data: &[u8]) -> Result<()> {
    use std::os::fd::FromRawFd;
    // Raw fd 1: no line buffering scanning binary data for newlines.
    let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    f.write_all(data).map_err(|e| Error::io("<stdout>", e))
}

/// Opens the part of `work`, locked, for a download with `state` (`None`: start it afresh).
///
/// Nothing about the part changes before its lock is held: a second fsc bound for the same
/// destination (another remote file, so no state of its own) would otherwise empty the first
/// one's part, whose chaining values are in memory, and the first would publish zeros.
///
/// A part is only ever this working file alone: one with another name (st_nlink != 1, asked of
/// the open descriptor, since a name can change under us) is never written. A crash between
/// publishing (the part's inode linked under the final name) and unlinking the part leaves
/// exactly that: the part is the published file, and writing it would destroy it. Its name is
/// dropped (the other name keeps the data), with the state, and a new part is made.
fn open_part(wd: &LocalDir, work: &Work, state: &mut Option<PartState>) -> std::io::Result<File> {
    // Each pass drops a name that was not ours alone; only someone linking the part anew
    // every time could keep this going.
    for _ in 0..3 {
        let f = wd.open_rw(&work.part(), false)?;
        lock_exclusive(&f)?;
        let links = nix::sys::stat::fstat(&f).map_err(super::io)?.st_nlink;
        if links == 1 {
            if state.is_none() {
                f.set_len(0)?;
            }
            return Ok(f);
        }
        // 0: unlinked since we opened it (a discard); more: it has another name.
        debug!(links, part = %work.part(), "part not ours alone; starting a new one");
        *state = None;
        wd.remove(&work.state())?;
        wd.remove(&work.part())?;
    }
    Err(std::io::Error::other(format!(
        "{}: the working file keeps being linked elsewhere",
        work.part()
    )))
}

/// Takes an exclusive lock on a part file: two downloads (in this process or another fsc)
/// never write into one part.
fn lock_exclusive(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "another fsc is downloading to this file",
        ));
    }
    Err(e)
}

/// One pass over an existing part file: keeps chunks whose CRC32 matches the manifest.
/// Unclaimed chunks are read only if the file holds data there (SEEK_DATA), so a fresh
/// preallocated region costs nothing.
fn verify_part(
    part: &File,
    m: &Meta,
    crcs: &[u32],
    claimed: &Bitmap,
    have: &mut Have,
) -> std::io::Result<()> {
    let file_len = part.metadata()?.len();
    let mut buf = vec![0u8; m.chunk_size as usize];
    for i in 0..m.count {
        let off = i as u64 * m.chunk_size as u64;
        let len = chunk_len(m.size, m.chunk_size, i) as usize;
        if off + len as u64 > file_len {
            break;
        }
        if !claimed.get(i) && !has_data(part, off, len as u64) {
            continue;
        }
        let data = &mut buf[..len];
        part.read_exact_at(data, off)?;
        let ok = match crcs.get(i as usize) {
            Some(&c) => crc32fast::hash(data) == c,
            None => false,
        };
        if ok {
            have.have.set(i);
            have.cvs[i as usize] = chunk_cv(data, i, m.chunk_size, m.size);
            have.done_bytes += len as u64;
        }
    }
    Ok(())
}

/// The destination's old version, as the source of a fresh part's chunk delta.
struct Old<'a> {
    dir: &'a LocalDir,
    name: &'a str,
    seed: &'a Seed,
    crcs: &'a [u32],
    /// How a range of the old file is shared into the part: [`clone_range`]; a test puts a
    /// stand-in here to act as a reflink would on a file system this machine lacks.
    clone: CloneFn,
}

/// Shares `len` bytes at an offset of the first file into the second at the same offset.
type CloneFn = fn(&File, &File, u64, u64) -> std::io::Result<()>;

impl Old<'_> {
    /// Chunk-level delta: a fresh part of a file whose destination holds another version of it
    /// takes the chunks of that version that are still current, so only the others are fetched.
    /// One pass over the old file, and what counts as present is exactly what was hashed:
    ///
    /// - Where the file system shares extents (Btrfs, XFS, ...), each chunk is first shared
    ///   into the part (a reflink: no copy, no new space), then read back *from the part* and
    ///   hashed there. A reflink shares what the old file holds at that moment, which a local
    ///   writer may have changed since any earlier read of it; reading the old file first and
    ///   cloning after would put bytes nobody verified under a chunk counted present.
    /// - Elsewhere each chunk is read from the old file and hashed, and a current one is
    ///   written from that very buffer by a second thread while the next is read, direct
    ///   (buffered writes of fresh page-cache pages are the slow part on this kind of machine,
    ///   and a direct write is durable when the part is synced).
    ///
    /// A read error ends the seeding (the rest is fetched); a write error is the download's.
    /// Only a regular file is read (the open neither follows a symlink nor waits on a FIFO).
    fn seed(
        &self,
        part: &File,
        direct: Option<&DirectFile>,
        m: &Meta,
        have: &mut Have,
    ) -> std::io::Result<()> {
        let Ok(old) = self.dir.open_read(self.name) else {
            return Ok(());
        };
        let old_len = match old.metadata() {
            Ok(md) if md.is_file() => md.len(),
            _ => return Ok(()),
        };
        let cs = u64::from(m.chunk_size);
        // Two writers keep two writes in flight (the device is faster at queue depth 2);
        // with one chunk queued and one being read, memory is bounded by four chunks
        // whatever the file's size.
        let (to_write, queued) = mpsc::sync_channel::<Current>(1);
        let queued = Mutex::new(queued);
        let (give_back, spare) = mpsc::channel::<AlignedBuf>();
        let put = |i: u32, data: &[u8]| -> std::io::Result<()> {
            let off = u64::from(i) * cs;
            if let Some(d) = direct {
                if d.write_at(data, off)? {
                    return Ok(());
                }
            }
            part.write_all_at(data, off)
        };
        let mut may_clone = true;
        // Chunks shared and verified in the part (no writer involved).
        let mut cloned = Vec::new();
        std::thread::scope(|scope| {
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let (give_back, queued, put) = (give_back.clone(), &queued, &put);
                    scope.spawn(move || -> std::io::Result<Vec<(u32, ChainingValue)>> {
                        let mut kept = Vec::new();
                        loop {
                            let next = queued.lock().unwrap().recv();
                            let Ok(mut c) = next else {
                                return Ok(kept);
                            };
                            put(c.index, c.buf.bytes_mut(c.len))?;
                            kept.push((c.index, c.cv));
                            let _ = give_back.send(c.buf);
                        }
                    })
                })
                .collect();
            drop(give_back);
            // A buffer the reading loop used and can use again (a shared chunk's).
            let mut reuse = None;
            for i in 0..m.count {
                let off = u64::from(i) * cs;
                let len = chunk_len(m.size, m.chunk_size, i);
                if off + u64::from(len) > old_len {
                    break;
                }
                let shared = may_clone
                    && match (self.clone)(&old, part, off, u64::from(len)) {
                        Ok(()) => true,
                        // Not aligned (a short last chunk): this one is read and written.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
                        Err(e) => {
                            debug!("no reflinks here: {e}");
                            may_clone = false;
                            false
                        }
                    };
                // Read into aligned memory, so a direct write takes it without a copy.
                let mut buf = reuse
                    .take()
                    .or_else(|| spare.try_recv().ok())
                    .unwrap_or_default();
                let data = buf.bytes_mut(len as usize);
                let from = if shared { part } else { &old };
                if let Err(e) = from.read_exact_at(data, off) {
                    debug!("reading the old version: {e}");
                    break;
                }
                let cv = chunk_cv(data, i, m.chunk_size, m.size);
                let same = match self.seed {
                    Seed::Cvs(cvs) => cvs.get(i as usize) == Some(&cv),
                    Seed::Crcs => self.crcs.get(i as usize) == Some(&crc32fast::hash(data)),
                };
                if shared {
                    // Not current: the part holds bytes that count for nothing there; the
                    // chunk is fetched and written over them.
                    if same {
                        cloned.push((i, cv));
                    }
                    reuse = Some(buf);
                    continue;
                }
                let current = Current {
                    index: i,
                    cv,
                    buf,
                    len: len as usize,
                };
                if same && to_write.send(current).is_err() {
                    break; // both writers failed: their errors are returned below
                }
            }
            drop(to_write);
            // Only what is in the part, as it was hashed, counts as present.
            let mut kept = std::mem::take(&mut cloned);
            for w in writers {
                kept.extend(w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?);
            }
            for (i, cv) in kept {
                have.have.set(i);
                have.cvs[usize::try_from(i).expect("a chunk index fits usize")] = cv;
                have.done_bytes += u64::from(chunk_len(m.size, m.chunk_size, i));
            }
            Ok(())
        })
    }
}

/// A chunk of the old version that is still current, on its way into the part.
struct Current {
    index: u32,
    cv: ChainingValue,
    buf: AlignedBuf,
    len: usize,
}

/// Shares `len` bytes at `off` of `src` into `dst` at the same offset (a reflink: no copy, no
/// new space) where the file system can (Btrfs, XFS, OCFS2, bcachefs); EOPNOTSUPP or EXDEV
/// where it cannot (ext4), EINVAL for a range that is not block-aligned.
fn clone_range(src: &File, dst: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: off,
        src_length: len,
        dest_offset: off,
    };
    // SAFETY: FICLONERANGE reads one file_clone_range that lives across the call; both
    // descriptors are open files we own.
    match unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether `[off, off+len)` of the file contains data (not only a hole).
fn has_data(f: &File, off: u64, len: u64) -> bool {
    match nix::unistd::lseek(f, off as i64, Whence::SeekData) {
        Ok(pos) => (pos as u64) < off + len,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::WORK_DIR;
    use fsd::protocol::checked_chunk_count;

    fn meta(size: u64, chunk_size: u32, data: &[u8]) -> Meta {
        Meta {
            handle: 1,
            size,
            mtime_ns: 1_600_000_000_123_456_789,
            identity: "v1".into(),
            chunk_size,
            count: checked_chunk_count(size, chunk_size).unwrap(),
            blake3: *blake3::hash(data).as_bytes(),
            mode: 0o640,
        }
    }

    fn chunks(data: &[u8], cs: u32) -> Vec<Bytes> {
        data.chunks(cs as usize)
            .map(Bytes::copy_from_slice)
            .collect()
    }

    #[test]
    fn sink_writes_resumes_verifies_and_publishes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let cs = 1024;
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 / 7) as u8).collect();
        let m = meta(data.len() as u64, cs, &data);
        let crcs: Vec<u32> = chunks(&data, cs)
            .iter()
            .map(|c| crc32fast::hash(c))
            .collect();
        let out = Out::File {
            work: Work::new(dir.clone(), WORK_DIR.into(), "f"),
            dir: dir.clone(),
            name: "f".into(),
            group: None,
        };
        let crcs_v: Vec<u32> = crcs.clone();
        let put = |s: &Sink, i: u32| {
            let c = chunks(&data, cs)[i as usize].clone();
            s.put_blocking(i, c, crcs_v[i as usize]).unwrap()
        };
        // First run: chunks 0, 3 and 9 land, then the process "dies" (no finish).
        let s = Sink::create(
            "r/f".into(),
            m.clone(),
            crcs.clone(),
            out.clone(),
            None,
            false,
            Some(Seed::Crcs),
        )
        .unwrap();
        // A chunk that does not match the CRC it came with is refused, not stored.
        assert!(!s
            .put_blocking(2, chunks(&data, cs)[2].clone(), crcs_v[2] ^ 1)
            .unwrap());
        assert_eq!(s.missing().len(), 10);
        for i in [0u32, 3, 9] {
            assert!(put(&s, i));
        }
        s.checkpoint().unwrap();
        put(&s, 5); // written, never claimed
                    // Corrupt chunk 3 on disk.
        let work = Work::new(dir.clone(), WORK_DIR.into(), "f");
        let wd = tmp.path().join(WORK_DIR);
        let part = wd.join(work.part());
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(b"X", 3 * 1024 + 10).unwrap();
        drop((s, f));
        assert!(!tmp.path().join("f").exists());

        // Second run: the state matches; 0, 5 and 9 verify, 3 does not.
        let st = PartState::load(&work.dir().unwrap(), &work.state()).unwrap();
        assert!(st.matches("v1", m.size, cs, &m.blake3));
        let s = Sink::create(
            "r/f".into(),
            m.clone(),
            crcs.clone(),
            out,
            Some(st),
            true,
            Some(Seed::Crcs),
        )
        .unwrap();
        let missing = s.missing();
        assert_eq!(missing, vec![1, 2, 3, 4, 6, 7, 8]);
        for i in missing {
            assert!(put(&s, i));
        }
        assert!(s.is_complete());
        assert_eq!(s.finish_blocking().unwrap(), m.blake3);
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), data);
        assert!(!wd.exists(), "working files and directory removed");
        let md = std::fs::metadata(tmp.path().join("f")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.mtime_nsec(), 123_456_789);
    }

    /// `data` with some of its first 40 bits flipped so that its CRC32 stays the same, as a
    /// hostile peer can do to any chunk: CRC32 is linear, so for equal lengths
    /// crc(a ^ d) = crc(a) ^ crc(d) ^ crc(zeros), and 40 single-bit effects of 32 bits each
    /// have a non-empty subset that cancels out (found by elimination over GF(2)).
    fn same_crc_other_bytes(data: &[u8]) -> Vec<u8> {
        let zeros = crc32fast::hash(&vec![0u8; data.len()]);
        let effect = |bit: usize| {
            let mut d = vec![0u8; data.len()];
            d[bit / 8] ^= 1 << (bit % 8);
            crc32fast::hash(&d) ^ zeros
        };
        // basis[b]: a combination (effect, bits flipped) whose highest set bit is b.
        let mut basis: [Option<(u32, u64)>; 32] = [None; 32];
        for k in 0..40 {
            let (mut v, mut bits) = (effect(k), 1u64 << k);
            for b in (0..32).rev() {
                if v >> b & 1 == 0 {
                    continue;
                }
                match basis[b] {
                    Some((bv, bb)) => (v, bits) = (v ^ bv, bits ^ bb),
                    None => {
                        basis[b] = Some((v, bits));
                        break;
                    }
                }
            }
            if v == 0 {
                let mut out = data.to_vec();
                for bit in (0..40).filter(|&i| bits >> i & 1 == 1) {
                    out[bit / 8] ^= 1 << (bit % 8);
                }
                return out;
            }
        }
        unreachable!("40 vectors in a 32-dimensional space are dependent")
    }

    #[test]
    fn a_stored_chunk_is_never_written_again() {
        // A second copy of a stored chunk (the other READ of an endgame, a retry) with the
        // same CRC32 but other bytes must not replace it: the whole-file hash is built from
        // the first copy, so the file would be published with bytes nothing verified.
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..3000u32)
            .map(|i| (i * 7 / 3 % 256).to_le_bytes()[0])
            .collect();
        let m = meta(3000, 1024, &data);
        let crcs: Vec<u32> = chunks(&data, 1024)
            .iter()
            .map(|c| crc32fast::hash(c))
            .collect();
        let out = Out::File {
            work: Work::new(dir.clone(), WORK_DIR.into(), "h"),
            dir,
            name: "h".into(),
            group: None,
        };
        let s = Sink::create("h".into(), m.clone(), crcs.clone(), out, None, false, None).unwrap();
        for (i, c) in chunks(&data, 1024).into_iter().enumerate() {
            assert!(s.put_blocking(i as u32, c, crcs[i]).unwrap());
        }
        let forged = same_crc_other_bytes(&data[1024..2048]);
        assert_ne!(forged, data[1024..2048]);
        assert_eq!(crc32fast::hash(&forged), crcs[1]);
        assert!(s.put_blocking(1, forged.into(), crcs[1]).unwrap());
        assert_eq!(s.finish_blocking().unwrap(), m.blake3);
        let published = std::fs::read(tmp.path().join("h")).unwrap();
        assert!(
            published == data,
            "the published file is not what was verified"
        );
    }

    #[test]
    fn only_whole_chunks_in_their_place_and_all_of_them_pass() {
        // A server that sends two chunks' bytes as chunk 0 (say, "inline" for a file of
        // several chunks) and declares the hash of that one oversized piece beside an empty
        // chunk 1: the piece must not be stored, and the file is not complete.
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 5 / 3) as u8).collect();
        let mut m = meta(2048, 1024, &data);
        let (_, cv) = hash_chunk(&data, 0, 1024, 2048);
        m.blake3 = root_hash(&[cv, [0; 32]], 1024, 2048);
        let out = Out::File {
            work: Work::new(dir.clone(), WORK_DIR.into(), "k"),
            dir,
            name: "k".into(),
            group: None,
        };
        let s = Sink::create("k".into(), m, Vec::new(), out, None, false, None).unwrap();
        let crc = crc32fast::hash(&data);
        assert!(!s.put_blocking(0, Bytes::from(data.clone()), crc).unwrap());
        assert!(!s
            .put_blocking(7, Bytes::from(data[..1024].to_vec()), 0)
            .unwrap());
        assert!(matches!(s.finish_blocking(), Err(Error::Integrity { .. })));
        assert!(!tmp.path().join("k").exists());
    }

    #[test]
    fn a_second_download_to_the_same_destination_changes_nothing_before_its_lock() {
        // Two fsc processes, two remote files, one local destination: the second finds the
        // first's part (no state of its own, so it would start that part afresh) and is
        // refused by the lock. It must not have changed the part first: the first download
        // publishes from its in-memory chaining values, so bytes lost under it are published.
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i * 13 / 5).to_le_bytes()[0])
            .collect();
        let m = meta(u64::try_from(data.len()).unwrap(), 1024, &data);
        let crcs: Vec<u32> = chunks(&data, 1024)
            .iter()
            .map(|c| crc32fast::hash(c))
            .collect();
        let out = Out::File {
            work: Work::new(dir.clone(), WORK_DIR.into(), "f"),
            dir,
            name: "f".into(),
            group: None,
        };
        let first = Sink::create(
            "a".into(),
            m.clone(),
            crcs.clone(),
            out.clone(),
            None,
            false,
            None,
        )
        .unwrap();
        for (i, c) in chunks(&data, 1024).into_iter().enumerate() {
            assert!(first
                .put_blocking(u32::try_from(i).unwrap(), c, crcs[i])
                .unwrap());
        }
        let other = meta(20_000, 1024, &[0; 20_000]);
        let second = Sink::create("b".into(), other, vec![0; 20], out, None, false, None);
        assert!(second.is_err(), "the second download got the lock");
        assert_eq!(first.finish_blocking().unwrap(), m.blake3);
        let published = std::fs::read(tmp.path().join("f")).unwrap();
        assert!(
            published == data,
            "the published file is not what was written"
        );
    }

    /// Chunk size of the seeding test, and the chunk its local writer changes.
    const SEED_CS: u32 = 4096;
    const SCRIBBLED: u64 = 2;

    /// A reflink as the kernel makes one (the part shares what the old file holds at that
    /// moment), with a local writer that changes chunk [`SCRIBBLED`] of the old file just
    /// before it is shared, after any earlier read of it.
    fn racing_reflink(src: &File, dst: &File, off: u64, len: u64) -> std::io::Result<()> {
        if off == SCRIBBLED * u64::from(SEED_CS) {
            // The writer has its own descriptor (fsc's is read-only).
            use std::os::fd::AsRawFd;
            let path = format!("/proc/self/fd/{}", src.as_raw_fd());
            let w = std::fs::OpenOptions::new().write(true).open(path)?;
            w.write_all_at(&vec![b'X'; usize::try_from(len).unwrap()], off)?;
        }
        let mut buf = vec![0; usize::try_from(len).unwrap()];
        src.read_exact_at(&mut buf, off)?;
        dst.write_all_at(&buf, off)
    }

    #[test]
    fn a_seeded_chunk_counts_only_if_the_part_holds_what_was_verified() {
        // Chunk delta on a reflink file system: whatever a local writer does to the old file,
        // a chunk counted present must hold, in the part, the bytes the server's chaining
        // value names; else it is fetched.
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let cs = SEED_CS;
        let data: Vec<u8> = (0..8 * cs)
            .map(|i| (i * 7 / 3 % 251).to_le_bytes()[0])
            .collect();
        let mut old = data.clone();
        let last = old.len() - 10;
        old[last..].copy_from_slice(b"0123456789");
        std::fs::write(tmp.path().join("f"), &old).unwrap();
        let m = meta(u64::try_from(data.len()).unwrap(), cs, &data);
        let crcs: Vec<u32> = chunks(&data, cs)
            .iter()
            .map(|c| crc32fast::hash(c))
            .collect();
        let cvs: Vec<ChainingValue> = chunks(&data, cs)
            .iter()
            .enumerate()
            .map(|(i, c)| chunk_cv(c, u32::try_from(i).unwrap(), cs, m.size))
            .collect();
        let seed = Seed::Cvs(cvs.clone());
        let part = tempfile::tempfile().unwrap();
        part.set_len(m.size).unwrap();
        let mut have = Have {
            have: Bitmap::new(m.count),
            claimed: Bitmap::new(m.count),
            cvs: vec![[0; 32]; usize::try_from(m.count).unwrap()],
            done_bytes: 0,
            unsaved: 0,
            last_save: Instant::now(),
        };
        let o = Old {
            dir: &dir,
            name: "f",
            seed: &seed,
            crcs: &crcs,
            clone: racing_reflink,
        };
        o.seed(&part, None, &m, &mut have).unwrap();
        for i in 0..m.count {
            let off = u64::from(i) * u64::from(cs);
            let mut got = vec![0; usize::try_from(cs).unwrap()];
            part.read_exact_at(&mut got, off).unwrap();
            let want = &data[usize::try_from(off).unwrap()..][..got.len()];
            if have.have.get(i) {
                assert!(got == want, "chunk {i} counted present with other bytes");
                assert_eq!(
                    have.cvs[usize::try_from(i).unwrap()],
                    cvs[usize::try_from(i).unwrap()]
                );
            }
        }
        // The others were kept: the race costs the chunk it hit, and the changed last one.
        let missing: Vec<u32> = (0..m.count).filter(|&i| !have.have.get(i)).collect();
        assert_eq!(missing, [u32::try_from(SCRIBBLED).unwrap(), m.count - 1]);
    }

    #[test]
    fn a_wrong_whole_file_hash_is_an_integrity_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let data = vec![7u8; 3000];
        let mut m = meta(3000, 1024, &data);
        m.blake3[0] ^= 1;
        let crcs = chunks(&data, 1024)
            .iter()
            .map(|c| crc32fast::hash(c))
            .collect();
        let out = Out::File {
            work: Work::new(dir.clone(), WORK_DIR.into(), "g"),
            dir,
            name: "g".into(),
            group: None,
        };
        let s = Sink::create("g".into(), m, crcs, out, None, false, None).unwrap();
        for (i, c) in chunks(&data, 1024).into_iter().enumerate() {
            let crc = crc32fast::hash(&c);
            s.put_blocking(i as u32, c, crc).unwrap();
        }
        assert!(matches!(s.finish_blocking(), Err(Error::Integrity { .. })));
        assert!(!tmp.path().join("g").exists());
    }
}
