//! Transfer commands: Open, Manifest, Read, Write, Commit, Close, and the per-connection
//! handle table they share.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::connection::{Failure, Received, Session, StreamTx};
use super::files::blocking;
use super::metrics::{Direction, Tracked, Transfer, TransferInfo};
use super::quotas::{Held, FDS_PER_READ, FDS_PER_UPLOAD};
use super::writer::{read_up_to, Outgoing};
use crate::compress::{self, Probe};
use crate::fs::manifest::Manifest;
use crate::fs::upload::{Upload, UploadParams, Writing};
use crate::fs::zcache::{Cached, ChunkKey};
use crate::protocol::{
    chunk_count, chunk_len, chunk_size_for, flags, msg, ErrorCode, Frame, Header,
    MANIFEST_CVS_PAGE, MANIFEST_PAGE, MAX_INLINE, MAX_UPLOADS_PER_CONNECTION,
};

/// Most chunks one READ may ask for.
pub const MAX_READ_CHUNKS: u32 = 1024;

/// An open handle.
#[derive(Clone)]
pub enum Handle {
    /// The fd stays open, so a file replaced mid-transfer keeps serving its old content.
    Read {
        file: Arc<File>,
        manifest: Arc<Manifest>,
        /// Whether this file's chunks are worth compressing (crate::compress).
        probe: Arc<Probe>,
    },
    Write(Arc<Upload>),
}

/// Write handles expired for idleness that a connection remembers, to answer a late request
/// on one with a retryable Timeout rather than BadHandle.
const EXPIRED_REMEMBERED: usize = 1024;

/// The handles of one connection.
#[derive(Default)]
pub struct Handles {
    map: HashMap<u32, Handle>,
    /// When each write handle was last named by a request (or opened).
    used: HashMap<u32, std::time::Instant>,
    /// Write handles closed for idleness, oldest first (at most [`EXPIRED_REMEMBERED`]).
    expired: std::collections::VecDeque<u32>,
    next: u32,
    /// Each handle's entry in the server's active-transfer table, and its place in the
    /// credential's handle quota and the server's descriptors.
    tracked: HashMap<u32, (Tracked, Held)>,
}

impl Handles {
    fn insert(
        &mut self,
        h: Handle,
        max: usize,
        tracked: Tracked,
        held: Held,
    ) -> Result<u32, Failure> {
        if self.map.len() >= max {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!("more than {max} open handles"),
            ));
        }
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.map.contains_key(&self.next) {
                if matches!(h, Handle::Write(_)) {
                    self.used.insert(self.next, std::time::Instant::now());
                }
                self.expired.retain(|&id| id != self.next);
                self.map.insert(self.next, h);
                self.tracked.insert(self.next, (tracked, held));
                return Ok(self.next);
            }
        }
    }

    fn remove(&mut self, id: u32) -> Option<Handle> {
        self.tracked.remove(&id);
        self.used.remove(&id);
        self.map.remove(&id)
    }

    /// Closes the write handles no request has named for `idle`: an idle upload keeps no
    /// descriptors (it stays in the state directory for resume). Returns the uploads, to be
    /// dropped off the reactor (the last reference syncs).
    pub fn expire_idle(&mut self, idle: std::time::Duration) -> Vec<Arc<Upload>> {
        let stale: Vec<u32> = self
            .used
            .iter()
            .filter(|(_, t)| t.elapsed() >= idle)
            .map(|(&id, _)| id)
            .collect();
        let mut gone = Vec::new();
        for id in stale {
            if let Some(Handle::Write(u)) = self.remove(id) {
                gone.push(u);
            }
            if self.expired.len() == EXPIRED_REMEMBERED {
                self.expired.pop_front();
            }
            self.expired.push_back(id);
        }
        gone
    }
}

/// A place for one more handle holding `fds` descriptors: within the credential's quota and
/// the server's descriptors, taken before the handle's file is opened.
fn handle_slot(s: &Session, fds: u32) -> Result<Held, Failure> {
    s.account.open_handle(&s.server.fds, fds)
}

/// Lists a transfer opened by this session (until its handle goes).
fn track(s: &Session, direction: Direction, path: &str, size: u64, done: u64) -> Tracked {
    s.server.metrics.transfers.start(TransferInfo {
        peer: s.peer,
        token_name: s.cred.name.clone(),
        path: path.to_string(),
        direction,
        size,
        done,
    })
}

