//! Downloads: pipelined, verified as data arrives, resumable.
//!
//! One file: OPEN(READ) gives size, identity, chunk size and the whole-file BLAKE3; MANIFEST
//! gives every chunk's CRC32. Chunks land in a part file in the destination's working
//! directory (`local::Work`; preallocated, one pwrite per chunk) while a state file beside it
//! records which ones are there. Each connection runs a few
//! *lanes*, each keeping one READ of up to [`RUN`] chunks outstanding, so the link never drains;
//! `-j N` connections pull from one shared queue of missing chunks. A chunk whose CRC32 fails is
//! queued again. When all are in: BLAKE3 (built from per-chunk subtree hashes) is compared with
//! the server's, the part is synced and linked (the very inode that was verified) over the
//! final name, and the state removed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use fsd::direct::DirectFile;
use fsd::durable::GroupSync;
use fsd::integrity::{chunk_cv, hash_chunk, root_hash};
use fsd::protocol::{
    checked_chunk_count, chunk_len, flags, msg, Cmd, ErrorCode, MANIFEST_PAGE, MAX_CHUNKS_PER_FILE,
};
use nix::unistd::Whence;
use tracing::{debug, warn};

use crate::client::{remote_basename, Client, Slots, Transfer};
use crate::conn::{Conn, Throttle, Window};
use crate::error::{Error, Result};
use crate::local::{
    check_name, lacks_space, new_mode, publish, punch_hole, work_dir_name, LocalDir, Work,
};
use crate::progress::Event;
use crate::state::{Bitmap, PartState};

/// Chunks asked for by one READ.
const RUN: u32 = 4;
/// Files up to this size are asked for inline with their OPEN (one round trip per file).
const INLINE_MAX: u32 = 64 * 1024;
/// READs kept outstanding per connection for one file.
const LANES: usize = 4;
/// Write the resume state at most this often.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Chunks up to this size are written on the async thread (see `Sink::put`).
const INLINE_WRITE: usize = 64 * 1024;
/// To stdout, lanes fetch no chunk this far or further past the next one stdout needs: the
/// chunks in between wait in memory (`Reorder`). At most this many chunks, and at most
/// [`STDOUT_AHEAD_BYTES`] of them (chunk sizes are the server's choice), whatever `-j`.
const STDOUT_AHEAD: u32 = 32;
const STDOUT_AHEAD_BYTES: u32 = 32 << 20;
/// A chunk that fails its CRC32 this many times in one attempt fails the attempt.
const MAX_CORRUPT: u32 = 8;

/// Where a download goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A local path; an existing directory receives the remote file's base name.
    Path(std::path::PathBuf),
    /// Standard output, in order (no part or state file: not resumable).
    Stdout,
}

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

impl Client {
    /// Downloads `remote` to `local` (a file path, or an existing directory to put it in),
    /// resuming a previous partial download there.
    pub async fn download(&self, remote: &str, local: &Path) -> Result<Transfer> {
        self.download_to(remote, Dest::Path(local.to_path_buf()))
            .await
    }

    /// Downloads `remote` to a [`Dest`].
    pub async fn download_to(&self, remote: &str, dest: Dest) -> Result<Transfer> {
        let out = match dest {
            Dest::Stdout => Out::Stdout,
            Dest::Path(p) => resolve_local(remote, &p)?,
        };
        self.download_file(remote, out, Slots::All).await
    }

    /// One file, with retries; emits Start/Progress/Done or Error events.
    pub(crate) async fn download_file(
        &self,
        remote: &str,
        out: Out,
        slots: Slots,
    ) -> Result<Transfer> {
        let job = Job {
            client: self.clone(),
            remote: remote.to_string(),
            local: match &out {
                Out::File { dir, name, .. } => dir.display(name),
                Out::Stdout => "-".into(),
            },
            out,
            slots,
            transferred: AtomicU64::new(0),
            corrupt_log: Throttle::new(Duration::from_secs(10)),
        };
        let r = job.run().await;
        match &r {
            Ok(t) => self.emit(Event::Done {
                path: t.path.clone(),
                local: job.local.clone(),
                bytes: t.bytes,
                transferred: t.transferred,
                blake3: hex::encode(t.blake3),
            }),
            Err(e) => self.emit(Event::Error {
                path: remote.to_string(),
                code: e.exit_code(),
                message: e.to_string(),
            }),
        }
        r
    }
}

