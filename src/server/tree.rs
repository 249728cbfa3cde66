//! Tree streams: TREE_READ and TREE_WRITE (docs/PROTOCOL.md §6.8), many small files per
//! request and per blocking hop.
//!
//! A tree of small files costs per-file overhead, not bytes: with OPEN/PUT each file is a
//! request, a task, a blocking-pool hop and a wakeup or two. Here one request names up to
//! [`MAX_TREE_FILES`] files, one blocking hop reads (or stages) as many as fill a frame, and an
//! upload's files share two group syncs. Every path still goes through `Session::path` (prefix,
//! lexical checks) and `Root` (openat2 confinement); every uploaded file still goes through the
//! checks and the publish of a PUT (`transfer::upload_plan`, `UploadStore::open`, seal,
//! group sync, link, group sync), so nothing is published before its data is durable. Only
//! PUT's early look at the destination is left out: the publish makes the same refusals.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::connection::{Failure, Received, Session, StreamTx};
use super::files::blocking;
use super::transfer::{self, upload_plan};
use super::writer::Outgoing;
use crate::fs::upload::Upload;
use crate::protocol::tree::{
    push, record_len, Records, MAX_ENTRY_LEN, MAX_ENTRY_MESSAGE, MAX_FAILURE_MESSAGE,
    MAX_TREE_FILES, TREE_FRAME,
};
use crate::protocol::{
    chunk_count, chunk_size_for, flags, msg, ErrorCode, Frame, MAX_INLINE, MAX_PATH_LEN,
};

/// `dir/name`, or `name` when `dir` is the root.
fn join(dir: &str, name: &str) -> String {
    match dir {
        "" | "." => name.to_string(),
        dir => format!("{dir}/{name}"),
    }
}

fn bad(message: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::BadRequest, message)
}

/// TREE_READ: the named files in order, as records in DATA frames of at most
/// min([`TREE_FRAME`], the client's max_frame) bytes. Each frame is filled by one blocking hop
/// and built only within the connection's reply budget, so a client that stops reading holds
/// at most that budget.
pub async fn read(session: &Arc<Session>, payload: Bytes, st: StreamTx) {
    let req = match msg::TreeReadRequest::decode(payload) {
        Ok(r) => r,
        Err(e) => return st.fail(e.into()).await,
    };
    if req.files.len() > MAX_TREE_FILES {
        let e = bad(format!(
            "{} files named; at most {MAX_TREE_FILES}",
            req.files.len()
        ));
        return st.fail(e).await;
    }
    // Each entry carries its name: a name longer than any path could not be answered within
    // MAX_ENTRY_LEN (nor, past the frame size, at all), so the request is refused whole.
    if let Some((i, name)) = req
        .files
        .iter()
        .enumerate()
        .find(|(_, n)| n.len() > MAX_PATH_LEN)
    {
        let e = bad(format!(
            "name {i} is {} bytes; at most {MAX_PATH_LEN}",
            name.len()
        ));
        return st.fail(e).await;
    }
    let Ok(want) = msg::TreeWant::try_from(req.want) else {
        return st.fail(bad(format!("unknown want {}", req.want))).await;
    };
    // The directory itself must be the client's to read, whatever the names say.
    if let Err(e) = session.path(&req.path) {
        return st.fail(e).await;
    }
    let frame_max = TREE_FRAME.min(session.client_max_frame);
    let inline = match req.inline_max {
        0 => MAX_INLINE,
        n => n.min(MAX_INLINE),
    };
    let req = Arc::new(req);
    let mut next = 0;
    loop {
        if st.cancel.is_cancelled() {
            return st
                .fail(Failure::new(ErrorCode::Cancelled, "cancelled"))
                .await;
        }
        let mut held = session.reserve_reply(frame_max).await;
        let r = req.clone();
        let filled = blocking(session, move |s| {
            fill(s, &r, next, frame_max as usize, inline, want)
        })
        .await;
        let (buf, n) = match filled {
            Ok(x) => x,
            Err(e) => return st.fail(e).await,
        };
        next = n;
        let last = next >= req.files.len();
        let fl = flags::DATA | if last { flags::END } else { 0 };
        let len = buf.len();
        session
            .server
            .stats
            .bytes_copied
            .fetch_add(len as u64, Ordering::Relaxed);
        let frame = Frame::new(st.cmd, st.stream_id, fl, Bytes::from(buf));
        let item = match held.split(len) {
            Some(h) => Outgoing::Held(frame, h),
            None => Outgoing::Frame(frame),
        };
        drop(held);
        if last {
            tracing::info!(dir = ?req.path, files = req.files.len(), "tree read");
            return st.finish(item).await;
        }
        if !st.send(item).await {
            return;
        }
    }
}