/// Where handle `id` counts its progress.
fn progress(session: &Session, id: u32) -> Option<Arc<Transfer>> {
    let handles = session.handles.lock().unwrap();
    handles.tracked.get(&id).map(|(t, _)| t.transfer().clone())
}

pub(super) fn get(session: &Session, id: u32) -> Result<Handle, Failure> {
    let mut handles = session.handles.lock().unwrap();
    if let Some(t) = handles.used.get_mut(&id) {
        *t = std::time::Instant::now();
    }
    if let Some(h) = handles.map.get(&id) {
        return Ok(h.clone());
    }
    if handles.expired.contains(&id) {
        return Err(Failure::new(
            ErrorCode::Timeout,
            format!(
                "handle {id} was closed after {} s without use (the upload is kept): open it again",
                session.server.config.idle_timeout.as_secs()
            ),
        ));
    }
    Err(Failure::new(
        ErrorCode::BadHandle,
        format!("no handle {id} on this connection"),
    ))
}

/// Bytes of the chunks marked in `bitmap` (bit i of byte i/8): what a resumed upload has.
fn present_bytes(bitmap: &[u8], size: u64, chunk_size: u32) -> u64 {
    (0..chunk_count(size, chunk_size))
        .filter(|&i| {
            bitmap
                .get(i as usize / 8)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        })
        .map(|i| chunk_len(size, chunk_size, i) as u64)
        .sum()
}

fn encoded(m: impl Message) -> Result<Bytes, Failure> {
    Ok(Bytes::from(m.encode_to_vec()))
}

/// What an OPEN answers: an OpenResponse (with a handle), or for a small file read inline the
/// OpenResponse (no handle) followed by the file's contents as one DATA frame.
enum Opened {
    Reply(Bytes),
    /// `data` is a COMPRESSED payload when `compressed`.
    Inline {
        reply: Bytes,
        data: Bytes,
        compressed: bool,
    },
}

pub async fn open(session: &Arc<Session>, payload: Bytes, st: StreamTx) {
    // Room for the contents of an inline reply, reserved before they are read.
    let mut held = None;
    let opened = match msg::OpenRequest::decode(payload) {
        Err(e) => Err(e.into()),
        Ok(req) => match msg::OpenMode::try_from(req.mode) {
            Ok(msg::OpenMode::OpenRead) => {
                if req.inline_max > 0 {
                    let most = req.inline_max.min(MAX_INLINE);
                    held = Some(session.reserve_reply(most).await);
                }
                open_read(session, req).await
            }
            Ok(msg::OpenMode::OpenWrite) => open_write(session, req).await.map(Opened::Reply),
            Err(_) => Err(Failure::new(
                ErrorCode::BadRequest,
                format!("unknown open mode {}", req.mode),
            )),
        },
    };
    let (cmd, sid) = (st.cmd, st.stream_id);
    match opened {
        Ok(Opened::Reply(reply)) => {
            st.finish(Outgoing::Frame(Frame::new(cmd, sid, flags::END, reply)))
                .await
        }
        Ok(Opened::Inline {
            reply,
            data,
            compressed,
        }) => {
            if st
                .send(Outgoing::Frame(Frame::new(cmd, sid, 0, reply)))
                .await
            {
                let fl = match compressed {
                    true => flags::DATA | flags::END | flags::COMPRESSED,
                    false => flags::DATA | flags::END,
                };
                let last = Frame::new(cmd, sid, fl, data);
                // Keep what the contents take; the rest of the reservation goes back now.
                let item = match held.as_mut().and_then(|h| h.split(last.payload.len())) {
                    Some(h) => Outgoing::Held(last, h),
                    None => Outgoing::Frame(last),
                };
                drop(held);
                st.finish(item).await
            }
        }
        Err(e) => st.fail(e).await,
    }
}