/// `local` as a directory and a leaf name.
fn resolve_local(remote: &str, local: &Path) -> Result<Out> {
    let (dir, name) = if local.is_dir() {
        let base = remote_basename(remote);
        check_name(base)
            .map_err(|_| Error::Usage(format!("{remote:?} has no file name; give a local path")))?;
        (local.to_path_buf(), base.to_string())
    } else {
        let name = local
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Usage(format!("{}: not a file path", local.display())))?;
        let parent = match local.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => ".".into(),
        };
        (parent, name.to_string())
    };
    let d = LocalDir::open(&dir).map_err(|e| Error::io(dir.display(), e))?;
    Ok(Out::File {
        work: Work::new(d.clone(), work_dir_name(|n| n == name), &name),
        dir: d,
        name,
        group: None,
    })
}

struct Job {
    client: Client,
    remote: String,
    local: String,
    out: Out,
    slots: Slots,
    transferred: AtomicU64,
    /// Chunks that failed their CRC32, for a rate-limited warning.
    corrupt_log: Throttle,
}

/// What OPEN(READ) said about the file.
#[derive(Debug, Clone)]
struct Meta {
    handle: u32,
    size: u64,
    mtime_ns: i64,
    identity: String,
    chunk_size: u32,
    count: u32,
    blake3: [u8; 32],
    mode: u32,
}

/// Why an attempt did not finish.
enum Stop {
    /// The remote file changed: start over from nothing.
    Changed,
    /// Every chunk arrived but the whole-file BLAKE3 differs: start over once.
    BadHash(String),
    Fail(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        if e.remote_code() == Some(ErrorCode::Changed) {
            Stop::Changed
        } else {
            Stop::Fail(e)
        }
    }
}

impl Job {
    async fn run(&self) -> Result<Transfer> {
        let mut sink = None;
        let r = self.attempts(&mut sink).await;
        if let (Err(_), Some(s)) = (&r, sink) {
            // Kept for a resume, but not the space of what never arrived.
            let s = s.clone();
            let _ = spawn_blocking(move || {
                s.abandon();
                Ok(())
            })
            .await;
        }
        r
    }

    /// Attempts with retries; `sink` is the local side once there is one.
    async fn attempts(&self, sink: &mut Option<Arc<Sink>>) -> Result<Transfer> {
        let mut backoff = self.client.backoff();
        let (mut changes, mut bad_hashes) = (0, 0);
        loop {
            let before = sink.as_ref().map_or(0, |s| s.done_chunks());
            let stdout = matches!(self.out, Out::Stdout);
            let reason = match self.attempt(sink).await {
                Ok(t) => return Ok(t),
                Err(Stop::Fail(e)) => {
                    if sink.as_ref().map_or(0, |s| s.done_chunks()) > before {
                        backoff.reset();
                    }
                    backoff.wait(e, &self.remote).await?;
                    continue;
                }
                Err(Stop::Changed) => {
                    changes += 1;
                    // Bytes already written to stdout cannot be taken back.
                    let emitted = stdout && before > 0;
                    if emitted || changes > self.client.shared.opts.retries + 1 {
                        return Err(Error::Remote {
                            code: ErrorCode::Changed,
                            message: format!("{} changed during the download", self.remote),
                            retryable: false,
                        });
                    }
                    "remote file changed".to_string()
                }
                Err(Stop::BadHash(detail)) => {
                    bad_hashes += 1;
                    if bad_hashes > 1 || stdout {
                        if let Some(s) = sink.take() {
                            s.discard();
                        }
                        return Err(Error::Integrity {
                            path: self.remote.clone(),
                            detail,
                        });
                    }
                    detail
                }
            };
            if let Some(s) = sink.take() {
                s.discard();
            }
            self.client.emit(Event::Restart {
                path: self.remote.clone(),
                reason,
            });
        }
    }

