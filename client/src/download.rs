//! Downloads: pipelined, verified as data arrives, resumable — the network side of one file.
//!
//! One file: OPEN(READ) gives size, identity, chunk size and the whole-file BLAKE3; MANIFEST
//! gives every chunk's CRC32. Each connection runs a few *lanes*, each keeping one READ of up
//! to [`RUN`] chunks outstanding, so the link never drains; `-j N` connections pull from one
//! shared queue of missing chunks. A chunk whose CRC32 fails is queued again. Every chunk goes
//! to the local side, `local::sink::Sink` (part file in the destination's working directory,
//! resume state, preallocation); when all are in, the sink checks the whole-file BLAKE3 and
//! publishes the very inode that was verified.
//!
//! The endgame: once nothing is left to ask for, a lane of a file spread over several
//! connections asks its connection for the rest of the biggest run still outstanding on
//! another one, as BitTorrent clients and aria2 do in their endgame. Whichever connection
//! brings a chunk first stores it; a READ whose remaining chunks are all in ends there (its
//! stream is dropped, which cancels it). Without it the file waits for its slowest
//! connection: on a lossy long path one connection still in its startup held the last 16 MiB
//! of a 256 MiB download for 2–3 s while the others sat idle. What it costs is bounded by what
//! was in flight when the queue ran dry.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use fsd::protocol::{
    checked_chunk_count, flags, msg, Cmd, ErrorCode, MANIFEST_CVS_PAGE, MANIFEST_PAGE,
    MAX_CHUNKS_PER_FILE,
};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tracing::{debug, warn};

use crate::client::{remote_basename, Client, Slots, Transfer};
use crate::conn::{Conn, Throttle, Window};
use crate::error::{Error, Result};
use crate::grow::grown;
use crate::local::sink::{spawn_blocking, Meta, Out, Seed, Sink};
use crate::local::state::PartState;
use crate::local::{check_name, work_dir_name, LocalDir, Work};
use crate::progress::Event;

/// Chunks asked for by one READ.
const RUN: u32 = 4;
/// Files up to this size are asked for inline with their OPEN (one round trip per file).
const INLINE_MAX: u32 = 64 * 1024;
/// READs kept outstanding per connection for one file.
const LANES: usize = 4;
/// The same while chunks come compressed: each brings several times fewer bytes over the wire
/// than it delivers, so filling a long path takes more of them in flight (still within the
/// connection's window, which counts uncompressed bytes).
const LANES_COMPRESSED: usize = 8;
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
            fresh: std::sync::atomic::AtomicBool::new(false),
        };
        let r = match &job.out {
            // The write entry point of every download into a file (single, tree, batch
            // leftovers): a dry run never gets past it, whatever the planning decided.
            Out::File { .. } => match self.may_write(&job.local) {
                Ok(()) => job.run().await,
                Err(e) => Err(e),
            },
            Out::Stdout => job.run().await,
        };
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
                message: e.message_for(remote),
            }),
        }
        r
    }
}

impl Client {
    /// The whole-file BLAKE3 of a remote file, from OPEN READ: no file data moves (fsd keeps
    /// it in its manifest cache). Retried like any request.
    pub(crate) async fn remote_blake3(&self, remote: &str) -> Result<[u8; 32]> {
        let mut backoff = self.backoff();
        loop {
            let r = async {
                let conn = self.conn(self.pick_slot()).await?;
                let (meta, _) = open_read(&conn, remote, 0).await?;
                drop(Handles::new(vec![(conn, meta.handle)]));
                Ok(meta.blake3)
            };
            match r.await {
                Ok(h) => return Ok(h),
                Err(e) => backoff.wait(e, remote).await?,
            }
        }
    }
}

