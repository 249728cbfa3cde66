//! Uploads, resumable through the server's chunk bitmap.
//!
//! OPEN(WRITE) names the upload by path, size and a resume key derived from the local file's
//! identity (canonical path, size, mtime, inode, device), and answers with the chunks the server
//! already holds. One reader thread goes through the file once, in large sequential reads,
//! computing every chunk's CRC32 and BLAKE3 chaining value (skipped chunks too: the whole-file
//! hash needs them) and handing the missing chunks to lanes that each keep one WRITE
//! outstanding, on every connection of `-j`; once every chunk is handed out, chunks lagging on
//! a slow connection are sent again over a fast one (the endgame, [`flights`]). COMMIT carries
//! the whole-file BLAKE3; the server verifies it and publishes atomically.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use fsd::compress::Probe;
use fsd::integrity::{hash_chunk, root_hash};
use fsd::protocol::{
    checked_chunk_count, chunk_count, chunk_len, msg, Cmd, ErrorCode, MAX_CHUNKS_PER_FILE,
};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::debug;

use crate::client::{Client, Slots, Transfer};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::grow::grown;
use crate::local::state::Bitmap;
use crate::local::{open_named_source, LocalDir};
use crate::progress::Event;
use flights::Flights;

mod flights;

/// WRITEs kept outstanding per connection.
const LANES: usize = 8;
/// The same while chunks go compressed (each is several times smaller on the wire, so a long
/// path needs more of them in flight). The lanes beyond [`LANES`] stop as soon as the file's
/// chunks are found not to shrink.
const LANES_COMPRESSED: usize = 16;
/// How often a lane with nothing to send looks again for a chunk lagging on another
/// connection, between acknowledgements.
const ENDGAME_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);
/// COMMITs answered Busy asked again at once, [`COMMIT_BUSY_WAIT`] apart, before the attempt
/// fails.
const COMMIT_BUSY_TRIES: u32 = 5;
const COMMIT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
/// Chunks read ahead of the lanes.
const READ_AHEAD: usize = 4;
const READ_AHEAD_BYTES: u32 = 8 << 20;
/// Chunks named per SEED request (the server takes at most 64).
const SEED_PAGE: u32 = 64;
/// SEED requests outstanding at once.
const SEEDS_IN_FLIGHT: usize = 4;
/// Single-chunk files up to this size are read on the async thread (see `UpJob::put`).
const INLINE_READ: u64 = 64 * 1024;

/// Options of an upload.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Refuse to replace an existing remote file (checked at Open and at Commit).
    pub no_clobber: bool,
}

impl Client {
    /// Uploads the local file `local` to `remote`, resuming an interrupted upload of the same
    /// file. The remote file appears only once complete and verified.
    pub async fn upload(
        &self,
        local: &Path,
        remote: &str,
        opts: &UploadOptions,
    ) -> Result<Transfer> {
        let src = SourcePath::Named(local.to_path_buf());
        self.upload_file(&src, remote, opts, Slots::All, None).await
    }

    /// `replaces`: the size of the remote file this upload will replace, when the caller knows
    /// one is there. Then the upload is a delta: the server takes the chunks that file already
    /// holds (SEED) and only the others are sent.
    pub(crate) async fn upload_file(
        &self,
        local: &SourcePath,
        remote: &str,
        opts: &UploadOptions,
        slots: Slots,
        replaces: Option<u64>,
    ) -> Result<Transfer> {
        let r = async {
            // The write entry point of every upload: a dry run never gets past it.
            self.may_write(remote)?;
            let src = Source::open(local)?;
            let job = UpJob {
                client: self.clone(),
                remote: remote.to_string(),
                opts: opts.clone(),
                slots,
                transferred: AtomicU64::new(0),
                cvs: Mutex::new(Vec::new()),
                committing: Mutex::new(None),
                probe: Arc::default(),
                replaces,
                src: Arc::new(src),
            };
            job.run().await
        }
        .await;
        match &r {
            Ok(t) => self.emit(Event::Done {
                path: remote.to_string(),
                local: local.shown(),
                bytes: t.bytes,
                transferred: t.transferred,
                blake3: hex::encode(t.blake3),
            }),
            Err(e) => self.emit(Event::Error {
                path: remote.to_string(),
                code: e.exit_code(),
                message: e.message_for(remote),
            }),
        }
        r
    }
}

/// Where the local file of an upload is, which says how it is opened. Either way only a
/// regular file is read, and a FIFO cannot hang the open.
#[derive(Clone, Debug)]
pub(crate) enum SourcePath {
    /// A path the user named: symlinks on it are followed (as cp and scp do).
    Named(PathBuf),
    /// An entry a tree walk saw as a regular file: `rel` beneath `root`, opened through
    /// directory handles without following any symlink ([`LocalDir::open_source`]), so a file
    /// replaced since the walk by a symlink is refused, never read through it.
    InTree { root: LocalDir, rel: String },
}