    async fn attempt(&self, sink: &mut Option<Arc<Sink>>) -> Result<Transfer, Stop> {
        let slots = self.client.slot_list(self.slots);
        let conn0 = self.client.conn(slots[0]).await?;
        let (meta, inline) = match open_read(&conn0, &self.remote).await {
            Err(e @ Error::Corrupt(_)) => {
                self.client.emit(Event::Corrupt {
                    path: self.remote.clone(),
                    chunk: 0,
                });
                return Err(Stop::Fail(e));
            }
            r => r?,
        };
        let handles = Handles::new(match inline {
            Some(_) => vec![],
            None => vec![(conn0.clone(), meta.handle)],
        });
        if let Some(s) = sink.as_ref() {
            if !s.same_version(&meta) {
                return Err(Stop::Changed);
            }
        }
        if sink.is_none() {
            *sink = Some(self.prepare(&conn0, &meta).await?);
        }
        let sink = sink.as_ref().unwrap().clone();
        let queue = Queue::new(sink.missing());
        self.client.emit(Event::Start {
            path: self.remote.clone(),
            local: self.local.clone(),
            size: meta.size,
            resumed: sink.done_bytes(),
        });

        if let Some((data, crc)) = inline {
            self.transferred
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            // Checked where it is hashed (Sink::put); an empty file's CRC32 is 0.
            let intact = match meta.count {
                0 => crc == 0,
                _ => sink.put(0, data, crc).await?,
            };
            if !intact {
                self.client.emit(Event::Corrupt {
                    path: self.remote.clone(),
                    chunk: 0,
                });
                return Err(Stop::Fail(Error::Corrupt(Cmd::OPEN)));
            }
            return self.finish(&sink, &meta).await;
        }

        // Every connection gets its own handle; one whose identity differs means a change.
        let mut conns = vec![(conn0, meta.handle)];
        let wanted_conns = (queue.len() as usize).div_ceil(RUN as usize * LANES);
        let extra = slots.iter().skip(1).take(wanted_conns.saturating_sub(1));
        let opened = futures::future::join_all(extra.map(|&slot| async move {
            let c = self.client.conn(slot).await?;
            let (m, _) = open_read(&c, &self.remote).await?;
            Ok::<_, Error>((c, m))
        }))
        .await;
        for r in opened {
            match r {
                Ok((c, m)) => {
                    handles.push(c.clone(), m.handle);
                    if m.identity != meta.identity {
                        return Err(Stop::Changed);
                    }
                    conns.push((c, m.handle));
                }
                // The others can do the work; a retry will try this connection again.
                Err(e) => debug!("extra connection unavailable: {e}"),
            }
        }

        let corrupt = Mutex::new(HashMap::new());
        let lanes = conns.iter().flat_map(|(c, h)| {
            let runs = queue.len().div_ceil(RUN) as usize;
            (0..LANES.min(runs)).map(|_| self.lane(&sink, c, *h, &queue, &corrupt))
        });
        let results = futures::future::join_all(lanes).await;
        drop(handles);

        let mut first_err = None;
        for r in results {
            match r {
                Ok(()) => {}
                // A broken promise (extra chunks, bad replies) fails even a complete download.
                Err(Stop::Fail(e)) if !e.is_retryable() => return Err(Stop::Fail(e)),
                Err(Stop::Fail(e)) => {
                    first_err.get_or_insert(Stop::Fail(e));
                }
                Err(e) => return Err(e),
            }
        }
        if !sink.is_complete() {
            return Err(first_err.unwrap_or_else(|| {
                Stop::Fail(Error::Protocol("download ended with chunks missing".into()))
            }));
        }
        self.finish(&sink, &meta).await
    }