/// `local` as a directory and a leaf name.
pub(crate) fn resolve_local(remote: &str, local: &Path) -> Result<Out> {
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
    /// Set once the whole-file BLAKE3 failed: the next attempt starts from nothing, not from
    /// the destination's old version (whose chunks may have matched a CRC32 by chance).
    fresh: std::sync::atomic::AtomicBool,
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
                    // Bytes already written to stdout cannot be taken back: a restart would
                    // splice the new version after part of the old one. What counts is what
                    // the sink emitted, in this attempt or any before (not what was stored
                    // before this attempt began: on the first attempt that is nothing).
                    let emitted = sink.as_ref().map_or(0, |s| s.emitted());
                    if emitted > 0 {
                        return Err(Error::Remote {
                            code: ErrorCode::Changed,
                            message: format!(
                                "{} changed during the download after {emitted} bytes of it \
                                 were written to standard output: that output is incomplete \
                                 and must not be used",
                                self.remote
                            ),
                            retryable: false,
                        });
                    }
                    if changes > self.client.shared.opts.retries + 1 {
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
                    self.fresh.store(true, Ordering::Relaxed);
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
        let (meta, inline) = match open_read(&conn0, &self.remote, INLINE_MAX).await {
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

        if let Some(Inline { data, crc, wire }) = inline {
            self.transferred.fetch_add(wire, Ordering::Relaxed);
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
        let wanted_conns = queue.len().div_ceil(RUN as usize * LANES);
        let extra = slots.iter().skip(1).take(wanted_conns.saturating_sub(1));
        let opened = futures::future::join_all(extra.map(|&slot| self.open_extra(slot))).await;
        let mut conns = vec![(conn0, meta.handle)];
        for r in opened {
            conns.extend(self.admit(r, &meta, &handles)?);
        }

        let fetch = Fetch {
            queue,
            corrupt: Mutex::new(HashMap::new()),
            flights: Flights::default(),
        };
        let queue = &fetch.queue;
        let mut running: FuturesUnordered<_> = conns
            .into_iter()
            .flat_map(|(c, h)| self.lanes(&sink, c, h, &fetch))
            .collect();
        let mut opening = FuturesUnordered::new();
        // -j auto: connections the run adds (crate::grow) join this file while enough is left.
        let mut growth = match self.slots {
            Slots::All => self.client.watch_growth(),
            Slots::One(_) => None,
        };
        let mut next_slot = slots.len();
        let _busy = self.client.busy();
        let mut results = Vec::new();
        loop {
            tokio::select! {
                r = running.next() => match r {
                    Some(r) => results.push(r),
                    None => break,
                },
                Some(r) = opening.next() => {
                    if let Some((c, h)) = self.admit(r, &meta, &handles)? {
                        running.extend(self.lanes(&sink, c, h, &fetch));
                    }
                }
                _ = grown(&mut growth), if opening.is_empty() => {
                    while next_slot < self.client.connections()
                        && queue.len() >= RUN as usize * LANES
                    {
                        opening.push(self.open_extra(next_slot));
                        next_slot += 1;
                    }
                }
            }
        }
        // A connection still opening when the work ran out: its handle is closed with the
        // others rather than left open on a pooled connection.
        while let Some(r) = opening.next().await {
            let _ = self.admit(r, &meta, &handles);
        }
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

    /// Another connection's OPEN of the file, for more lanes.
    async fn open_extra(&self, slot: usize) -> Result<(Conn, Meta)> {
        let c = self.client.conn(slot).await?;
        let (m, _) = open_read(&c, &self.remote, INLINE_MAX).await?;
        Ok((c, m))
    }

    /// An extra connection joins if it opened the same version of the file.
    fn admit(
        &self,
        opened: Result<(Conn, Meta)>,
        meta: &Meta,
        handles: &Handles,
    ) -> Result<Option<(Conn, u32)>, Stop> {
        match opened {
            Ok((c, m)) => {
                handles.push(c.clone(), m.handle);
                if m.identity == meta.identity {
                    return Ok(Some((c, m.handle)));
                }
                if !self.client.several_nodes() {
                    return Err(Stop::Changed);
                }
                // Another node that does not serve this version (another root, a stale
                // cache): the nodes that do go on without it.
                debug!(remote = %self.remote, "a node serves another version; not used");
                Ok(None)
            }
            // The others can do the work; a retry will try this connection again.
            Err(e) => {
                debug!("extra connection unavailable: {e}");
                Ok(None)
            }
        }
    }

    /// The lanes of one connection.
    fn lanes<'a>(
        &'a self,
        sink: &'a Arc<Sink>,
        conn: Conn,
        handle: u32,
        fetch: &'a Fetch,
    ) -> Vec<futures::future::BoxFuture<'a, Result<(), Stop>>> {
        let runs = fetch.queue.len().div_ceil(RUN as usize);
        let lanes = match conn.compress_level() {
            0 => LANES,
            _ => LANES_COMPRESSED,
        };
        (0..lanes.min(runs))
            .map(|_| {
                let c = conn.clone();
                async move { self.lane(sink, &c, handle, fetch).await }.boxed()
            })
            .collect()
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
        // A fresh part of a multi-chunk file may take the chunks of the destination's old
        // version that are still current (chunk delta): the server's chaining values say which.
        // Not after a failed whole-file hash: that attempt starts from nothing.
        let seeding = meta.count > 1
            && state.is_none()
            && matches!(out, Out::File { .. })
            && !self.fresh.load(Ordering::Relaxed);
        let (crcs, cvs) = match meta.count {
            0 | 1 => (Vec::new(), None),
            n => manifest(conn, meta.handle, n, seeding).await?,
        };
        let remote = self.remote.clone();
        let meta = meta.clone();
        let preserve = self.client.shared.opts.preserve;
        if meta.count <= 1 {
            // Just an open: cheaper here than a hop to a blocking thread (many small files).
            return Sink::create(remote, meta, crcs, out, None, preserve, None);
        }
        let seed = seeding.then(|| cvs.map_or(Seed::Crcs, Seed::Cvs));
        spawn_blocking(move || Sink::create(remote, meta, crcs, out, state, preserve, seed)).await
    }

    /// Keeps one READ outstanding on `conn` until the queue is empty.
    async fn lane(
        &self,
        sink: &Arc<Sink>,
        conn: &Conn,
        handle: u32,
        fetch: &Fetch,
    ) -> Result<(), Stop> {
        // Spread over the pool (Slots::All, whose first slot is never retired), a lane of a
        // connection that -j auto retired stops taking runs; the others finish the file.
        let spread = matches!(self.slots, Slots::All);
        let queue = &fetch.queue;
        loop {
            if spread && self.client.retired(conn) {
                break;
            }
            // Registered before the check, so an advance in between is not missed.
            let advanced = sink.advanced.notified();
            // A run never asks for more than the window holds (big chunks are the server's
            // choice): what a READ may bring is what the window bounds.
            let run = (conn.window_total() / sink.chunk_size).clamp(1, RUN);
            let (first, mut count, flight) = match queue.take(run) {
                Some((first, count)) => {
                    let flight = fetch.flights.start(conn.slot(), first, first + count);
                    (first, count, flight)
                }
                None => match fetch.flights.steal(conn.slot(), sink) {
                    Some((first, end, flight)) => (first, end - first, flight),
                    None => break,
                },
            };
            let limit = sink.fetch_limit(first);
            if limit < count && limit > 0 {
                // Only the part of the run within reach; the rest goes back.
                queue.requeue_missing(first + limit, first + count, sink);
                count = limit;
            }
            if limit == 0 {
                // Far ahead of stdout: leave the run for later; the lane holding stdout's next
                // chunk is never held here (it already has its run), and a chunk put back at
                // the front is within reach of any lane.
                queue.requeue_missing(first, first + count, sink);
                drop(flight);
                advanced.await;
                continue;
            }
            let bytes = (first..first + count)
                .map(|i| sink.chunk_len(i) as u64)
                .sum();
            let mut window = match conn.window(bytes).await {
                Ok(w) => w,
                Err(e) => {
                    queue.requeue_missing(first, first + count, sink);
                    return Err(e.into());
                }
            };
            let mut next = first;
            let r = self
                .read_run(
                    sink,
                    conn,
                    handle,
                    (first, count),
                    &mut window,
                    &mut next,
                    fetch,
                    &flight,
                )
                .await;
            // Whatever was not received goes back for another lane or attempt.
            queue.requeue_missing(next, first + count, sink);
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
        (first, count): (u32, u32),
        window: &mut Window,
        next: &mut u32,
        fetch: &Fetch,
        flight: &Flight<'_>,
    ) -> Result<(), Stop> {
        let end = first + count;
        let mut s = conn.open().await?;
        let bytes = (first..end).map(|i| u64::from(sink.chunk_len(i))).sum();
        s.expect(count, bytes);
        let req = msg::ReadRequest {
            handle,
            first_chunk: first,
            count,
            compress_level: conn.compress_level(),
        };
        s.send_msg(Cmd::READ, flags::END, &req).await?;
        while *next < end {
            let i = *next;
            let len = sink.chunk_len(i);
            let Some(reply) =
                reply_unless_stored(sink, *next..end, &flight.contest, s.recv()).await
            else {
                // Every chunk left came on the other connection: dropping the stream cancels
                // this READ.
                return Ok(());
            };
            let (header, payload) = match reply? {
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
            self.client.moved(header.payload_len as u64);
            let chunk = match payload {
                Some(p) if header.is_compressed() => match unpack(conn, &p, len, Cmd::READ).await {
                    Ok(c) => Some(c),
                    Err(Error::Corrupt(_)) => None,
                    Err(e) => return Err(e.into()),
                },
                Some(p) => Some((p, header.checksum)),
                None => None,
            };
            let good = chunk.filter(|(p, crc)| {
                p.len() == len as usize && sink.crc(i).is_none_or(|c| c == *crc)
            });
            *next += 1;
            let stored = match good {
                // Brought first by another READ of it (the endgame's, or an earlier one's).
                Some(_) if sink.has(i) => true,
                Some((p, crc)) => {
                    let stored = sink.put(i, p, crc).await?;
                    if stored {
                        fetch.flights.delivered(conn.slot(), len);
                    }
                    stored
                }
                None => false,
            };
            if !stored {
                self.client.emit(Event::Corrupt {
                    path: self.remote.clone(),
                    chunk: i,
                });
                let n = {
                    let mut c = fetch.corrupt.lock().unwrap();
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
                // Unless the other READ of a contested chunk brought it meanwhile.
                fetch.queue.requeue_missing(i, i + 1, sink);
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

/// OPEN(READ), with the reply checked for internal consistency. A file of at most
/// [`INLINE_MAX`] bytes comes back whole with the reply (no handle: nothing to READ or CLOSE):
/// its contents, CRC32 and bytes on the wire. `inline_max` 0 asks for the metadata only.
async fn open_read(conn: &Conn, remote: &str, inline_max: u32) -> Result<(Meta, Option<Inline>)> {
    let req = msg::OpenRequest {
        path: remote.to_string(),
        mode: msg::OpenMode::OpenRead as i32,
        inline_max,
        compress_level: conn.compress_level(),
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
        if r.handle != 0 || r.size > u64::from(inline_max) {
            return Err(bad("inline reply does not match its OpenResponse"));
        }
        let wire = d.payload.len() as u64;
        let (data, crc) = match d.header.is_compressed() {
            // r.size ≤ inline_max (checked above), so it fits.
            true => {
                let len = u32::try_from(r.size).map_err(|_| bad("inline size"))?;
                unpack(conn, &d.payload, len, Cmd::OPEN).await?
            }
            // Unchecked (the codec leaves DATA checksums to us, conn::reader): Job::attempt
            // does it.
            false => (d.payload, d.header.checksum),
        };
        if data.len() as u64 != r.size {
            return Err(bad("inline reply does not match its OpenResponse"));
        }
        Some(Inline { data, crc, wire })
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
    if inline.is_some() && count > 1 {
        return Err(bad("inline contents for a file of more than one chunk"));
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

/// A small file's contents as they came with its OPEN reply.
struct Inline {
    data: Bytes,
    crc: u32,
    /// Bytes on the wire (less than the contents when compressed).
    wire: u64,
}

/// The chunk in a COMPRESSED payload: exactly `len` bytes, its CRC32 checked against the one
/// the payload carries (decompressed on a blocking thread: up to a chunk of CPU work). A
/// payload that does not decompress is a corrupt chunk, like one failing its CRC32.
async fn unpack(conn: &Conn, payload: &Bytes, len: u32, cmd: Cmd) -> Result<(Bytes, u32)> {
    if !conn.accepts_compressed() {
        return Err(Error::Protocol(
            "compressed chunk on a connection that agreed on none".into(),
        ));
    }
    let p = payload.clone();
    tokio::task::spawn_blocking(move || fsd::compress::decompress(&p, len as usize))
        .await
        .expect("decompressing thread")
        .map_err(|e| {
            debug!("{e}");
            Error::Corrupt(cmd)
        })
}

/// Every chunk's CRC32, pages fetched concurrently; with `want_cvs`, also every chunk's BLAKE3
/// chaining value, if the server sends them (an older one does not: None).
async fn manifest(
    conn: &Conn,
    handle: u32,
    count: u32,
    want_cvs: bool,
) -> Result<(Vec<u32>, Option<Vec<ChainingValue>>)> {
    let page = match want_cvs {
        true => MANIFEST_CVS_PAGE,
        false => MANIFEST_PAGE,
    };
    let pages = (0..count)
        .step_by(usize::try_from(page).expect("a page count fits usize"))
        .map(|first| async move {
            let n = page.min(count - first);
            let req = msg::ManifestRequest {
                handle,
                first_chunk: first,
                count: n,
                cvs: want_cvs,
            };
            let r: msg::ManifestResponse = conn.request(Cmd::MANIFEST, &req).await?;
            // u64: n ≤ MANIFEST_PAGE, the reply's lengths are the peer's.
            let cvs_len = r.cvs.len() as u64;
            if r.first_chunk != first
                || u64::try_from(r.crc32.len()) != Ok(u64::from(n))
                || (cvs_len != 0 && (!want_cvs || cvs_len != u64::from(n) * 32))
            {
                return Err(Error::Protocol(format!(
                    "manifest page at {first}: got {} CRCs and {cvs_len} bytes of chaining \
                     values from {}",
                    r.crc32.len(),
                    r.first_chunk
                )));
            }
            let page_cvs: Option<Vec<ChainingValue>> = (cvs_len != 0).then(|| {
                r.cvs
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32-byte pieces"))
                    .collect()
            });
            Ok((r.crc32, page_cvs))
        });
    let pages = futures::future::try_join_all(pages).await?;
    // `count` passed OPEN's checks (≤ MAX_CHUNKS_PER_FILE), and every page matched its length.
    let count = usize::try_from(count).expect("a checked chunk count fits usize");
    let mut crcs = Vec::with_capacity(count);
    let mut cvs = want_cvs.then(|| Vec::with_capacity(count));
    for (page_crcs, page_cvs) in pages {
        crcs.extend(page_crcs);
        // Chaining values only if every page has them.
        cvs = match (cvs, page_cvs) {
            (Some(mut all), Some(page)) => {
                all.extend(page);
                Some(all)
            }
            _ => None,
        };
    }
    Ok((crcs, cvs))
}

/// What the lanes of one attempt share: chunks to ask for, CRC failures per chunk, READs
/// outstanding.
struct Fetch {
    queue: Queue,
    corrupt: Mutex<HashMap<u32, u32>>,
    flights: Flights,
}

/// The next reply of a READ — or None once it is contested (another connection was asked for
/// its chunks too) and every chunk of `rest` is stored.
async fn reply_unless_stored<T>(
    sink: &Sink,
    rest: std::ops::Range<u32>,
    contest: &Contest,
    recv: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(recv);
    loop {
        if contest.flag.load(Ordering::SeqCst) {
            // Registered before the check, so a chunk stored in between is not missed.
            let stored = sink.stored.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            if rest.clone().all(|i| sink.has(i)) {
                return None;
            }
            tokio::select! {
                r = &mut recv => return Some(r),
                () = &mut stored => {}
            }
        } else {
            // Woken when it becomes contested: a READ stalled on a slow connection must not
            // hold the file once the other has brought its chunks.
            let contested = contest.notify.notified();
            tokio::pin!(contested);
            contested.as_mut().enable();
            if contest.flag.load(Ordering::SeqCst) {
                continue;
            }
            tokio::select! {
                r = &mut recv => return Some(r),
                () = &mut contested => {}
            }
        }
    }
}

/// The READs of one file outstanding on its connections, for the endgame (module doc).
#[derive(Default)]
struct Flights(Mutex<FlightTable>);

#[derive(Default)]
struct FlightTable {
    next_id: u64,
    runs: Vec<FlightEntry>,
    /// Per pool slot: when its first READ of the file started, and the bytes it has stored.
    rates: HashMap<usize, (Instant, u64)>,
}

impl FlightTable {
    /// Bytes per second the connection in `slot` has stored for this file (0: none yet).
    fn rate(&self, slot: usize) -> f64 {
        self.rates.get(&slot).map_or(0.0, |(since, bytes)| {
            *bytes as f64 / since.elapsed().as_secs_f64().max(1e-3)
        })
    }
}

/// A READ is asked of a second connection only if that one would bring its chunks in less
/// than 1 / STEAL_MARGIN of the time the first needs for all it has outstanding: asking
/// twice sends the same bytes over the same bottleneck, which pays only against a connection
/// that lags far behind (still in its startup, or in loss recovery).
const STEAL_MARGIN: f64 = 2.0;

struct FlightEntry {
    id: u64,
    /// The pool slot of the connection it is on.
    slot: usize,
    first: u32,
    end: u32,
    contest: Arc<Contest>,
}

/// Whether another connection was asked for a READ's chunks too (each READ is, at most
/// once), and its signal.
#[derive(Default)]
struct Contest {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

/// A READ registered in [`Flights`] for as long as it lives.
struct Flight<'a> {
    flights: &'a Flights,
    id: u64,
    contest: Arc<Contest>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.flights
            .0
            .lock()
            .unwrap()
            .runs
            .retain(|r| r.id != self.id);
    }
}

impl Flights {
    /// Registers a READ of `[first, end)` on the connection in `slot`.
    fn start(&self, slot: usize, first: u32, end: u32) -> Flight<'_> {
        self.register(slot, first, end, false)
    }

    /// `bytes` of a chunk stored by the connection in `slot`.
    fn delivered(&self, slot: usize, bytes: u32) {
        if let Some((_, b)) = self.0.lock().unwrap().rates.get_mut(&slot) {
            *b += u64::from(bytes);
        }
    }

    fn register(&self, slot: usize, first: u32, end: u32, contested: bool) -> Flight<'_> {
        let mut t = self.0.lock().unwrap();
        t.rates.entry(slot).or_insert((Instant::now(), 0));
        let id = t.next_id;
        t.next_id += 1;
        let contest = Arc::new(Contest {
            flag: AtomicBool::new(contested),
            notify: tokio::sync::Notify::new(),
        });
        t.runs.push(FlightEntry {
            id,
            slot,
            first,
            end,
            contest: contest.clone(),
        });
        Flight {
            flights: self,
            id,
            contest,
        }
    }

    /// The endgame: the rest of a READ outstanding on another connection, not asked of a
    /// second one before, which this connection (`slot`) would bring well before that one
    /// gets through all it has outstanding (see [`STEAL_MARGIN`]); the one with the most
    /// chunks left. Marks it contested and returns its range and this READ's registration.
    fn steal(&self, slot: usize, sink: &Sink) -> Option<(u32, u32, Flight<'_>)> {
        let (first, end) = {
            let t = self.0.lock().unwrap();
            let mine = t.rate(slot);
            if mine == 0.0 {
                return None;
            }
            let missing = |r: &FlightEntry| -> u64 {
                (r.first..r.end)
                    .filter(|&i| !sink.has(i))
                    .map(|i| u64::from(sink.chunk_len(i)))
                    .sum()
            };
            // Seconds each other connection needs for everything it has outstanding.
            let mut behind: HashMap<usize, f64> = HashMap::new();
            for r in t.runs.iter().filter(|r| r.slot != slot) {
                *behind.entry(r.slot).or_default() += missing(r) as f64;
            }
            for (s, left) in behind.iter_mut() {
                *left /= t.rate(*s);
            }
            let (_, first, end, victim) = t
                .runs
                .iter()
                .filter(|r| r.slot != slot && !r.contest.flag.load(Ordering::SeqCst))
                .filter_map(|r| {
                    let first = (r.first..r.end).find(|&i| !sink.has(i))?;
                    let left = missing(r);
                    let lags = behind[&r.slot] > STEAL_MARGIN * left as f64 / mine;
                    lags.then_some((left, first, r.end, r))
                })
                .max_by_key(|&(left, ..)| left)?;
            debug!(
                first,
                end,
                from = victim.slot,
                to = slot,
                "endgame: chunks asked of a second connection"
            );
            let victim = &victim.contest;
            victim.flag.store(true, Ordering::SeqCst);
            victim.notify.notify_waiters();
            (first, end)
        };
        Some((first, end, self.register(slot, first, end, true)))
    }
}

/// Missing chunks, taken in runs of consecutive indices.
struct Queue(Mutex<VecDeque<u32>>);

impl Queue {
    fn new(missing: Vec<u32>) -> Queue {
        Queue(Mutex::new(missing.into()))
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
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

    /// Puts the chunks of `[from, to)` that `sink` lacks back at the front (another
    /// connection may have brought the others in the endgame).
    fn requeue_missing(&self, from: u32, to: u32, sink: &Sink) {
        let mut q = self.0.lock().unwrap();
        for i in (from..to).rev().filter(|&i| !sink.has(i)) {
            q.push_front(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_hands_out_consecutive_runs_and_takes_back_failures() {
        let q = Queue::new(vec![0, 1, 2, 3, 4, 7, 8, 10]);
        assert_eq!(q.take(4), Some((0, 4)));
        assert_eq!(q.take(4), Some((4, 1)));
        // Chunk 3 was brought by another READ meanwhile (the endgame): only 2 goes back.
        let cs = 1024;
        let data = vec![5u8; 11 * cs];
        let crcs: Vec<u32> = data.chunks(cs).map(crc32fast::hash).collect();
        let meta = Meta {
            handle: 1,
            size: data.len() as u64,
            mtime_ns: 0,
            identity: "v1".into(),
            chunk_size: u32::try_from(cs).unwrap(),
            count: 11,
            blake3: *blake3::hash(&data).as_bytes(),
            mode: 0o644,
        };
        let sink = Sink::create(
            "f".into(),
            meta,
            crcs.clone(),
            Out::Stdout,
            None,
            false,
            None,
        )
        .unwrap();
        let chunk3 = Bytes::copy_from_slice(&data[3 * cs..4 * cs]);
        assert!(sink.put_blocking(3, chunk3, crcs[3]).unwrap());
        q.requeue_missing(2, 4, &sink);
        assert_eq!(q.take(4), Some((2, 1)));
        assert_eq!(q.take(4), Some((7, 2)));
        assert_eq!(q.take(4), Some((10, 1)));
        assert_eq!(q.take(4), None);
    }
}