impl SourcePath {
    /// Opens the file for reading (see the variants).
    pub(crate) fn open(&self) -> std::io::Result<File> {
        match self {
            SourcePath::Named(p) => open_named_source(p),
            SourcePath::InTree { root, rel } => root.open_source(rel),
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        match self {
            SourcePath::Named(p) => p.clone(),
            SourcePath::InTree { root, rel } => root.path().join(rel),
        }
    }

    /// The path for messages.
    pub(crate) fn shown(&self) -> String {
        self.path().display().to_string()
    }
}

/// The local file being uploaded.
struct Source {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    /// When it was opened (and its metadata read).
    opened: SystemTime,
    mode: u32,
    ino: u64,
    dev: u64,
    /// See [`Source::resume_key`]; computed on first use (single-chunk uploads never need it).
    resume_key: std::sync::OnceLock<String>,
}

impl Source {
    fn open(src: &SourcePath) -> Result<Source> {
        let path = src.path();
        let err = |e| Error::io(path.display(), e);
        let file = src.open().map_err(err)?;
        let md = file.metadata().map_err(err)?;
        Ok(Source {
            file: Arc::new(file),
            path,
            size: md.len(),
            mtime_ns: crate::sync::mtime_ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: crate::sync::mtime_ns(md.ctime(), md.ctime_nsec()),
            opened: SystemTime::now(),
            mode: md.mode() & 0o7777,
            ino: md.ino(),
            dev: md.dev(),
            resume_key: std::sync::OnceLock::new(),
        })
    }

    /// The key under which the server keeps this upload's state: same file, same version =>
    /// same key => the server resumes the same upload.
    fn resume_key(&self) -> Result<&str> {
        if let Some(k) = self.resume_key.get() {
            return Ok(k);
        }
        let canonical =
            std::fs::canonicalize(&self.path).map_err(|e| Error::io(self.path.display(), e))?;
        let mut h = blake3::Hasher::new();
        h.update(canonical.as_os_str().as_bytes());
        for part in [
            self.size.to_le_bytes(),
            self.mtime_ns.to_le_bytes(),
            self.ino.to_le_bytes(),
            self.dev.to_le_bytes(),
        ] {
            h.update(&[0]);
            h.update(&part);
        }
        Ok(self
            .resume_key
            .get_or_init(|| h.finalize().to_hex().to_string()))
    }

    /// Fails if the file changed since it was opened (its hash would not be what we send).
    fn check_unchanged(&self) -> Result<()> {
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io(self.path.display(), e))?;
        let mtime_ns = crate::sync::mtime_ns(md.mtime(), md.mtime_nsec());
        let ctime_ns = crate::sync::mtime_ns(md.ctime(), md.ctime_nsec());
        if md.len() != self.size || mtime_ns != self.mtime_ns || ctime_ns != self.ctime_ns {
            return Err(self.changed());
        }
        Ok(())
    }

    fn changed(&self) -> Error {
        Error::Usage(format!(
            "{}: changed during the upload",
            self.path.display()
        ))
    }

    /// When the file's timestamps will show any further change, if that was still to come when
    /// it was opened ([`settles_at`]).
    fn settles_at(&self) -> Option<SystemTime> {
        settles_at(self.ctime_ns, self.opened)
    }

    /// For a file opened while it could still change unseen ([`Source::settles_at`]): waits
    /// until its timestamps would show a change, checks they do not, and hashes it again;
    /// fails unless that is `sent`, the BLAKE3 of what was uploaded. Blocking; a no-op for
    /// other files.
    fn verify_settled(&self, sent: &[u8; 32], chunk_size: u32) -> Result<()> {
        let Some(settled) = self.settles_at() else {
            return Ok(());
        };
        if let Ok(wait) = settled.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
        self.check_unchanged()?;
        let err = |e| Error::io(self.path.display(), e);
        let count = chunk_count(self.size, chunk_size);
        let mut buf = vec![0u8; usize::try_from(chunk_size).expect("a chunk fits in memory")];
        let mut cvs = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        for i in 0..count {
            let off = u64::from(i) * u64::from(chunk_size);
            let len = usize::try_from((self.size - off).min(u64::from(chunk_size)))
                .expect("at most a chunk");
            self.file.read_exact_at(&mut buf[..len], off).map_err(err)?;
            cvs.push(hash_chunk(&buf[..len], i, chunk_size, self.size).1);
        }
        if root_hash(&cvs, chunk_size, self.size) != *sent {
            return Err(self.changed());
        }
        Ok(())
    }
}