/// Records for `req.files[next..]` until the frame is full. Returns the frame and the index of
/// the first file left for the next one. Every frame makes progress: contents go inline only if
/// they fit an empty frame, and entries are bounded (names by `read`, messages here) far below
/// the smallest max_frame; a record that still fits no frame fails the stream, since an empty
/// frame would only be followed by another. Blocking.
fn fill(
    s: &Session,
    req: &msg::TreeReadRequest,
    mut next: usize,
    frame_max: usize,
    inline: u32,
    want: msg::TreeWant,
) -> Result<(Vec<u8>, usize), Failure> {
    let mut buf = Vec::new();
    while let Some(name) = req.files.get(next) {
        let room = frame_max - buf.len();
        let Some((entry, data)) = record(s, &req.path, name, inline, want, frame_max, room) else {
            if buf.is_empty() {
                return Err(Failure::new(
                    ErrorCode::Internal,
                    format!("file {next}'s record does not fit a {frame_max}-byte frame"),
                ));
            }
            break;
        };
        debug_assert!(entry.encoded_len() <= MAX_ENTRY_LEN as usize);
        if buf.is_empty() {
            buf.reserve(frame_max.min(64 * 1024));
        }
        push(&mut buf, &entry, &data);
        next += 1;
    }
    Ok((buf, next))
}

/// One file's record, or None if it needs more than `room` bytes. A file that cannot be read
/// gets an entry with its error; one too big for a frame (or for `inline`) gets its metadata
/// only, and the client fetches it with OPEN and READ.
fn record(
    s: &Session,
    dir: &str,
    name: &str,
    inline: u32,
    want: msg::TreeWant,
    frame_max: usize,
    room: usize,
) -> Option<(msg::TreeEntry, Vec<u8>)> {
    let mut entry = msg::TreeEntry {
        path: name.to_string(),
        ..Default::default()
    };
    // Entries are at most MAX_ENTRY_LEN (names ≤ MAX_PATH_LEN, messages cut to
    // MAX_ENTRY_MESSAGE).
    let overhead = 4 + MAX_ENTRY_LEN as usize;
    let failed = |mut e: Failure| {
        cut(&mut e.message, MAX_ENTRY_MESSAGE);
        Some(e.code.msg(e.message))
    };
    let opened = s
        .path(&join(dir, name))
        .and_then(|p| Ok(s.root().open_read(p)?));
    let (file, meta) = match opened {
        Ok(x) => x,
        Err(e) => {
            entry.error = failed(e);
            return (record_len(&entry, 0) <= room).then_some((entry, Vec::new()));
        }
    };
    entry.size = meta.len();
    entry.mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    entry.mode = meta.mode() & 0o7777;
    let fits = meta.len() <= u64::from(inline.min(s.base_chunk_size))
        && usize::try_from(meta.len()).is_ok_and(|n| n + overhead <= frame_max);
    let with_data = fits && want == msg::TreeWant::TreeContents;
    let need = overhead + if with_data { meta.len() as usize } else { 0 };
    if need > room {
        return None;
    }
    let result = match want {
        msg::TreeWant::TreeMeta => Ok(Vec::new()),
        _ if fits => transfer::read_whole(s, name, &file, &meta).inspect(|d| {
            entry.blake3 = blake3::hash(d).as_bytes().to_vec();
        }),
        msg::TreeWant::TreeHash => {
            // Big files' hashes come from the manifest cache, as OPEN READ's do.
            let cs = chunk_size_for(meta.len(), s.base_chunk_size);
            match s
                .server
                .manifests
                .get(&file, &meta, cs, || s.account.hashing_turn())
            {
                Ok(m) => {
                    entry.blake3 = m.blake3.to_vec();
                    Ok(Vec::new())
                }
                Err(e) => Err(Failure::new(ErrorCode::Io, format!("{name:?}: {e}"))),
            }
        }
        // A big file's contents: its metadata only; the client uses the chunked path.
        msg::TreeWant::TreeContents => Ok(Vec::new()),
    };
    match result {
        Ok(data) => {
            entry.data = with_data;
            Some((entry, if with_data { data } else { Vec::new() }))
        }
        Err(e) => {
            entry.blake3.clear();
            entry.error = failed(e);
            Some((entry, Vec::new()))
        }
    }
}

/// TREE_WRITE: the records of one DATA frame, each stored and published as a PUT of it would
/// be, but in three blocking hops and two group syncs for the whole frame. A malformed frame
/// (bad record, wrong count) is refused whole before anything is written; a file that fails
/// its own checks (path, rights, no_clobber, hash) is reported in the reply and the others go
/// on. `_held` is the connection's inbound budget for `data`.
pub async fn write(
    session: Arc<Session>,
    req: msg::TreeWriteRequest,
    data: Frame,
    st: StreamTx,
    _held: Received,
) {
    let _timer = session.server.metrics.request(st.cmd);
    match write_tree(&session, req, data).await {
        Ok(reply) => st.reply(&reply).await,
        Err(e) => st.fail(e).await,
    }
}