async fn open_read(session: &Arc<Session>, req: msg::OpenRequest) -> Result<Opened, Failure> {
    blocking(session, move |s| {
        let slot = handle_slot(s, FDS_PER_READ)?;
        let (file, meta) = s.root().open_read(s.path(&req.path)?)?;
        let chunk_size = chunk_size_for(meta.size(), s.base_chunk_size);
        if chunk_size > s.client_max_frame {
            // A file this big needs chunks over the client's frames: the client must reconnect
            // with a bigger max_frame (PROTOCOL.md §7).
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "file needs {chunk_size}-byte chunks; client accepts {}",
                    s.client_max_frame
                ),
            ));
        }
        if req.inline_max > 0
            && meta.size() <= req.inline_max.min(MAX_INLINE).min(chunk_size) as u64
        {
            let level = req.compress_level.min(s.compress_level);
            return read_inline(s, &req.path, &file, &meta, chunk_size, level);
        }
        let manifest = s
            .server
            .manifests
            .get(&file, &meta, chunk_size, || s.account.hashing_turn())
            .map_err(|e| Failure::new(ErrorCode::Io, format!("{}: {e}", req.path)))?;
        let reply = msg::OpenResponse {
            size: manifest.size,
            mtime_ns: manifest.mtime_ns,
            identity: manifest.identity.clone(),
            chunk_size,
            chunk_count: manifest.crcs.len() as u32,
            blake3: manifest.blake3.to_vec(),
            mode: meta.mode() & 0o7777,
            handle: 0,
            upload_id: String::new(),
            bitmap: Vec::new(),
        };
        let handle = Handle::Read {
            file: Arc::new(file),
            manifest,
            probe: Arc::default(),
        };
        let tracked = track(s, Direction::Download, &req.path, reply.size, 0);
        let id =
            s.handles
                .lock()
                .unwrap()
                .insert(handle, s.server.config.max_handles, tracked, slot)?;
        tracing::info!(path = ?req.path, handle = id, size = reply.size, "opened for read");
        encoded(msg::OpenResponse {
            handle: id,
            ..reply
        })
        .map(Opened::Reply)
    })
    .await
}

/// A small file read whole, refused if it changed while being read (the bytes could be a mix
/// of two versions; a short read included).
pub(super) fn read_whole(
    s: &Session,
    name: &str,
    file: &File,
    meta: &std::fs::Metadata,
) -> Result<Vec<u8>, Failure> {
    let io = |e: std::io::Error| Failure::new(ErrorCode::Io, format!("{name:?}: {e}"));
    let len = usize::try_from(meta.len())
        .map_err(|_| Failure::new(ErrorCode::BadRequest, format!("{name:?}: too big")))?;
    let mut data = vec![0u8; len];
    let read = file.read_exact_at(&mut data, 0);
    let identity = s.server.ids.identity(meta);
    if s.server.ids.identity(&file.metadata().map_err(io)?) != identity {
        return Err(Failure::new(
            ErrorCode::Changed,
            format!("{name:?} changed while being read"),
        ));
    }
    read.map_err(io)?;
    Ok(data)
}

/// A file of at most one chunk, read whole and hashed here: cheaper than a manifest lookup, a
/// handle, a READ and a CLOSE (a tree of small files is mostly per-file overhead). Compressed
/// at `level` (0: never) if that pays.
fn read_inline(
    s: &Session,
    path: &str,
    file: &File,
    meta: &std::fs::Metadata,
    chunk_size: u32,
    level: u32,
) -> Result<Opened, Failure> {
    let data = read_whole(s, path, file, meta)?;
    let identity = s.server.ids.identity(meta);
    let reply = msg::OpenResponse {
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        identity,
        chunk_size,
        chunk_count: chunk_count(meta.len(), chunk_size),
        blake3: blake3::hash(&data).as_bytes().to_vec(),
        mode: meta.mode() & 0o7777,
        ..Default::default()
    };
    let stats = &s.server.stats;
    stats
        .bytes_copied
        .fetch_add(data.len() as u64, Ordering::Relaxed);
    stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
    tracing::info!(path, size = meta.len(), "read inline");
    let packed = match level {
        0 => None,
        _ => compress::compress(&data, crc32fast::hash(&data), level),
    };
    Ok(Opened::Inline {
        reply: Bytes::from(reply.encode_to_vec()),
        compressed: packed.is_some(),
        data: packed.unwrap_or_else(|| Bytes::from(data)),
    })
}

/// The checks of an OPEN WRITE (and a PUT) that come before any state: rights, path, parent,
/// `no_clobber`, frame size. Blocking.
pub(super) fn upload_params(s: &Session, req: &msg::OpenRequest) -> Result<UploadParams, Failure> {
    let params = upload_plan(s, req)?;
    check_destination(s, &params)?;
    Ok(params)
}