/// When a file whose inode last changed at `ctime_ns` will show any further change in its
/// timestamps, if that is after `at`: until then a rewrite may leave them as they are, and bytes
/// read at different moments may be of different versions without a check of size and times
/// seeing it (review D, stop 30: on ext4 with 1 s timestamps, a file rewritten 0.3 s into its
/// upload was published as a mix of both versions, exit 0, and never sent again). The ctime,
/// not the mtime: the kernel sets it to the clock at every change, and no one can set it to
/// another value (an mtime in 2300 must not make fsc wait). The window is 2 s where the
/// timestamps look coarse (no nanoseconds: ext4 with 128-byte inodes, ext3, NFSv3, FAT), else a
/// few kernel ticks; never more than that after `at`, whatever the clocks say.
pub(crate) fn settles_at(ctime_ns: i64, at: SystemTime) -> Option<SystemTime> {
    let window = if ctime_ns % 1_000_000_000 == 0 {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(20)
    };
    let changed = UNIX_EPOCH + Duration::from_nanos(u64::try_from(ctime_ns).ok()?);
    let settled = (changed + window).min(at + window);
    (settled > at).then_some(settled)
}

struct UpJob {
    client: Client,
    remote: String,
    opts: UploadOptions,
    slots: Slots,
    src: Arc<Source>,
    transferred: AtomicU64,
    /// Chaining value of every chunk hashed so far, kept across attempts.
    cvs: Mutex<Vec<Option<ChainingValue>>>,
    /// A COMMIT sent whose answer may have been lost: the upload id and whole-file BLAKE3. The
    /// next attempt asks for that commit's result first (COMMIT by upload id, on any node).
    committing: Mutex<Option<(String, [u8; 32])>>,
    /// Whether this file's chunks are worth compressing (fsd::compress).
    probe: Arc<Probe>,
    /// Size of the remote file this upload replaces, if there is one: try a delta (SEED).
    replaces: Option<u64>,
}

/// What OPEN(WRITE) answered.
struct Upload {
    handle: u32,
    upload_id: String,
    chunk_size: u32,
    count: u32,
    present: Bitmap,
}

enum Stop {
    /// COMMIT said the hash differs: start the upload again from nothing, once.
    BadHash,
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        if e.remote_code() == Some(ErrorCode::HashMismatch) {
            Stop::BadHash
        } else {
            Stop::Fail(e)
        }
    }
}

impl UpJob {
    async fn run(&self) -> Result<Transfer> {
        let mut backoff = self.client.backoff();
        let mut restart = false;
        loop {
            let before = self.transferred.load(Ordering::Relaxed);
            match self.attempt(restart).await {
                Ok(t) => return Ok(t),
                Err(Stop::BadHash) if !restart => {
                    restart = true;
                    self.cvs.lock().unwrap().clear();
                    self.client.emit(Event::Restart {
                        path: self.remote.clone(),
                        reason: "server's hash differs: uploading again from the start".into(),
                    });
                }
                Err(Stop::BadHash) => {
                    return Err(Error::Integrity {
                        path: self.remote.clone(),
                        detail: "the server's whole-file BLAKE3 differs after a fresh upload"
                            .into(),
                    })
                }
                Err(Stop::Fail(e)) => {
                    if self.transferred.load(Ordering::Relaxed) > before {
                        backoff.reset();
                    }
                    backoff.wait(e, &self.remote).await?;
                }
            }
        }
    }