async fn write_tree(
    session: &Arc<Session>,
    req: msg::TreeWriteRequest,
    data: Frame,
) -> Result<msg::TreeWriteResponse, Failure> {
    session.require_write()?;
    if data.header.is_compressed() {
        return Err(bad("TREE_WRITE frames are never compressed"));
    }
    let count = usize::try_from(req.count).unwrap_or(usize::MAX);
    if count == 0 || count > MAX_TREE_FILES {
        return Err(bad(format!(
            "{} records; 1 to {MAX_TREE_FILES} per TREE_WRITE",
            req.count
        )));
    }
    // One handle of the credential's quota, and a descriptor per staged file from its share
    // and the server's budget, until every file is published.
    let fds = u32::try_from(count + 1).expect("count ≤ MAX_TREE_FILES");
    let _slot = session.account.open_handle(&session.server.fds, fds)?;
    let records = Records::new(data.payload)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("TREE_WRITE frame: {e}")))?;
    if records.len() != count {
        return Err(bad(format!(
            "TREE_WRITE announced {count} records, its frame holds {}",
            records.len()
        )));
    }
    let dir = req.path.clone();
    let no_clobber = req.no_clobber;
    let staged = blocking(session, move |s| {
        Ok(records
            .into_iter()
            .map(|(entry, data)| stage(s, &dir, no_clobber, entry, &data))
            .collect::<Vec<_>>())
    })
    .await?;
    let group = staged
        .iter()
        .find_map(|u| u.as_ref().ok().and_then(|u| u.group().cloned()));
    let synced = |e: std::io::Error| Failure::new(ErrorCode::Io, format!("sync: {e}"));
    // Data durable before any name points at it.
    let mut staged = staged;
    let n = staged.len();
    if let Some(g) = &group {
        if let Err(e) = g.sync_for(n).await {
            let e = synced(e);
            staged = staged
                .into_iter()
                .map(|r| {
                    if let Ok(u) = &r {
                        u.unseal();
                    }
                    r.and(Err(Failure::new(e.code, e.message.clone())))
                })
                .collect();
        }
    }
    let mut results = blocking(session, move |s| {
        Ok(staged
            .into_iter()
            .map(|r| r.and_then(|u| Ok(u.publish(s.root(), &s.server.ids)?)))
            .collect::<Vec<_>>())
    })
    .await?;
    // The names durable before the client hears they are there.
    if let Some(g) = &group {
        if let Err(e) = g.sync_for(n).await {
            let e = synced(e);
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(Failure::new(e.code, e.message.clone()));
            }
        }
    }
    let mut reply = msg::TreeWriteResponse::default();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(_) => reply.published += 1,
            Err(mut e) => {
                cut(&mut e.message, MAX_FAILURE_MESSAGE);
                reply.failed.push(msg::TreeFailure {
                    index: u32::try_from(i).expect("count ≤ MAX_TREE_FILES"),
                    error: Some(e.code.msg(e.message)),
                });
            }
        }
    }
    session
        .server
        .stats
        .uploads_committed
        .fetch_add(u64::from(reply.published), Ordering::Relaxed);
    tracing::info!(
        dir = ?req.path,
        published = reply.published,
        failed = reply.failed.len(),
        "tree written"
    );
    Ok(reply)
}

/// One record's file written and sealed (verified, mode and mtime set), not yet published: the
/// checks and steps of a PUT. Blocking.
fn stage(
    s: &Session,
    dir: &str,
    no_clobber: bool,
    entry: msg::TreeEntry,
    data: &[u8],
) -> Result<Arc<Upload>, Failure> {
    let open = msg::OpenRequest {
        path: join(dir, &entry.path),
        mode: msg::OpenMode::OpenWrite as i32,
        size: entry.size,
        no_clobber,
        mode_bits: entry.mode,
        mtime_ns: entry.mtime_ns,
        ..Default::default()
    };
    // Without PUT's early look at the destination (a parent that is not a directory, a
    // directory at the name, a taken name with no_clobber): the data is here already, and
    // the publish refuses the same; three lookups per file saved.
    let params = upload_plan(s, &open)?;
    if !entry.data || data.len() as u64 != entry.size {
        return Err(bad("a TREE_WRITE record must carry its whole contents"));
    }
    if chunk_count(entry.size, chunk_size_for(entry.size, s.base_chunk_size)) > 1 {
        return Err(bad("TREE_WRITE takes files of at most one chunk"));
    }
    let upload = s.server.uploads.open(&params)?;
    if !data.is_empty() {
        upload.write_chunk(0, data, crc32fast::hash(data))?;
    }
    upload.seal(&entry.blake3)?;
    Ok(upload)
}

/// Cuts `s` to at most `max` bytes at a char boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