/// The file-system checks of an OPEN WRITE or PUT, before the client sends its data: the
/// parent is a directory, the name is not one, and with `no_clobber` it is free. The publish
/// refuses all three again (the name may change meanwhile); these only fail early. Blocking.
fn check_destination(s: &Session, p: &UploadParams) -> Result<(), Failure> {
    let path = &p.path;
    if let Some((parent, _)) = path.rsplit_once('/') {
        let e = s.root().stat(parent)?;
        if e.kind != msg::Kind::Dir as i32 {
            return Err(Failure::new(
                ErrorCode::NotADirectory,
                format!("{parent:?} is not a directory"),
            ));
        }
    }
    if p.no_clobber && s.root().exists(path)? {
        return Err(Failure::new(
            ErrorCode::AlreadyExists,
            format!("{} exists", p.dest),
        ));
    }
    // Nor can an existing directory: rename(2) would refuse it only at COMMIT.
    if s.root()
        .stat(path)
        .is_ok_and(|e| e.kind == msg::Kind::Dir as i32)
    {
        return Err(Failure::new(
            ErrorCode::IsADirectory,
            format!("{} is a directory", p.dest),
        ));
    }
    Ok(())
}

/// What an OPEN WRITE, a PUT or a TREE_WRITE record asks to store, checked without touching
/// the file system: rights, the path (never the root), the frame size.
pub(super) fn upload_plan(s: &Session, req: &msg::OpenRequest) -> Result<UploadParams, Failure> {
    s.require_write()?;
    let path = s.path(&req.path)?.to_string();
    // The root (of the server or of the credential's prefix) can never be replaced by a file:
    // refuse it here, before any state exists.
    if path.is_empty() || path == "." {
        return Err(Failure::new(
            ErrorCode::InvalidPath,
            "cannot upload onto the root",
        ));
    }
    let params = UploadParams {
        owner: s.cred.name.clone(),
        // s.path() accepted it: the path as sent is the full path inside the root.
        dest: req.path.clone(),
        path,
        size: req.size,
        resume_key: req.resume_key.clone(),
        base_chunk_size: s.base_chunk_size,
        restart: req.restart,
        mode_bits: req.mode_bits,
        mtime_ns: req.mtime_ns,
        no_clobber: req.no_clobber,
        max_uploads: s.account.limits.uploads,
        max_upload_bytes: s.account.limits.upload_bytes,
    };
    if chunk_size_for(req.size, s.base_chunk_size) > s.server.config.max_frame {
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            "file too large for this server's max frame",
        ));
    }
    Ok(params)
}

async fn open_write(session: &Arc<Session>, req: msg::OpenRequest) -> Result<Bytes, Failure> {
    blocking(session, move |s| {
        let params = upload_params(s, &req)?;
        // Only multi-chunk uploads pin per-chunk state; a single chunk counts as a handle.
        let multi = |size| chunk_count(size, chunk_size_for(size, s.base_chunk_size)) > 1;
        let uploads = s.handles.lock().unwrap().map.values().filter(|h| matches!(h, Handle::Write(u) if u.count > 1)).count();
        if multi(req.size) && uploads >= MAX_UPLOADS_PER_CONNECTION {
            return Err(Failure::new(ErrorCode::LimitExceeded, format!("more than {MAX_UPLOADS_PER_CONNECTION} uploads open on one connection")));
        }
        let slot = handle_slot(s, FDS_PER_UPLOAD)?;
        // Every limit before any state exists: a refused OPEN leaves nothing behind.
        let max = s.server.config.max_handles;
        if s.handles.lock().unwrap().map.len() >= max {
            return Err(Failure::new(ErrorCode::LimitExceeded, format!("more than {max} open handles")));
        }
        let upload = s.server.uploads.open(&params)?;
        let reply = msg::OpenResponse {
            handle: 0,
            size: req.size,
            mtime_ns: req.mtime_ns,
            identity: String::new(),
            chunk_size: upload.chunk_size,
            chunk_count: upload.count,
            blake3: Vec::new(),
            upload_id: upload.id.clone(),
            bitmap: upload.bitmap(),
            mode: 0,
        };
        let done = present_bytes(&reply.bitmap, req.size, upload.chunk_size);
        let tracked = track(s, Direction::Upload, &req.path, req.size, done);
        let id = s.handles.lock().unwrap().insert(Handle::Write(upload), s.server.config.max_handles, tracked, slot)?;
        tracing::info!(path = ?req.path, handle = id, upload = %reply.upload_id, "opened for write");
        encoded(msg::OpenResponse { handle: id, ..reply })
    })
    .await
}