    fn open_request(&self, restart: bool) -> Result<msg::OpenRequest> {
        Ok(msg::OpenRequest {
            path: self.remote.clone(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: self.src.size,
            resume_key: self.src.resume_key()?.to_string(),
            no_clobber: self.opts.no_clobber,
            restart,
            mode_bits: self.src.mode,
            mtime_ns: self.src.mtime_ns,
            ..Default::default()
        })
    }

    async fn open(&self, conn: &Conn, restart: bool) -> Result<Upload> {
        let r: msg::OpenResponse = conn
            .request(Cmd::OPEN, &self.open_request(restart)?)
            .await?;
        let bad =
            |what: String| Error::Protocol(format!("open {} for writing: {what}", self.remote));
        let cs = r.chunk_size;
        if !cs.is_power_of_two() || cs < 1024 {
            return Err(bad(format!(
                "chunk size {cs} is not a power of two >= 1024"
            )));
        }
        if cs > conn.server_max_frame() || cs > crate::conn::MAX_DATA_FRAME {
            return Err(bad(format!("chunk size {cs} exceeds the frame limit")));
        }
        // Checked in u64: the server chose the chunk size, and the bitmap is sized by it.
        let count = checked_chunk_count(self.src.size, cs).ok_or_else(|| {
            bad(format!(
                "chunk size {cs} gives more than {MAX_CHUNKS_PER_FILE} chunks"
            ))
        })?;
        if r.chunk_count != count {
            return Err(bad(format!("{} chunks, expected {count}", r.chunk_count)));
        }
        Ok(Upload {
            handle: r.handle,
            upload_id: r.upload_id,
            chunk_size: cs,
            count,
            present: Bitmap::from_bytes(&r.bitmap, count),
        })
    }

    async fn attempt(&self, restart: bool) -> Result<Transfer, Stop> {
        let slots = self.client.slot_list(self.slots);
        let conn0 = self.client.conn(slots[0]).await?;
        if conn0.is_single_chunk(self.src.size) {
            match self.put(&conn0).await {
                // A server without PUT: the long way below.
                Err(Stop::Fail(e)) if e.remote_code() == Some(ErrorCode::UnknownCommand) => {}
                r => return r,
            }
        }
        let _slot0 = conn0.upload_slot(self.src.size).await?;
        let asked = self.committing.lock().unwrap().take();
        if let Some((upload_id, blake3)) = asked {
            if let Some(t) = self.committed(&conn0, upload_id, blake3).await? {
                return Ok(t);
            }
        }
        let mut up = self.open(&conn0, restart).await?;
        let (cs, count, size) = (up.chunk_size, up.count, self.src.size);
        {
            let mut cvs = self.cvs.lock().unwrap();
            if cvs.len() != count as usize {
                *cvs = vec![None; count as usize];
            }
        }
        if let Some(old_size) = self.replaces {
            self.seed(&conn0, &mut up, old_size).await?;
        }
        let present_bytes: u64 = (0..count)
            .filter(|&i| up.present.get(i))
            .map(|i| chunk_len(size, cs, i) as u64)
            .sum();
        self.client.emit(Event::Start {
            path: self.remote.clone(),
            local: self.src.path.display().to_string(),
            size,
            resumed: present_bytes,
        });
        let missing = count - up.present.count();
        debug!(remote = %self.remote, id = %up.upload_id, missing, "upload open");

        // More connections only when there is enough to split.
        let mut conns = vec![(conn0.clone(), up.handle)];
        let wanted = (missing as usize).div_ceil(LANES);
        let open_extra = |slot: usize| async move {
            let c = self.client.conn(slot).await?;
            let s = c.upload_slot(self.src.size).await?;
            let u = self.open(&c, false).await?;
            Ok::<_, Error>((c, u, s))
        };
        let mut opening: FuturesUnordered<_> = slots
            .iter()
            .skip(1)
            .take(wanted.saturating_sub(1))
            .map(|&slot| open_extra(slot))
            .collect();
        let mut opened = Vec::new();
        while let Some(r) = opening.next().await {
            opened.push(r);
        }
        let mut slots_held = Vec::new();

        // Read-ahead in chunks, but never more than READ_AHEAD_BYTES of them (the chunk size
        // is the server's choice).
        let ahead = usize::try_from(READ_AHEAD_BYTES / cs.max(1)).unwrap_or(1);
        let (tx, rx) = mpsc::channel::<(u32, Bytes, u32)>(ahead.clamp(1, READ_AHEAD));
        let reader = {
            let file = self.src.file.clone();
            let present = up.present.clone();
            let cvs: Vec<_> = self.cvs.lock().unwrap().clone();
            tokio::task::spawn_blocking(move || read_chunks(&file, size, cs, &present, cvs, tx))
        };
        let rx = tokio::sync::Mutex::new(rx);
        let done = AtomicU64::new(present_bytes);
        let flights = Flights::new(count);
        let (rx_ref, done_ref, flights_ref) = (&rx, &done, &flights);
        let lanes = |c: &Conn, h: u32| {
            let lanes = match c.compress_level() {
                0 => LANES,
                _ => LANES_COMPRESSED,
            };
            (0..lanes.min(missing as usize))
                .map(move |i| {
                    let c = c.clone();
                    async move {
                        self.lane(&c, h, cs, rx_ref, flights_ref, done_ref, i >= LANES)
                            .await
                    }
                    .boxed()
                })
                .collect::<Vec<_>>()
        };
        // Joins the transfer if it opened the same upload; an extra connection that fails is
        // not needed (the others do the work).
        let admit = |r: Result<(Conn, Upload, _)>| match r {
            Ok((c, u, s)) if u.upload_id == up.upload_id => Some((c, u.handle, s)),
            Ok((c, u, _)) => {
                tokio::spawn(async move { close(&c, u.handle).await });
                None
            }
            Err(e) => {
                debug!("extra connection unavailable: {e}");
                None
            }
        };
        for (c, h, s) in opened.into_iter().filter_map(admit) {
            conns.push((c, h));
            slots_held.push(s);
        }
        let mut running: FuturesUnordered<_> =
            conns.iter().flat_map(|(c, h)| lanes(c, *h)).collect();
        // -j auto: connections the run adds (crate::grow) join this file too.
        let mut growth = match self.slots {
            Slots::All => self.client.watch_growth(),
            Slots::One(_) => None,
        };
        let mut next_slot = slots.len();
        let _busy = self.client.busy();
        let mut results: Vec<Result<()>> = Vec::new();
        loop {
            tokio::select! {
                r = running.next() => match r {
                    Some(r) => results.push(r),
                    None => break,
                },
                // Every chunk in: WRITEs still out are copies of acknowledged chunks, left
                // behind on lagging connections (the endgame, `flights`).
                () = flights.all_acked(missing) => break,
                Some(r) = opening.next() => {
                    if let Some((c, h, s)) = admit(r) {
                        running.extend(lanes(&c, h));
                        conns.push((c, h));
                        slots_held.push(s);
                    }
                }
                _ = grown(&mut growth), if opening.is_empty() => {
                    while next_slot < self.client.connections() {
                        opening.push(open_extra(next_slot));
                        next_slot += 1;
                    }
                }
            }
        }
        // A connection still opening when the work ran out: its handle is closed with the
        // others.
        while let Some(r) = opening.next().await {
            if let Some((c, h, s)) = admit(r) {
                conns.push((c, h));
                slots_held.push(s);
            }
        }
        // COMMIT goes over the connection with the fewest WRITEs still out (abandoned copies
        // whose data may still fill its socket), the first one on a tie; counted before the
        // lanes, which hold them, are dropped.
        let committer = (0..conns.len())
            .min_by_key(|&k| flights.waiting(conns[k].0.slot()))
            .expect("conn0 is always there");
        drop(running);
        drop(rx);
        for (k, (c, h)) in conns.iter().enumerate() {
            if k != committer {
                close(c, *h).await;
            }
        }
        let (commit_conn, commit_handle) = conns[committer].clone();
        drop(slots_held);
        let (cvs, read_err) = reader.await.expect("reader thread");
        *self.cvs.lock().unwrap() = cvs.clone();
        let acked = flights.acked_count();
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            return Err(e.into());
        }
        if let Some(e) = read_err {
            return Err(Stop::Fail(e));
        }
        if acked != missing {
            return Err(Stop::Fail(Error::Protocol(format!(
                "{acked} of {missing} chunks acknowledged"
            ))));
        }
        self.src.check_unchanged()?;
        let cvs: Vec<ChainingValue> = cvs.into_iter().map(|c| c.expect("all hashed")).collect();
        let blake3 = root_hash(&cvs, cs, size);
        if self.src.settles_at().is_some() {
            let src = self.src.clone();
            tokio::task::spawn_blocking(move || src.verify_settled(&blake3, cs))
                .await
                .expect("verifying thread")?;
        }
        let req = msg::CommitRequest {
            handle: commit_handle,
            blake3: blake3.to_vec(),
            upload_id: String::new(),
        };
        *self.committing.lock().unwrap() = Some((up.upload_id.clone(), blake3));
        // Busy while a WRITE of the upload is being stored: a copy the endgame abandoned may
        // still arrive. Asked again shortly rather than through a whole new attempt (backoff,
        // OPEN, resume).
        let mut busy = 0;
        let r: msg::CommitResponse = loop {
            match commit_conn.request(Cmd::COMMIT, &req).await {
                Err(e) if e.remote_code() == Some(ErrorCode::Busy) && busy < COMMIT_BUSY_TRIES => {
                    busy += 1;
                    tokio::time::sleep(COMMIT_BUSY_WAIT).await;
                }
                r => break r?,
            }
        };
        *self.committing.lock().unwrap() = None;
        if r.size != size {
            return Err(Stop::Fail(Error::Protocol(format!(
                "commit published {} bytes, sent {size}",
                r.size
            ))));
        }
        Ok(Transfer {
            path: self.remote.clone(),
            bytes: size,
            transferred: self.transferred.load(Ordering::Relaxed),
            blake3,
        })
    }