    /// Verifies and publishes a complete sink.
    async fn finish(&self, sink: &Arc<Sink>, meta: &Meta) -> Result<Transfer, Stop> {
        let blake3 = sink.finish().await.map_err(|e| match e {
            Error::Integrity { detail, .. } => Stop::BadHash(detail),
            e => Stop::Fail(e),
        })?;
        Ok(Transfer {
            path: self.remote.clone(),
            bytes: meta.size,
            transferred: self.transferred.load(Ordering::Relaxed),
            blake3,
        })
    }

    /// Loads or creates the local side: reuses a matching partial download after verifying it.
    async fn prepare(&self, conn: &Conn, meta: &Meta) -> Result<Arc<Sink>> {
        let (state, out) = match &self.out {
            // Nothing to resume in a file of at most one chunk: no state to look for.
            Out::File { .. } if meta.count <= 1 => (None, self.out.clone()),
            Out::File { work, .. } => {
                let work = work.clone();
                let st = spawn_blocking(move || {
                    let wd = work.existing_dir().map_err(|e| Error::io(".fsc-work", e))?;
                    Ok(wd.and_then(|wd| PartState::load(&wd, &work.state())))
                })
                .await?;
                (st, self.out.clone())
            }
            Out::Stdout => (None, Out::Stdout),
        };
        let state = match state {
            Some(s) if s.matches(&meta.identity, meta.size, meta.chunk_size, &meta.blake3) => {
                Some(s)
            }
            Some(_) => {
                self.client.emit(Event::Restart {
                    path: self.remote.clone(),
                    reason: "remote file changed since the partial download".into(),
                });
                None
            }
            None => None,
        };
        // Always the server's manifest, never CRCs remembered from an earlier run: what is on
        // disk is checked against what the server says now. A single chunk is checked by its
        // frame CRC and the whole-file BLAKE3.
        let crcs = match meta.count {
            0 | 1 => Vec::new(),
            n => manifest(conn, meta.handle, n).await?,
        };
        let remote = self.remote.clone();
        let meta = meta.clone();
        let preserve = self.client.shared.opts.preserve;
        if meta.count <= 1 {
            // Just an open: cheaper here than a hop to a blocking thread (many small files).
            return Sink::create(remote, meta, crcs, out, None, preserve);
        }
        spawn_blocking(move || Sink::create(remote, meta, crcs, out, state, preserve)).await
    }