/// PUT: a whole single-chunk file in one request (PutRequest, then its DATA frame, whose CRC32
/// the codec already checked): the checks of OPEN WRITE, then write and COMMIT, on one blocking
/// thread, with no handle.
/// `_held` is the connection's inbound budget for `data`, given back when this ends.
pub async fn put(
    session: Arc<Session>,
    mut req: msg::PutRequest,
    data: Frame,
    st: StreamTx,
    _held: Received,
) {
    let _timer = session.server.metrics.request(st.cmd);
    // Refused before any work on the data: a read-only credential gets no decompression.
    if let Err(e) = session.require_write() {
        return st.fail(e).await;
    }
    // A PUT is one chunk at most: never more than the base chunk size to decompress.
    let room =
        u32::try_from(req.size).map_or(session.base_chunk_size, |n| n.min(session.base_chunk_size));
    let data = match unpacked(&session, data, room).await {
        Ok(d) => d,
        Err(e) => return st.fail(e).await,
    };
    let written = blocking(&session, move |s| {
        let blake3 = std::mem::take(&mut req.blake3);
        let open = msg::OpenRequest {
            path: req.path.clone(),
            mode: msg::OpenMode::OpenWrite as i32,
            size: req.size,
            no_clobber: req.no_clobber,
            mode_bits: req.mode_bits,
            mtime_ns: req.mtime_ns,
            ..Default::default()
        };
        let params = upload_params(s, &open)?;
        if data.payload.len() as u64 != req.size {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("PUT of {} bytes carries {}", req.size, data.payload.len()),
            ));
        }
        if chunk_count(req.size, chunk_size_for(req.size, s.base_chunk_size)) > 1 {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "PUT takes a file of at most one chunk; use OPEN WRITE",
            ));
        }
        let upload = s.server.uploads.open(&params)?;
        if req.size > 0 {
            upload.write_chunk(0, &data.payload, data.header.checksum)?;
        }
        upload.seal(&blake3)?;
        Ok(upload)
    })
    .await;
    let result = match written {
        Ok(upload) => publish_upload(&session, upload).await,
        Err(e) => Err(e),
    };
    match result {
        Ok((size, identity)) => {
            tracing::info!(size, "put committed");
            st.reply(&msg::CommitResponse { size, identity }).await
        }
        Err(e) => st.fail(e).await,
    }
}

pub async fn manifest(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::ManifestRequest::decode(payload)?;
    let handle = get(session, req.handle)?;
    let total = match &handle {
        Handle::Read { manifest, .. } => manifest.crcs.len() as u32,
        Handle::Write(u) => u.count,
    };
    let page = match req.cvs {
        true => MANIFEST_CVS_PAGE,
        false => MANIFEST_PAGE,
    };
    let count = match req.count {
        0 => page,
        n => n.min(page),
    };
    let first = req.first_chunk.min(total);
    let end = first.saturating_add(count).min(total);
    // Only the page is copied: a whole manifest per request would let a client multiply it.
    let page = first as usize..end as usize;
    let (crc32, cvs) = match handle {
        Handle::Read { manifest, .. } => (
            manifest.crcs[page.clone()].to_vec(),
            match req.cvs {
                true => manifest.cvs[page].concat(),
                false => Vec::new(),
            },
        ),
        // An upload's chaining values are its own business (SEED compares them itself).
        Handle::Write(u) => (
            blocking(session, move |_| Ok(u.crcs(first, end - first)?)).await?,
            Vec::new(),
        ),
    };
    encoded(msg::ManifestResponse {
        first_chunk: first,
        crc32,
        cvs,
    })
}

/// Answers a READ with one DATA frame per chunk, sent by the writer from the open fd. Each
/// chunk waits its turn in the writer queue, so streams interleave chunk by chunk. When the
/// client asked for compression, chunks that the handle's probe picks are read, compressed and
/// sent from memory instead.
pub async fn read(session: &Arc<Session>, payload: Bytes, st: StreamTx) {
    let (file, manifest, probe, req) = match prepare_read(session, payload).await {
        Ok(x) => x,
        Err(e) => return st.fail(e).await,
    };
    let level = req.compress_level.min(session.compress_level);
    let progress = progress(session, req.handle);
    let last = req.first_chunk + req.count - 1;
    for i in req.first_chunk..=last {
        if st.cancel.is_cancelled() {
            return st
                .fail(Failure::new(ErrorCode::Cancelled, "cancelled"))
                .await;
        }
        let len = chunk_len(manifest.size, manifest.chunk_size, i);
        let header = Header::data(
            st.cmd,
            st.stream_id,
            len,
            manifest.crcs[i as usize],
            i == last,
        );
        let offset = i as u64 * manifest.chunk_size as u64;
        let item = match level {
            0 => Outgoing::File {
                header,
                file: file.clone(),
                offset,
                copy: session.copy_share(len).await,
            },
            _ => {
                let key = ChunkKey {
                    identity: &manifest.identity,
                    chunk_size: manifest.chunk_size,
                    level,
                    index: i,
                };
                let cache = !manifest.racy;
                match packed_chunk(session, &file, offset, header, key, cache, &probe).await {
                    Ok(item) => item,
                    Err(e) => return st.fail(e).await,
                }
            }
        };
        if i == last {
            // finish() cannot tell whether the connection is gone: count the chunk as queued.
            if let Some(p) = &progress {
                p.add(len as u64);
            }
            return st.finish(item).await;
        }
        if !st.send(item).await {
            return;
        }
        if let Some(p) = &progress {
            p.add(len as u64);
        }
    }
}