    /// A delta upload: hashes the chunks the server lacks that the file being replaced (of
    /// `old_size` bytes) could hold, and asks the server to take those that match from it
    /// (SEED). Marks them present in `up`. A server without SEED, or one that fails it, gets
    /// every chunk sent as usual.
    async fn seed(&self, conn: &Conn, up: &mut Upload, old_size: u64) -> Result<(), Stop> {
        let (cs, size) = (up.chunk_size, self.src.size);
        let candidate =
            |i: u32| !up.present.get(i) && u64::from(i) * u64::from(cs) < old_size.min(size);
        let wanted: Vec<u32> = (0..up.count).filter(|&i| candidate(i)).collect();
        if up.count <= 1 || wanted.is_empty() {
            return Ok(());
        }
        // One SEED per page of chunks holding a candidate, a few at once; each page is hashed
        // (on a blocking thread) just before its SEED, so hashing and the server's work overlap.
        let known: Arc<Vec<Option<ChainingValue>>> = Arc::new(self.cvs.lock().unwrap().clone());
        let pages: Vec<(u32, Vec<u32>)> = wanted
            .chunk_by(|a, b| a / SEED_PAGE == b / SEED_PAGE)
            .map(|run| (run[0] / SEED_PAGE, run.to_vec()))
            .collect();
        let handle = up.handle;
        let count = up.count;
        let asks = pages.into_iter().map(|(page, run)| {
            let (file, known) = (self.src.file.clone(), known.clone());
            async move {
                let first = page * SEED_PAGE;
                let end = (first + SEED_PAGE).min(count);
                let hashed =
                    tokio::task::spawn_blocking(move || hash_chunks(&file, size, cs, &run, &known))
                        .await
                        .expect("hashing thread")?;
                // A chunk not named (present already, or past the old file) gets zeros: no
                // chunk hashes to that, and the server skips present chunks anyway.
                let mut bytes = vec![0u8; 32 * (end - first) as usize];
                for (i, cv) in &hashed {
                    let k = (i - first) as usize;
                    bytes[32 * k..32 * (k + 1)].copy_from_slice(cv);
                }
                let req = msg::SeedRequest {
                    handle,
                    first_chunk: first,
                    cvs: bytes,
                };
                let answer = conn.request::<_, msg::SeedResponse>(Cmd::SEED, &req).await;
                Ok::<_, Error>((first, end, hashed, answer))
            }
        });
        let mut answers = futures::stream::iter(asks).buffer_unordered(SEEDS_IN_FLIGHT);
        let mut seeded = 0u64;
        while let Some(page) = answers.next().await {
            let (first, end, hashed, answer) = page?;
            {
                let mut cvs = self.cvs.lock().unwrap();
                for (i, cv) in hashed {
                    cvs[i as usize] = Some(cv);
                }
            }
            let r = match answer {
                Ok(r) if r.first_chunk == first => r,
                Ok(_) => {
                    return Err(Stop::Fail(Error::Protocol(
                        "SEED answered for other chunks".into(),
                    )))
                }
                Err(e) => {
                    debug!(remote = %self.remote, "no delta: {e}");
                    return Ok(());
                }
            };
            for i in first..end {
                let k = (i - first) as usize;
                if r.seeded.get(k / 8).is_some_and(|b| b & (1 << (k % 8)) != 0) {
                    up.present.set(i);
                    seeded += u64::from(chunk_len(size, cs, i));
                }
            }
        }
        debug!(remote = %self.remote, seeded, "delta: chunks taken from the old file");
        Ok(())
    }