    /// Keeps one READ outstanding on `conn` until the queue is empty.
    async fn lane(
        &self,
        sink: &Arc<Sink>,
        conn: &Conn,
        handle: u32,
        queue: &Queue,
        corrupt: &Mutex<HashMap<u32, u32>>,
    ) -> Result<(), Stop> {
        loop {
            // Registered before the check, so an advance in between is not missed.
            let advanced = sink.advanced.notified();
            // A run never asks for more than the window holds (big chunks are the server's
            // choice): what a READ may bring is what the window bounds.
            let run = (conn.window_total() / sink.chunk_size).clamp(1, RUN);
            let Some((first, mut count)) = queue.take(run) else {
                break;
            };
            let limit = sink.fetch_limit(first);
            if limit < count && limit > 0 {
                // Only the part of the run within reach; the rest goes back.
                queue.requeue(first + limit, first + count);
                count = limit;
            }
            if limit == 0 {
                // Far ahead of stdout: leave the run for later; the lane holding stdout's next
                // chunk is never held here (it already has its run), and a chunk put back at
                // the front is within reach of any lane.
                queue.requeue(first, first + count);
                advanced.await;
                continue;
            }
            let bytes = (first..first + count)
                .map(|i| sink.chunk_len(i) as u64)
                .sum();
            let mut window = match conn.window(bytes).await {
                Ok(w) => w,
                Err(e) => {
                    queue.requeue(first, first + count);
                    return Err(e.into());
                }
            };
            let mut next = first;
            let r = self
                .read_run(
                    sink,
                    conn,
                    handle,
                    first,
                    count,
                    &mut window,
                    &mut next,
                    queue,
                    corrupt,
                )
                .await;
            // Whatever was not received goes back for another lane or attempt.
            queue.requeue(next, first + count);
            r?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_run(
        &self,
        sink: &Arc<Sink>,
        conn: &Conn,
        handle: u32,
        first: u32,
        count: u32,
        window: &mut Window,
        next: &mut u32,
        queue: &Queue,
        corrupt: &Mutex<HashMap<u32, u32>>,
    ) -> Result<(), Stop> {
        let end = first + count;
        let mut s = conn.open().await?;
        let bytes = (first..end).map(|i| u64::from(sink.chunk_len(i))).sum();
        s.expect(count, bytes);
        let req = msg::ReadRequest {
            handle,
            first_chunk: first,
            count,
        };
        s.send_msg(Cmd::READ, flags::END, &req).await?;
        while *next < end {
            let i = *next;
            let len = sink.chunk_len(i);
            let (header, payload) = match s.recv().await? {
                Ok(f) if f.header.is_error() => {
                    let e: msg::Error = f
                        .decode()
                        .map_err(|e| Error::Protocol(format!("read error reply: {e}")))?;
                    return Err(Error::from_wire(e).into());
                }
                Ok(f) => (f.header, Some(f.payload)),
                Err(bad) => (bad.header, None),
            };
            if !header.is_data() || header.cmd != Cmd::READ {
                return Err(
                    Error::Protocol(format!("unexpected frame in read of chunk {i}")).into(),
                );
            }
            self.transferred
                .fetch_add(header.payload_len as u64, Ordering::Relaxed);
            let good = payload.filter(|p| {
                p.len() == len as usize && sink.crc(i).is_none_or(|c| c == header.checksum)
            });
            *next += 1;
            let stored = match good {
                Some(p) => sink.put(i, p, header.checksum).await?,
                None => false,
            };
            if !stored {
                self.client.emit(Event::Corrupt {
                    path: self.remote.clone(),
                    chunk: i,
                });
                let n = {
                    let mut c = corrupt.lock().unwrap();
                    let n = c.entry(i).or_insert(0);
                    *n += 1;
                    *n
                };
                if let Some(n) = self.corrupt_log.hit() {
                    let remote = crate::progress::escape(&self.remote);
                    warn!(%remote, chunk = i, "{n} chunk(s) failed their CRC32; fetching again");
                }
                if n >= MAX_CORRUPT {
                    return Err(Stop::Fail(Error::Integrity {
                        path: self.remote.clone(),
                        detail: format!("chunk {i} failed its CRC32 {n} times"),
                    }));
                }
                queue.requeue(i, i + 1);
            }
            window.release(len);
            self.client.emit(Event::Progress {
                path: self.remote.clone(),
                done: sink.done_bytes(),
                size: sink.size,
                transferred: self.transferred.load(Ordering::Relaxed),
            });
            if header.is_end() && *next < end {
                return Err(Error::Protocol(format!("read ended early at chunk {i}")).into());
            }
            if !header.is_end() && *next == end {
                return Err(Error::Protocol("read sent more chunks than asked".into()).into());
            }
        }
        Ok(())
    }
}

/// Handles opened in this attempt, closed (without waiting) when dropped.
struct Handles(Mutex<Vec<(Conn, u32)>>);

impl Handles {
    fn new(v: Vec<(Conn, u32)>) -> Handles {
        Handles(Mutex::new(v))
    }
    fn push(&self, c: Conn, h: u32) {
        self.0.lock().unwrap().push((c, h));
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        for (c, handle) in self.0.lock().unwrap().drain(..) {
            if c.is_alive() {
                tokio::spawn(async move {
                    let _ = c
                        .send_detached(Cmd::CLOSE, &msg::CloseRequest { handle })
                        .await;
                });
            }
        }
    }
}

async fn spawn_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// OPEN(READ), with the reply checked for internal consistency. A file of at most
/// [`INLINE_MAX`] bytes comes back whole with the reply (no handle: nothing to READ or CLOSE).
async fn open_read(conn: &Conn, remote: &str) -> Result<(Meta, Option<(Bytes, u32)>)> {
    let req = msg::OpenRequest {
        path: remote.to_string(),
        mode: msg::OpenMode::OpenRead as i32,
        inline_max: INLINE_MAX,
        ..Default::default()
    };
    let mut s = conn.open().await?;
    s.send_msg(Cmd::OPEN, flags::END, &req).await?;
    let f = s.recv_frame(Cmd::OPEN).await?;
    let bad = |what: &str| Error::Protocol(format!("open {remote}: {what}"));
    if f.header.is_data() {
        return Err(bad("DATA frame instead of the OpenResponse"));
    }
    let r: msg::OpenResponse = f.decode().map_err(|e| bad(&e.to_string()))?;
    let inline = if f.header.is_end() {
        None
    } else {
        let d = s.recv_frame(Cmd::OPEN).await?;
        if !d.header.is_data() || !d.header.is_end() {
            return Err(bad("inline contents are not one final DATA frame"));
        }
        if r.handle != 0 || d.payload.len() as u64 != r.size || r.size > INLINE_MAX as u64 {
            return Err(bad("inline reply does not match its OpenResponse"));
        }
        // Unchecked (the codec leaves DATA checksums to us, conn::reader): Job::attempt does it.
        Some((d.payload, d.header.checksum))
    };
    let cs = r.chunk_size;
    if !cs.is_power_of_two() || cs < 1024 {
        return Err(bad(&format!(
            "chunk size {cs} is not a power of two >= 1024"
        )));
    }
    if cs > crate::conn::MAX_DATA_FRAME {
        return Err(bad(&format!("chunk size {cs} exceeds our frame limit")));
    }
    // In u64, checked: a wrapped count once published 0 bytes for a 4 TiB file.
    let count = checked_chunk_count(r.size, cs).ok_or_else(|| {
        bad(&format!(
            "{} bytes in chunks of {cs} is more than {MAX_CHUNKS_PER_FILE} chunks",
            r.size
        ))
    })?;
    if r.chunk_count != count {
        return Err(bad("chunk count does not match size"));
    }
    let blake3: [u8; 32] = r
        .blake3
        .as_slice()
        .try_into()
        .map_err(|_| bad("BLAKE3 is not 32 bytes"))?;
    let meta = Meta {
        handle: r.handle,
        size: r.size,
        mtime_ns: r.mtime_ns,
        identity: r.identity,
        chunk_size: cs,
        count: r.chunk_count,
        blake3,
        mode: r.mode,
    };
    Ok((meta, inline))
}

/// Every chunk's CRC32, pages fetched concurrently.
async fn manifest(conn: &Conn, handle: u32, count: u32) -> Result<Vec<u32>> {
    let pages = (0..count)
        .step_by(MANIFEST_PAGE as usize)
        .map(|first| async move {
            let n = MANIFEST_PAGE.min(count - first);
            let req = msg::ManifestRequest {
                handle,
                first_chunk: first,
                count: n,
            };
            let r: msg::ManifestResponse = conn.request(Cmd::MANIFEST, &req).await?;
            if r.first_chunk != first || r.crc32.len() != n as usize {
                return Err(Error::Protocol(format!(
                    "manifest page at {first}: got {} CRCs from {}",
                    r.crc32.len(),
                    r.first_chunk
                )));
            }
            Ok(r.crc32)
        });
    let pages = futures::future::try_join_all(pages).await?;
    Ok(pages.concat())
}

/// Missing chunks, taken in runs of consecutive indices.
struct Queue(Mutex<VecDeque<u32>>);

impl Queue {
    fn new(missing: Vec<u32>) -> Queue {
        Queue(Mutex::new(missing.into()))
    }

    fn len(&self) -> u32 {
        self.0.lock().unwrap().len() as u32
    }

    /// Up to `max` consecutive chunks from the front.
    fn take(&self, max: u32) -> Option<(u32, u32)> {
        let mut q = self.0.lock().unwrap();
        let first = q.pop_front()?;
        let mut count = 1;
        while count < max && q.front() == Some(&(first + count)) {
            q.pop_front();
            count += 1;
        }
        Some((first, count))
    }

    /// Puts `[from, to)` back at the front, to be fetched next.
    fn requeue(&self, from: u32, to: u32) {
        let mut q = self.0.lock().unwrap();
        for i in (from..to).rev() {
            q.push_front(i);
        }
    }
}

/// The local side of one download: the part file (or stdout), the chunks present and their
/// BLAKE3 chaining values, and the resume state.
struct Sink {
    remote: String,
    identity: String,
    size: u64,
    chunk_size: u32,
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
    advanced: tokio::sync::Notify,
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
}

impl Sink {
    /// Opens or creates the part file; with a matching `state`, keeps every chunk already on
    /// disk that passes its CRC32 (claimed in the state or not: data written just before a
    /// kill is in the page cache even if the state did not yet claim it).
    fn create(
        remote: String,
        m: Meta,
        crcs: Vec<u32>,
        out: Out,
        state: Option<PartState>,
        preserve: bool,
    ) -> Result<Arc<Sink>> {
        let mut have = Have {
            have: Bitmap::new(m.count),
            cvs: vec![[0; 32]; m.count as usize],
            done_bytes: 0,
            unsaved: 0,
            last_save: Instant::now(),
        };
        let out = match out {
            Out::Stdout => SinkOut::Stdout(Mutex::new(Reorder {
                next: 0,
                pending: BTreeMap::new(),
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
                    (None, Some(wd)) => {
                        let f = wd.open_rw(&work.part(), state.is_none()).map_err(err)?;
                        lock_exclusive(&f).map_err(err)?;
                        f
                    }
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
                    let len = i64::try_from(m.size).unwrap_or(i64::MAX);
                    if let Err(e) = nix::fcntl::posix_fallocate(&part, 0, len) {
                        debug!("fallocate: {e}");
                        let _ = punch_hole(&part, 0, m.size);
                    }
                }
                SinkOut::File {
                    direct: stateful.then(|| DirectFile::reopen(&part)).flatten(),
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
            writing: Mutex::new(()),
        };
        if let SinkOut::File { stateful: true, .. } = sink.out {
            // Record what the part belongs to before any chunk is written into it.
            sink.checkpoint()?;
        }
        Ok(Arc::new(sink))
    }

    fn same_version(&self, m: &Meta) -> bool {
        self.identity == m.identity
            && self.size == m.size
            && self.chunk_size == m.chunk_size
            && self.blake3 == m.blake3
    }

    fn chunk_len(&self, i: u32) -> u32 {
        chunk_len(self.size, self.chunk_size, i)
    }

    fn crc(&self, i: u32) -> Option<u32> {
        self.crcs.get(i as usize).copied()
    }

    fn missing(&self) -> Vec<u32> {
        let st = self.st.lock().unwrap();
        (0..self.count).filter(|&i| !st.have.get(i)).collect()
    }

    fn done_bytes(&self) -> u64 {
        self.st.lock().unwrap().done_bytes
    }

    fn done_chunks(&self) -> u32 {
        self.st.lock().unwrap().have.count()
    }

    /// How many chunks from `first` on a lane may fetch now: any number for a file; to stdout
    /// only those within [`STDOUT_AHEAD`] chunks and [`STDOUT_AHEAD_BYTES`] of the next chunk
    /// stdout needs (0: none yet), which bounds the reorder buffer in bytes.
    fn fetch_limit(&self, first: u32) -> u32 {
        match &self.out {
            SinkOut::File { .. } => u32::MAX,
            SinkOut::Stdout(r) => {
                let ahead = (STDOUT_AHEAD_BYTES / self.chunk_size).clamp(1, STDOUT_AHEAD);
                let reach = r.lock().unwrap().next.saturating_add(ahead);
                reach.saturating_sub(first)
            }
        }
    }

    fn is_complete(&self) -> bool {
        self.st.lock().unwrap().have.is_full()
    }

    /// Checks chunk `i` against `crc` (the connection's codec leaves that to us, see
    /// `conn::reader`) and writes it (off the reactor: disk and hashing block). Ok(false): the
    /// chunk failed its CRC32 and was not stored.
    async fn put(self: &Arc<Self>, i: u32, data: Bytes, crc: u32) -> Result<bool> {
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

    fn put_blocking(&self, i: u32, data: Bytes, crc: u32) -> Result<bool> {
        // Both hashes in one visit, while the chunk is in this core's cache.
        let (actual, cv) = hash_chunk(&data, i, self.chunk_size, self.size);
        if actual != crc {
            return Ok(false);
        }
        let len = data.len() as u64;
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
                    write_stdout(&d)?;
                    r.next += 1;
                }
                if r.next != before {
                    self.advanced.notify_waiters();
                }
            }
        }
        let checkpoint = {
            let mut st = self.st.lock().unwrap();
            if st.have.get(i) {
                return Ok(true);
            }
            st.have.set(i);
            st.cvs[i as usize] = cv;
            st.done_bytes += len;
            st.unsaved += 1;
            matches!(self.out, SinkOut::File { stateful: true, .. })
                && st.last_save.elapsed() >= SAVE_EVERY
        };
        if checkpoint {
            self.checkpoint()?;
        }
        Ok(true)
    }

    /// Records the chunks the part now holds. Not synced, and the part is not either: a claim
    /// only says where to look, since resuming verifies every chunk on disk by its CRC32.
    fn checkpoint(&self) -> Result<()> {
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
    async fn finish(self: &Arc<Self>) -> Result<[u8; 32]> {
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
    fn finish_blocking(&self) -> Result<[u8; 32]> {
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
    fn seal(&self) -> Result<[u8; 32]> {
        let root = {
            let st = self.st.lock().unwrap();
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
    fn name(&self) -> Result<()> {
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
    fn local_error(&self, e: std::io::Error) -> Error {
        match &self.out {
            SinkOut::File { dir, name, .. } => Error::io(dir.display(name), e),
            SinkOut::Stdout(_) => Error::io("<stdout>", e),
        }
    }

    /// After a download failed for good: a part with nothing received goes, with its state;
    /// otherwise the part stays for a resume, but the space reserved for the chunks that never
    /// arrived is given back.
    fn abandon(&self) {
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
    fn discard(&self) {
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

    #[test]
    fn queue_hands_out_consecutive_runs_and_takes_back_failures() {
        let q = Queue::new(vec![0, 1, 2, 3, 4, 7, 8, 10]);
        assert_eq!(q.take(4), Some((0, 4)));
        assert_eq!(q.take(4), Some((4, 1)));
        q.requeue(2, 4);
        assert_eq!(q.take(4), Some((2, 2)));
        assert_eq!(q.take(4), Some((7, 2)));
        assert_eq!(q.take(4), Some((10, 1)));
        assert_eq!(q.take(4), None);
    }

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
        let s = Sink::create("r/f".into(), m.clone(), crcs.clone(), out, Some(st), true).unwrap();
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
        let s = Sink::create("g".into(), m, crcs, out, None, false).unwrap();
        for (i, c) in chunks(&data, 1024).into_iter().enumerate() {
            let crc = crc32fast::hash(&c);
            s.put_blocking(i as u32, c, crc).unwrap();
        }
        assert!(matches!(s.finish_blocking(), Err(Error::Integrity { .. })));
        assert!(!tmp.path().join("g").exists());
    }
}