thread_local! {
    /// The chunk a blocking thread reads to compress, kept between chunks: a fresh chunk-sized
    /// buffer, zeroed, for each cost a few % of fsd's CPU serving compressed (memset and page
    /// faults in perf). One per blocking thread (--max-blocking-threads), freed when it ends.
    static CHUNK_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One chunk of a READ that asked for compression at `key.level`: from the compressed-chunk
/// cache (unless `use_cache` is false: a version too recent to be known by its timestamps,
/// whose key may stand for other bytes in a moment), else read and compressed if the probe
/// says to try. The COMPRESSED frame if that
/// pays, else the chunk as it is, by sendfile (a chunk read to compress is not kept: the
/// copy in the page cache serves it without one). A compressed chunk is held in the
/// connection's reply budget until written.
async fn packed_chunk(
    session: &Arc<Session>,
    file: &Arc<File>,
    offset: u64,
    header: Header,
    key: ChunkKey<'_>,
    use_cache: bool,
    probe: &Arc<Probe>,
) -> Result<Outgoing, Failure> {
    let len = header.payload_len;
    let mut held = session.reserve_reply(len).await;
    let (f, p, s) = (file.clone(), probe.clone(), session.clone());
    let (identity, chunk_size, level, index) = (
        key.identity.to_string(),
        key.chunk_size,
        key.level,
        key.index,
    );
    let slot = session.account.blocking_slot().await;
    let (mut header, payload) = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let key = ChunkKey {
            identity: &identity,
            chunk_size,
            level,
            index,
        };
        let cache = &s.server.zchunks;
        let compressed = |z: Bytes| {
            // Shorter than the chunk, whose length is a u32: compress() sends nothing longer.
            let len = u32::try_from(z.len()).expect("a compressed chunk is shorter than the chunk");
            let mut h = Header::data(
                header.cmd,
                header.stream_id,
                len,
                crc32fast::hash(&z),
                header.is_end(),
            );
            h.flags |= flags::COMPRESSED;
            (h, Some(z))
        };
        // A cached result is what a try would have given: the probe learns from it too.
        match use_cache.then(|| cache.get(&key)).flatten() {
            Some(Cached::Packed(z)) => {
                p.record(true);
                return Ok(compressed(z));
            }
            Some(Cached::Raw) => {
                p.record(false);
                return Ok((header, None));
            }
            None if !p.should_try() => return Ok((header, None)),
            None => {}
        }
        let packed = CHUNK_BUF.with_borrow_mut(|data| {
            // Grown (and zeroed) only past the longest chunk this thread read so far.
            data.resize(usize::try_from(len).expect("a chunk fits in memory"), 0);
            let n = read_up_to(&f, data, offset)?;
            // Shrunk since the manifest, or rewritten in place with its size and mtime kept
            // (rsync --inplace -t): bytes that are not the manifest's are neither compressed
            // under its CRC32 nor cached under this version's key; they go raw, as without
            // compression, and the client finds the CRC32 wrong (the zero-padded send of
            // Outgoing::File reports a shrunk file).
            let as_manifest = n == data.len() && crc32fast::hash(data) == header.checksum;
            Ok::<_, std::io::Error>(
                as_manifest.then(|| compress::compress(data, header.checksum, level)),
            )
        })?;
        let Some(packed) = packed else {
            return Ok::<_, std::io::Error>((header, None));
        };
        p.record(packed.is_some());
        if use_cache {
            cache.put(&key, packed.as_deref());
        }
        Ok(match packed {
            Some(z) => compressed(z),
            None => (header, None),
        })
    })
    .await
    .map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?
    .map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?;
    let Some(payload) = payload else {
        drop(held);
        return Ok(Outgoing::File {
            header,
            file: file.clone(),
            offset,
            copy: session.copy_share(header.payload_len).await,
        });
    };
    header.payload_len = u32::try_from(payload.len()).expect("at most one chunk");
    session
        .server
        .stats
        .bytes_copied
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    let frame = Frame { header, payload };
    // A chunk over the budget (reserve_reply caps it) keeps the whole budget until written:
    // one such frame at a time per connection, however many READs ask for them.
    let held = match held.split(frame.payload.len()) {
        Some(part) => part,
        None => held,
    };
    Ok(Outgoing::Held(frame, held))
}