    /// Whether the COMMIT of an earlier attempt, whose answer was lost, published the file:
    /// asked by upload id. None if not (or the server cannot tell): upload as usual.
    async fn committed(
        &self,
        conn: &Conn,
        upload_id: String,
        blake3: [u8; 32],
    ) -> Result<Option<Transfer>, Stop> {
        let req = msg::CommitRequest {
            handle: 0,
            upload_id,
            blake3: blake3.to_vec(),
        };
        match conn
            .request::<_, msg::CommitResponse>(Cmd::COMMIT, &req)
            .await
        {
            Ok(r) if r.size == self.src.size => {
                debug!(remote = %self.remote, "the lost COMMIT had published the file");
                Ok(Some(Transfer {
                    path: self.remote.clone(),
                    bytes: r.size,
                    transferred: self.transferred.load(Ordering::Relaxed),
                    blake3,
                }))
            }
            // Not committed (NotFound), or a server without COMMIT by id (BadHandle: it has no
            // handle 0): the upload goes on by OPEN, resuming.
            Ok(_) => Ok(None),
            Err(e)
                if matches!(
                    e.remote_code(),
                    Some(ErrorCode::NotFound | ErrorCode::BadHandle)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Stop::Fail(e)),
        }
    }

    /// A file of at most one chunk in one request (PUT: the file, its CRC32 and BLAKE3; the
    /// server writes, verifies and publishes it). Nothing to resume: a failure sends it again.
    async fn put(&self, conn: &Conn) -> Result<Transfer, Stop> {
        let (file, size) = (self.src.file.clone(), self.src.size);
        // Reserved before reading: the connection's window bounds the memory of many PUTs.
        let _window = conn.window(size).await?;
        let read = move || {
            let mut data = vec![0u8; size as usize];
            file.read_exact_at(&mut data, 0)
                .map_err(|e| Error::io("read", e))?;
            let (crc, blake3) = (crc32fast::hash(&data), *blake3::hash(&data).as_bytes());
            Ok::<_, Error>((Bytes::from(data), crc, blake3))
        };
        let (data, crc, blake3) = if size <= INLINE_READ {
            // A few KiB from the page cache cost less than the hop to a blocking thread.
            read()?
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .expect("reader thread")?
        };
        self.src.check_unchanged()?;
        if self.src.settles_at().is_some() {
            // One chunk whatever its size: any chunk size from the file's up hashes it whole.
            let whole = u32::try_from(size.max(1).next_power_of_two()).unwrap_or(u32::MAX / 2 + 1);
            let src = self.src.clone();
            tokio::task::spawn_blocking(move || src.verify_settled(&blake3, whole))
                .await
                .expect("verifying thread")?;
        }
        self.client.emit(Event::Start {
            path: self.remote.clone(),
            local: self.src.path.display().to_string(),
            size,
            resumed: 0,
        });
        let req = msg::PutRequest {
            path: self.remote.clone(),
            size,
            mode_bits: self.src.mode,
            mtime_ns: self.src.mtime_ns,
            no_clobber: self.opts.no_clobber,
            blake3: blake3.to_vec(),
        };
        let mut s = conn.open().await?;
        s.send_msg(Cmd::PUT, 0, &req).await?;
        let wire = s
            .send_chunk(Cmd::PUT, data, crc, conn.compress_level(), &self.probe)
            .await?;
        let r: msg::CommitResponse = s.reply(Cmd::PUT).await?;
        if r.size != size {
            return Err(Stop::Fail(Error::Protocol(format!(
                "put published {} bytes, sent {size}",
                r.size
            ))));
        }
        let transferred = self.transferred.fetch_add(wire, Ordering::Relaxed) + wire;
        self.client.emit(Event::Progress {
            path: self.remote.clone(),
            done: size,
            size,
            transferred,
        });
        Ok(Transfer {
            path: self.remote.clone(),
            bytes: size,
            transferred,
            blake3,
        })
    }