/// A read's file, manifest and probe, checked against the request and the file's state.
type Readable = (Arc<File>, Arc<Manifest>, Arc<Probe>, msg::ReadRequest);

async fn prepare_read(session: &Arc<Session>, payload: Bytes) -> Result<Readable, Failure> {
    let req = msg::ReadRequest::decode(payload)?;
    let Handle::Read {
        file,
        manifest,
        probe,
    } = get(session, req.handle)?
    else {
        return Err(Failure::new(ErrorCode::BadHandle, "READ on a write handle"));
    };
    let n = manifest.crcs.len() as u32;
    if req.count == 0
        || req.count > MAX_READ_CHUNKS
        || req
            .first_chunk
            .checked_add(req.count)
            .is_none_or(|end| end > n)
    {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "chunks {}+{} outside 0..{n} or over {MAX_READ_CHUNKS}",
                req.first_chunk, req.count
            ),
        ));
    }
    // Content changed in place since the manifest was made: say so rather than send chunks
    // whose checksums cannot match.
    let meta = file
        .metadata()
        .map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?;
    let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    if meta.size() != manifest.size || mtime_ns != manifest.mtime_ns {
        return Err(Failure::new(
            ErrorCode::Changed,
            "file changed since it was opened",
        ));
    }
    Ok((file, manifest, probe, req))
}

/// Stores one uploaded chunk (already CRC-checked by the codec) and acknowledges it.
/// `_held` is the connection's inbound budget for `data`, given back when this ends.
/// The upload a WRITE whose DATA frame was just accepted goes to, with the WRITE counted as
/// being stored from now (docs/PROTOCOL.md §10.2 "Life cycle"). Called by the connection before
/// it spawns [`write`], so that a COMMIT read after this DATA frame finds the WRITE.
pub fn begin_write(
    session: &Session,
    req: &msg::WriteRequest,
) -> Result<(Arc<Upload>, Writing), Failure> {
    let Handle::Write(upload) = get(session, req.handle)? else {
        return Err(Failure::new(ErrorCode::BadHandle, "WRITE on a read handle"));
    };
    let writing = upload.begin_write()?;
    Ok((upload, writing))
}

pub async fn write(
    session: Arc<Session>,
    req: msg::WriteRequest,
    data: Frame,
    st: StreamTx,
    begun: Result<(Arc<Upload>, Writing), Failure>,
    _held: Received,
) {
    let _timer = session.server.metrics.request(st.cmd);
    let result = async {
        let (upload, writing) = begun?;
        let data = unpacked(&session, data, chunk_room(&session, &req)).await?;
        let crc = data.header.checksum;
        let len = data.payload.len() as u64;
        let up = upload.clone();
        let slot = session.account.blocking_slot().await;
        let pool = session.server.payloads.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let written = up.write_counted(writing, req.chunk, &data.payload, crc);
            pool.give_back(data.payload);
            written
        })
        .await??;
        if written.start_sync {
            tokio::task::spawn_blocking(move || upload.background_sync());
        }
        if let Some(p) = progress(&session, req.handle) {
            p.add(len);
        }
        Ok(msg::WriteAck {
            chunk: req.chunk,
            durable: written.durable,
        })
    }
    .await;
    match result {
        Ok(ack) => st.reply(&ack).await,
        Err(e) => st.fail(e).await,
    }
}

/// The decompressed size of the chunk a WRITE names (0 if its handle or chunk is not one): what
/// a COMPRESSED DATA frame for it may expand to, and takes from the inbound budget.
pub fn chunk_room(session: &Session, req: &msg::WriteRequest) -> u32 {
    match session.handles.lock().unwrap().map.get(&req.handle) {
        Some(Handle::Write(u)) if req.chunk < chunk_count(u.params.size, u.chunk_size) => {
            chunk_len(u.params.size, u.chunk_size, req.chunk)
        }
        _ => 0,
    }
}

/// A WRITE's or PUT's DATA frame as the chunk it carries. A COMPRESSED one is decompressed on a
/// blocking thread into at most `room` bytes, which it must fill exactly, and its CRC32 checked;
/// the result looks as if it had come uncompressed (the header's checksum is the chunk's CRC32).
async fn unpacked(session: &Session, data: Frame, room: u32) -> Result<Frame, Failure> {
    if !data.header.is_compressed() {
        return Ok(data);
    }
    if session.compress_level == 0 {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            "COMPRESSED DATA on a connection whose Hello agreed on no compression",
        ));
    }
    let mut header = data.header;
    let slot = session.account.blocking_slot().await;
    let (chunk, crc) = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        compress::decompress(
            &data.payload,
            usize::try_from(room).expect("a u32 fits usize"),
        )
    })
    .await
    .map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?
    // Damaged in transit, or sent for another chunk: retryable, like a bad CRC32.
    .map_err(|e| Failure::new(ErrorCode::ChecksumMismatch, e.to_string()))?;
    header.flags &= !flags::COMPRESSED;
    header.payload_len = u32::try_from(chunk.len()).expect("at most `room` bytes");
    header.checksum = crc;
    Ok(Frame {
        header,
        payload: chunk,
    })
}

pub async fn commit(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::CommitRequest::decode(payload)?;
    if req.handle == 0 && !req.upload_id.is_empty() {
        return commit_by_id(session, req).await;
    }
    let Handle::Write(upload) = get(session, req.handle)? else {
        return Err(Failure::new(
            ErrorCode::BadHandle,
            "COMMIT on a read handle",
        ));
    };
    let (size, identity) = commit_upload(session, upload, req.blake3).await?;
    session.handles.lock().unwrap().remove(req.handle);
    tracing::info!(handle = req.handle, size, "upload committed");
    encoded(msg::CommitResponse { size, identity })
}

/// COMMIT by upload id: the answer to a COMMIT whose reply was lost, from the commit record
/// (fs::upload::UploadStore::committed), on whichever node the client reached.
async fn commit_by_id(session: &Arc<Session>, req: msg::CommitRequest) -> Result<Bytes, Failure> {
    blocking(session, move |s| {
        s.require_write()?;
        let done = s.server.uploads.committed(
            &req.upload_id,
            &s.cred.name,
            &req.blake3,
            s.root(),
            &s.server.ids,
        );
        let Some((size, identity)) = done else {
            return Err(Failure::new(
                ErrorCode::NotFound,
                "no upload committed with that id and hash",
            ));
        };
        encoded(msg::CommitResponse { size, identity })
    })
    .await
}

/// Verifies and publishes an upload (COMMIT, PUT). An anonymous upload's two syncs are shared
/// with concurrent commits and awaited here, holding no thread (fsd::durable).
async fn commit_upload(
    session: &Arc<Session>,
    upload: Arc<Upload>,
    blake3: Vec<u8>,
) -> Result<(u64, String), Failure> {
    let u = upload.clone();
    blocking(session, move |_| Ok(u.seal(&blake3)?)).await?;
    publish_upload(session, upload).await
}

/// The rest of a commit after [`Upload::seal`]: durable, named, durable name.
async fn publish_upload(
    session: &Arc<Session>,
    upload: Arc<Upload>,
) -> Result<(u64, String), Failure> {
    let group = upload.group().cloned();
    let synced = |e: std::io::Error| Failure::new(ErrorCode::Io, format!("sync: {e}"));
    if let Some(g) = &group {
        if let Err(e) = g.sync_all().await {
            upload.unseal();
            return Err(synced(e));
        }
    }
    let done = blocking(session, move |s| {
        Ok(upload.publish(s.root(), &s.server.ids)?)
    })
    .await?;
    if let Some(g) = &group {
        g.sync_all().await.map_err(synced)?;
    }
    session
        .server
        .stats
        .uploads_committed
        .fetch_add(1, Ordering::Relaxed);
    Ok(done)
}

pub async fn close(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::CloseRequest::decode(payload)?;
    let h = session.handles.lock().unwrap().remove(req.handle);
    if h.is_none() {
        return Err(Failure::new(
            ErrorCode::BadHandle,
            format!("no handle {}", req.handle),
        ));
    }
    // Dropping the last reference to an upload syncs it off the reactor.
    if let Some(Handle::Write(u)) = h {
        tokio::task::spawn_blocking(move || drop(u));
    }
    encoded(msg::Ok {})
}