    /// Sends chunks from the reader until it is exhausted, then chunks lagging on other
    /// connections (the endgame, [`flights`]), until there are none.
    #[allow(clippy::too_many_arguments)]
    async fn lane(
        &self,
        conn: &Conn,
        handle: u32,
        cs: u32,
        rx: &tokio::sync::Mutex<mpsc::Receiver<(u32, Bytes, u32)>>,
        flights: &Flights,
        done: &AtomicU64,
        only_while_compressing: bool,
    ) -> Result<()> {
        let slot = conn.slot();
        loop {
            if only_while_compressing && !self.probe.paying() {
                return Ok(());
            }
            // Spread over the pool (Slots::All, whose first slot is never retired), a lane of
            // a connection that -j auto retired stops taking chunks; the others send the rest.
            if matches!(self.slots, Slots::All) && self.client.retired(conn) {
                return Ok(());
            }
            // The window first, then a chunk: a lane waiting for room holds no chunk, so the
            // chunks in memory are bounded by the windows, not by lanes x chunk size.
            let mut window = conn.window(u64::from(cs)).await?;
            let next = rx.lock().await.recv().await;
            let (flight, data, crc) = match next {
                Some((i, data, crc)) => {
                    let len = u32::try_from(data.len()).expect("a chunk's length is a u32");
                    (flights.send(slot, i, len, crc), data, crc)
                }
                None => loop {
                    if let Some((flight, crc)) = flights.steal(slot) {
                        match self.reread(flight.chunk(), cs, crc).await {
                            Some(data) => break (flight, data, crc),
                            // Changed since it was sent: the attempt fails on that anyway.
                            None => return Ok(()),
                        }
                    }
                    if !flights.stealable(slot) {
                        return Ok(());
                    }
                    // Chunks are out on other connections, none lagging far enough (yet): look
                    // again when one comes in, or soon (a connection may stall in loss).
                    let _ = tokio::time::timeout(ENDGAME_RECHECK, flights.next_ack()).await;
                },
            };
            let i = flight.chunk();
            let len = data.len() as u64;
            window.release(cs.saturating_sub(u32::try_from(data.len()).unwrap_or(cs)));
            let sent = async {
                let mut s = conn.open().await?;
                s.send_msg(Cmd::WRITE, 0, &msg::WriteRequest { handle, chunk: i })
                    .await?;
                let wire = s
                    .send_chunk(Cmd::WRITE, data, crc, conn.compress_level(), &self.probe)
                    .await?;
                let ack: msg::WriteAck = s.reply(Cmd::WRITE).await?;
                if ack.chunk != i {
                    return Err(Error::Protocol(format!(
                        "write of chunk {i} acknowledged as chunk {}",
                        ack.chunk
                    )));
                }
                Ok(wire)
            }
            .await;
            let wire = match sent {
                Ok(wire) => wire,
                // The other copy got through: this one's failure costs nothing.
                Err(_) if flight.acked_elsewhere() => return Ok(()),
                Err(e) => return Err(e),
            };
            let transferred = self.transferred.fetch_add(wire, Ordering::Relaxed) + wire;
            self.client.moved(wire);
            if !flight.acked(u32::try_from(len).unwrap_or(u32::MAX)) {
                continue;
            }
            self.client.emit(Event::Progress {
                path: self.remote.clone(),
                done: done.fetch_add(len, Ordering::Relaxed) + len,
                size: self.src.size,
                transferred,
            });
        }
    }

    /// Chunk `i` read from the file again for an endgame copy, if it still has CRC32 `crc`.
    async fn reread(&self, i: u32, cs: u32, crc: u32) -> Option<Bytes> {
        let (file, size) = (self.src.file.clone(), self.src.size);
        tokio::task::spawn_blocking(move || {
            let len = usize::try_from(chunk_len(size, cs, i)).expect("a u32 fits usize");
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, u64::from(i) * u64::from(cs))
                .ok()?;
            (crc32fast::hash(&buf) == crc).then(|| Bytes::from(buf))
        })
        .await
        .expect("reader thread")
    }
}

/// Releases a handle without waiting for the reply.
async fn close(conn: &Conn, handle: u32) {
    let _ = conn
        .send_detached(Cmd::CLOSE, &msg::CloseRequest { handle })
        .await;
}

/// Chaining values of chunks `run` of the file (those already in `known` are not read again).
fn hash_chunks(
    file: &File,
    size: u64,
    cs: u32,
    run: &[u32],
    known: &[Option<ChainingValue>],
) -> Result<Vec<(u32, ChainingValue)>> {
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(run.len());
    for &i in run {
        if let Some(cv) = known[i as usize] {
            out.push((i, cv));
            continue;
        }
        buf.resize(chunk_len(size, cs, i) as usize, 0);
        file.read_exact_at(&mut buf, u64::from(i) * u64::from(cs))
            .map_err(|e| Error::io("read", e))?;
        out.push((i, hash_chunk(&buf, i, cs, size).1));
    }
    Ok(out)
}

/// Reads the file once, in order: hashes every chunk whose chaining value is not yet known and
/// sends the ones the server lacks. Returns the chaining values and any read error.
fn read_chunks(
    file: &File,
    size: u64,
    cs: u32,
    present: &Bitmap,
    mut cvs: Vec<Option<ChainingValue>>,
    tx: mpsc::Sender<(u32, Bytes, u32)>,
) -> (Vec<Option<ChainingValue>>, Option<Error>) {
    for i in 0..chunk_count(size, cs) {
        let send = !present.get(i);
        if !send && cvs[i as usize].is_some() {
            continue;
        }
        let len = chunk_len(size, cs, i) as usize;
        let mut buf = vec![0u8; len];
        if let Err(e) = file.read_exact_at(&mut buf, i as u64 * cs as u64) {
            return (cvs, Some(Error::io("read", e)));
        }
        let (crc, cv) = hash_chunk(&buf, i, cs, size);
        cvs[i as usize] = Some(cv);
        if send && tx.blocking_send((i, Bytes::from(buf), crc)).is_err() {
            // Every lane stopped; the attempt reports why.
            break;
        }
    }
    (cvs, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file opened while a change could still leave its timestamps as they are is hashed
    /// again once they would show one: what was sent must be what the file then holds.
    #[test]
    fn a_file_opened_while_racy_is_verified_once_settled() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let data = vec![3u8; 300_000];
        std::fs::write(&p, &data).unwrap();
        let src = Source::open(&SourcePath::Named(p.clone())).unwrap();
        assert!(src.settles_at().is_some(), "just written: racy");
        // What a reader would have sent had the file held other bytes while it was read.
        let mut other = data.clone();
        other[200_000] = 4;
        let other_hash = *blake3::hash(&other).as_bytes();
        assert!(src.verify_settled(&other_hash, 65536).is_err());
        src.verify_settled(blake3::hash(&data).as_bytes(), 65536)
            .unwrap();
        // An old file is not racy: nothing to wait for or read again.
        let old = SystemTime::now() - Duration::from_secs(10);
        let old_ns = i64::try_from(old.duration_since(UNIX_EPOCH).unwrap().as_nanos()).unwrap();
        assert!(settles_at(old_ns, SystemTime::now()).is_none());
        // Coarse timestamps (whole seconds) keep a file racy for 2 s.
        let sec = (old_ns / 1_000_000_000 + 9) * 1_000_000_000;
        assert!(settles_at(sec, SystemTime::now()).is_some());
        // A ctime in the future (another clock) makes it wait one window at most.
        let now = SystemTime::now();
        let far = settles_at(i64::MAX, now).unwrap();
        assert!(far <= now + Duration::from_secs(2));
    }

    #[test]
    fn resume_key_depends_on_the_file_version() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let named = SourcePath::Named(p.clone());
        let a = Source::open(&named).unwrap();
        let b = Source::open(&named).unwrap();
        assert_eq!(a.resume_key().unwrap(), b.resume_key().unwrap());
        std::fs::write(&p, b"hello, world").unwrap();
        let c = Source::open(&named).unwrap();
        assert_ne!(a.resume_key().unwrap(), c.resume_key().unwrap());
        assert!(a.check_unchanged().is_err());
        c.check_unchanged().unwrap();
    }

    #[test]
    fn reader_hashes_all_chunks_and_sends_only_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let mut present = Bitmap::new(5);
        present.set(1);
        present.set(3);
        let (tx, mut rx) = mpsc::channel(8);
        let (cvs, err) = read_chunks(&f, 5000, 1024, &present, vec![None; 5], tx);
        assert!(err.is_none());
        let mut sent = Vec::new();
        while let Ok((i, d, crc)) = rx.try_recv() {
            assert_eq!(crc, crc32fast::hash(&d));
            sent.push(i);
        }
        assert_eq!(sent, vec![0, 2, 4]);
        let cvs: Vec<_> = cvs.into_iter().map(Option::unwrap).collect();
        assert_eq!(root_hash(&cvs, 1024, 5000), *blake3::hash(&data).as_bytes());
    }
}
