//! Small files of a `-r` transfer in batches: one TREE_READ or TREE_WRITE request per batch
//! (docs/PROTOCOL.md §6.8) instead of an OPEN or PUT per file, and the local file-system work
//! of a whole frame in one blocking hop.
//!
//! A tree of small files costs per-file overhead, not bytes. `tree.rs` still walks both sides
//! and plans; it hands the small files whose verdict is "copy" here. Anything a batch cannot
//! finish — the server sent a file's metadata but not its contents (too big now, changed, an
//! error), a hash that does not match, a request that failed — goes to the per-file path
//! (`download_file` / `upload_file`), which has the retries, resume and error reporting. So
//! a batch is only ever a faster way to do what the per-file path would do.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;
use fsd::durable::GroupSync;
use fsd::protocol::tree::{push, record_len, Records, MAX_ENTRY_LEN, MAX_TREE_FILES, TREE_FRAME};
use fsd::protocol::{flags, msg, Cmd, MAX_INLINE};

use crate::check::Outcome;
use crate::client::{Client, Slots, Transfer};
use crate::error::{Error, Result};
use crate::local::sink::{spawn_blocking, Out};
use crate::local::{new_mode, publish, set_meta, LocalDir, Work};
use crate::progress::Event;
use crate::sync::Verdict;
use crate::upload::{SourcePath, UploadOptions};
use crate::walk::{rel_split, remote_join};

/// Largest file sent in a batch: what fits inline (and one chunk, checked per connection).
pub(crate) const BATCH_MAX_FILE: u64 = MAX_INLINE as u64;
/// A download batch: at most this many files, and this many bytes of them (several frames).
const DOWN_FILES: usize = 512;
const DOWN_BYTES: u64 = 4 * TREE_FRAME as u64;
/// Bytes of names in one TREE_READ: well inside the 256 KiB control frame.
const DOWN_NAME_BYTES: usize = 128 * 1024;
/// An upload batch is one DATA frame: records up to this many bytes.
const UP_BYTES: usize = TREE_FRAME as usize;
/// Batches in flight at once: enough that one's disk work overlaps another's network time.
pub(crate) const BATCHES_IN_FLIGHT: usize = 4;
/// Descriptors left to everything but batches (connections, big files' parts, the walk).
const RESERVED_FDS: usize = 128;

/// Files in one batch: at most `most`, and few enough that [`BATCHES_IN_FLIGHT`] batches hold
/// at most half the descriptors the open-file limit leaves beyond [`RESERVED_FDS`]: a download
/// batch keeps each file open until its group sync. 512 files × 4 batches under a limit of
/// 256 failed 1,290 of 8,000 files with "Too many open files" (review D, stop 30).
fn files_per_batch(most: usize) -> usize {
    let spare = fsd::nofile::limit().saturating_sub(RESERVED_FDS) / 2;
    (spare / BATCHES_IN_FLIGHT).clamp(1, most)
}

/// One file of a batch: its path relative to the tree's top and its planned size.
pub(crate) type Small = (String, u64);

/// Splits `files` into batches of at most `max_files` files, `max_bytes` bytes of contents
/// (plus record overhead) and `max_names` bytes of names.
fn batches(
    files: Vec<Small>,
    max_files: usize,
    max_bytes: u64,
    max_names: usize,
) -> Vec<Vec<Small>> {
    let mut out: Vec<Vec<Small>> = Vec::new();
    let (mut bytes, mut names) = (0u64, 0usize);
    for f in files {
        let cost = f.1 + 64 + f.0.len() as u64;
        let full = out.last().is_none_or(|b| {
            b.len() >= max_files || bytes + cost > max_bytes || names + f.0.len() + 8 > max_names
        });
        if full {
            out.push(Vec::new());
            (bytes, names) = (0, 0);
        }
        bytes += cost;
        names += f.0.len() + 8;
        out.last_mut().expect("pushed above").push(f);
    }
    out
}

/// Where a download batch writes: the destination tree, its working directory's name, the
/// group sync its files share, and how modes are given.
pub(crate) struct DownTarget {
    pub root: LocalDir,
    pub work_name: Arc<str>,
    pub group: Arc<GroupSync>,
    pub preserve: bool,
}

/// A file of a frame written to an anonymous inode, waiting for its group sync and its name.
struct Staged {
    file: std::fs::File,
    dir: LocalDir,
    rel: String,
    size: u64,
    blake3: [u8; 32],
}

/// What one frame's records became.
#[derive(Default)]
struct FrameResult {
    staged: Vec<Staged>,
    /// Files for the per-file path, by index in the batch.
    leftover: Vec<usize>,
}

type Results = Vec<(String, Result<Outcome>)>;

impl Client {
    /// Whether tree transfers can use batches: the server offers TREE_READ/TREE_WRITE.
    async fn batches_offered(&self) -> bool {
        match self.conn(self.pick_slot()).await {
            Ok(c) => c.has_tree(),
            Err(_) => false,
        }
    }

    /// Takes out of a plan's files the small ones to copy in batches: files of at most
    /// [`BATCH_MAX_FILE`] bytes whose verdict (after `adjust`) is to copy them, on a real run
    /// against a server that offers batches. The rest keep their place and verdict.
    pub(crate) async fn split_small(
        &self,
        files: Vec<(String, u64, Verdict)>,
        dry_run: bool,
        adjust: impl Fn(Verdict) -> Verdict,
    ) -> (Vec<Small>, Vec<(String, u64, Verdict)>) {
        if dry_run || files.is_empty() || !self.batches_offered().await {
            return (Vec::new(), files);
        }
        let mut small = Vec::new();
        let rest = files
            .into_iter()
            .filter_map(|(rel, size, v)| match adjust(v) {
                Verdict::New | Verdict::Changed(_) if size <= BATCH_MAX_FILE => {
                    small.push((rel, size));
                    None
                }
                _ => Some((rel, size, v)),
            })
            .collect();
        (small, rest)
    }

    /// Downloads the small files `files` of the remote directory `remote` into `t`, in
    /// batches, [`BATCHES_IN_FLIGHT`] at a time. One result per file.
    pub(crate) fn download_small(
        &self,
        remote: &str,
        t: &DownTarget,
        files: Vec<Small>,
    ) -> impl futures::Stream<Item = (String, Result<Outcome>)> + '_ {
        use futures::StreamExt;
        let t = Arc::new(DownTarget {
            root: t.root.clone(),
            work_name: t.work_name.clone(),
            group: t.group.clone(),
            preserve: t.preserve,
        });
        let remote = remote.to_string();
        let per_batch = files_per_batch(DOWN_FILES);
        futures::stream::iter(batches(files, per_batch, DOWN_BYTES, DOWN_NAME_BYTES))
            .map(move |b| {
                let (t, remote) = (t.clone(), remote.clone());
                async move { self.download_batch(&remote, &t, b).await }
            })
            .buffer_unordered(BATCHES_IN_FLIGHT)
            .flat_map(futures::stream::iter)
    }

    async fn download_batch(
        &self,
        remote: &str,
        t: &Arc<DownTarget>,
        files: Vec<Small>,
    ) -> Results {
        let mut done: Results = Vec::with_capacity(files.len());
        let mut left = vec![true; files.len()];
        if let Err(e) = self
            .fetch_batch(remote, t, &files, &mut done, &mut left)
            .await
        {
            tracing::debug!(error = %e, "tree read failed; per file from here");
        }
        for (rel, _) in files
            .into_iter()
            .zip(left)
            .filter_map(|(f, l)| l.then_some(f))
        {
            let rpath = remote_join(remote, &rel);
            let (dir_rel, name) = rel_split(&rel);
            let dir = match t.root.walk(dir_rel) {
                Ok(d) => d,
                Err(e) => {
                    let e = Error::io(t.root.display(dir_rel), e);
                    self.emit(Event::Error {
                        path: rpath.clone(),
                        code: e.exit_code(),
                        message: e.message_for(&rpath),
                    });
                    done.push((rpath, Err(e)));
                    continue;
                }
            };
            let out = Out::File {
                work: Work::new(t.root.clone(), t.work_name.clone(), &rel),
                dir,
                name: name.to_string(),
                group: Some(t.group.clone()),
            };
            let r = self
                .download_file(&rpath, out, Slots::One(self.pick_slot()))
                .await;
            done.push((rpath, r.map(Outcome::Sent)));
        }
        done
    }

    /// One TREE_READ for `files`: each frame's files written in one blocking hop, made durable
    /// by one group sync, named in one more hop. Files done are pushed to `done` and cleared
    /// in `left`; an error stops the batch (the rest go per file).
    async fn fetch_batch(
        &self,
        remote: &str,
        t: &Arc<DownTarget>,
        files: &[Small],
        done: &mut Results,
        left: &mut [bool],
    ) -> Result<()> {
        let conn = self.conn(self.pick_slot()).await?;
        let inline_max = files.iter().map(|f| f.1).max().unwrap_or(0);
        let inline_max = u32::try_from(inline_max.min(BATCH_MAX_FILE)).expect("≤ MAX_INLINE");
        let req = msg::TreeReadRequest {
            path: remote.to_string(),
            files: files.iter().map(|f| f.0.clone()).collect(),
            want: msg::TreeWant::TreeContents as i32,
            inline_max,
        };
        let n = files.len();
        let mut s = conn.open().await?;
        // A frame holds at least one record, so at most one frame per file; and no record is
        // bigger than inline_max plus an entry: what a hostile server can make us hold.
        let per_file = u64::from(inline_max) + 4 + u64::from(MAX_ENTRY_LEN);
        s.expect(
            u32::try_from(n).expect("≤ MAX_TREE_FILES"),
            per_file * n as u64,
        );
        s.send_msg(Cmd::TREE_READ, flags::END, &req).await?;
        let mut next = 0;
        loop {
            let f = s.recv_frame(Cmd::TREE_READ).await?;
            if !f.header.is_data() || f.header.is_compressed() {
                return Err(Error::Protocol("TREE_READ reply is not plain DATA".into()));
            }
            let end = f.header.is_end();
            let (t2, names) = (
                t.clone(),
                files[next..].iter().map(|f| f.0.clone()).collect(),
            );
            let written = spawn_blocking(move || write_frame(&t2, f.payload, names)).await?;
            let base = next;
            next += written.consumed;
            let r = written.result;
            left[base..next].fill(false);
            for i in r.leftover {
                left[base + i] = true;
            }
            self.name_staged(remote, t, r.staged, done).await;
            if end {
                break;
            }
            if next >= n {
                return Err(Error::Protocol(
                    "TREE_READ sent more files than asked".into(),
                ));
            }
        }
        if next != n {
            return Err(Error::Protocol(format!(
                "TREE_READ answered {next} of {n} files"
            )));
        }
        Ok(())
    }

    /// Makes `staged` durable (one group sync for all) and gives each its name.
    async fn name_staged(
        &self,
        remote: &str,
        t: &Arc<DownTarget>,
        staged: Vec<Staged>,
        done: &mut Results,
    ) {
        if staged.is_empty() {
            return;
        }
        let synced = t.group.sync_for(staged.len()).await;
        let t2 = t.clone();
        let named = spawn_blocking(move || {
            Ok(staged
                .into_iter()
                .map(|s| {
                    let r = match &synced {
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        Ok(()) => {
                            let (_, name) = rel_split(&s.rel);
                            let work = Work::new(t2.root.clone(), t2.work_name.clone(), &s.rel);
                            publish(&s.file, &s.dir, name, &work)
                        }
                    };
                    (s, r)
                })
                .collect::<Vec<_>>())
        })
        .await;
        let Ok(named) = named else {
            return;
        };
        for (s, r) in named {
            let rpath = remote_join(remote, &s.rel);
            let local = t.root.display(&s.rel);
            match r {
                Ok(()) => {
                    self.emit(Event::Start {
                        path: rpath.clone(),
                        local: local.clone(),
                        size: s.size,
                        resumed: 0,
                    });
                    self.emit(Event::Done {
                        path: rpath.clone(),
                        local,
                        bytes: s.size,
                        transferred: s.size,
                        blake3: hex::encode(s.blake3),
                    });
                    let t = Transfer {
                        path: rpath.clone(),
                        bytes: s.size,
                        transferred: s.size,
                        blake3: s.blake3,
                    };
                    done.push((rpath, Ok(Outcome::Sent(t))));
                }
                Err(e) => {
                    let e = Error::io(local, e);
                    self.emit(Event::Error {
                        path: rpath.clone(),
                        code: e.exit_code(),
                        message: e.message_for(&rpath),
                    });
                    done.push((rpath, Err(e)));
                }
            }
        }
    }
}

struct Written {
    /// Records of the frame (each one of the files asked for, in order).
    consumed: usize,
    result: FrameResult,
}

/// Writes the files of one TREE_READ frame to anonymous inodes beside their destinations,
/// each checked against its BLAKE3, with mode and mtime set. `names`: the files still
/// expected, in order. Blocking.
fn write_frame(t: &DownTarget, frame: Bytes, names: Vec<String>) -> Result<Written> {
    let mut out = FrameResult::default();
    let mut dirs: HashMap<String, Option<LocalDir>> = HashMap::new();
    let mut consumed = 0;
    for record in Records::new(frame) {
        let (entry, data) = record.map_err(|e| Error::Protocol(format!("TREE_READ: {e}")))?;
        let Some(rel) = names.get(consumed) else {
            return Err(Error::Protocol(
                "TREE_READ sent more files than asked".into(),
            ));
        };
        // The server names each file back; a different name is a broken (or hostile) peer.
        if entry.path != *rel {
            return Err(Error::Protocol(format!(
                "TREE_READ answered {:?} for {rel:?}",
                entry.path
            )));
        }
        let i = consumed;
        consumed += 1;
        let hash = blake3::hash(&data);
        if !entry.data || entry.error.is_some() || hash.as_bytes()[..] != entry.blake3[..] {
            out.leftover.push(i);
            continue;
        }
        let (dir_rel, _) = rel_split(rel);
        let dir = dirs
            .entry(dir_rel.to_string())
            .or_insert_with(|| {
                // Anonymous files only where the file system keeps them (else per file).
                t.root
                    .walk(dir_rel)
                    .ok()
                    .filter(|d| d.create_anonymous().is_some())
            })
            .clone();
        let staged = dir.and_then(|dir| {
            let mut file = dir.anonymous().ok()?;
            file.write_all(&data).ok()?;
            let mode = new_mode(entry.mode, t.preserve);
            set_meta(&file, mode, entry.mtime_ns).ok()?;
            if !t.group.covers(&file).ok()? {
                file.sync_all().ok()?;
            }
            Some(Staged {
                file,
                dir,
                rel: rel.clone(),
                size: entry.size,
                blake3: *hash.as_bytes(),
            })
        });
        match staged {
            Some(s) => out.staged.push(s),
            None => out.leftover.push(i),
        }
    }
    if consumed == 0 {
        return Err(Error::Protocol("TREE_READ frame without records".into()));
    }
    Ok(Written {
        consumed,
        result: out,
    })
}

/// A local file read for an upload batch.
struct Read1 {
    index: usize,
    entry: msg::TreeEntry,
    data: Vec<u8>,
}

impl Client {
    /// Uploads the small files `files` of `local` to the remote directory `remote` (which
    /// exists, as do the files' directories), in batches, [`BATCHES_IN_FLIGHT`] at a time.
    pub(crate) fn upload_small<'a>(
        &'a self,
        local: &'a LocalDir,
        remote: &'a str,
        opts: &'a UploadOptions,
        files: Vec<Small>,
    ) -> impl futures::Stream<Item = (String, Result<Outcome>)> + 'a {
        use futures::StreamExt;
        let per_batch = files_per_batch(MAX_TREE_FILES);
        futures::stream::iter(batches(files, per_batch, UP_BYTES as u64, usize::MAX))
            .map(move |b| self.upload_batch(local, remote, opts, b))
            .buffer_unordered(BATCHES_IN_FLIGHT)
            .flat_map(futures::stream::iter)
    }

    async fn upload_batch(
        &self,
        local: &LocalDir,
        remote: &str,
        opts: &UploadOptions,
        files: Vec<Small>,
    ) -> Results {
        let mut done: Results = Vec::with_capacity(files.len());
        let mut left = vec![true; files.len()];
        if let Err(e) = self
            .send_batch(local, remote, opts, &files, &mut done, &mut left)
            .await
        {
            tracing::debug!(error = %e, "tree write failed; per file from here");
        }
        for (rel, _) in files.iter().zip(&left).filter_map(|(f, l)| l.then_some(f)) {
            let rpath = remote_join(remote, rel);
            // Never through a symlink that replaced the walk's file (read_files left it out).
            let source = SourcePath::InTree {
                root: local.clone(),
                rel: rel.clone(),
            };
            let r = self
                .upload_file(&source, &rpath, opts, Slots::One(self.pick_slot()), None)
                .await;
            done.push((rpath, r.map(Outcome::Sent)));
        }
        done
    }

    async fn send_batch(
        &self,
        local: &LocalDir,
        remote: &str,
        opts: &UploadOptions,
        files: &[Small],
        done: &mut Results,
        left: &mut [bool],
    ) -> Result<()> {
        let conn = self.conn(self.pick_slot()).await?;
        let (root, names) = (local.clone(), files.iter().map(|f| f.0.clone()).collect());
        let max_file = if conn.is_single_chunk(BATCH_MAX_FILE) {
            BATCH_MAX_FILE
        } else {
            // A server whose chunks are smaller than MAX_INLINE: one chunk at most.
            u64::from(fsd::protocol::MIN_CHUNK_SIZE)
        };
        let read = spawn_blocking(move || Ok(read_files(&root, names, max_file))).await?;
        if read.is_empty() {
            return Ok(());
        }
        let mut frame = Vec::with_capacity(
            read.iter()
                .map(|r| record_len(&r.entry, r.data.len()))
                .sum(),
        );
        for r in &read {
            push(&mut frame, &r.entry, &r.data);
        }
        let frame = Bytes::from(frame);
        let _window = conn.window(frame.len() as u64).await?;
        let req = msg::TreeWriteRequest {
            path: remote.to_string(),
            count: u32::try_from(read.len()).expect("≤ MAX_TREE_FILES"),
            no_clobber: opts.no_clobber,
        };
        for r in &read {
            self.emit(Event::Start {
                path: remote_join(remote, &files[r.index].0),
                local: local.display(&files[r.index].0),
                size: r.entry.size,
                resumed: 0,
            });
        }
        let mut s = conn.open().await?;
        s.send_msg(Cmd::TREE_WRITE, 0, &req).await?;
        let crc = crc32fast::hash(&frame);
        s.send_data(Cmd::TREE_WRITE, frame, crc).await?;
        let reply: msg::TreeWriteResponse = s.reply(Cmd::TREE_WRITE).await?;
        let mut failed: HashMap<usize, msg::Error> = HashMap::new();
        for f in reply.failed {
            let i = usize::try_from(f.index).unwrap_or(usize::MAX);
            if i >= read.len() {
                return Err(Error::Protocol(format!(
                    "TREE_WRITE failure for record {i}"
                )));
            }
            failed.insert(i, f.error.unwrap_or_default());
        }
        // From the wire: never trusted to size anything, only compared.
        let published = usize::try_from(reply.published).unwrap_or(usize::MAX);
        if failed.len().saturating_add(published) != read.len() {
            return Err(Error::Protocol(format!(
                "TREE_WRITE answered for {} of {} files",
                failed.len().saturating_add(published),
                read.len()
            )));
        }
        for (k, r) in read.into_iter().enumerate() {
            let rel = &files[r.index].0;
            let rpath = remote_join(remote, rel);
            left[r.index] = false;
            match failed.remove(&k) {
                None => {
                    let mut blake3 = [0u8; 32];
                    blake3.copy_from_slice(&r.entry.blake3);
                    self.emit(Event::Done {
                        path: rpath.clone(),
                        local: local.display(rel),
                        bytes: r.entry.size,
                        transferred: r.entry.size,
                        blake3: hex::encode(blake3),
                    });
                    let t = Transfer {
                        path: rpath.clone(),
                        bytes: r.entry.size,
                        transferred: r.entry.size,
                        blake3,
                    };
                    done.push((rpath, Ok(Outcome::Sent(t))));
                }
                // Retryable failures go to the per-file path, which retries; not a NoSpace
                // once another file has waited one out (Client::server_full).
                Some(e) if e.retryable && !(is_no_space(&e) && self.server_full()) => {
                    left[r.index] = true
                }
                Some(e) => {
                    let e = Error::from_wire(e);
                    self.emit(Event::Error {
                        path: rpath.clone(),
                        code: e.exit_code(),
                        message: e.message_for(&rpath),
                    });
                    done.push((rpath, Err(e)));
                }
            }
        }
        Ok(())
    }
}

fn is_no_space(e: &msg::Error) -> bool {
    e.code == fsd::protocol::ErrorCode::NoSpace as u32
}

/// Reads the files `names` beneath `root` for one TREE_WRITE frame: regular files of at most
/// `max_file` bytes, unchanged while read, opened through directory handles with O_NOFOLLOW
/// (as the local walk saw them: a symlink planted since is not followed). Files that are not
/// (or fail) are left out: the per-file path takes them and reports what is wrong. Blocking.
fn read_files(top: &LocalDir, names: Vec<String>, max_file: u64) -> Vec<Read1> {
    let mut out = Vec::with_capacity(names.len());
    let mut bytes = 0usize;
    let mut dirs: HashMap<String, Option<LocalDir>> = HashMap::new();
    for (index, rel) in names.into_iter().enumerate() {
        let (dir_rel, name) = rel_split(&rel);
        let dir = dirs
            .entry(dir_rel.to_string())
            .or_insert_with(|| top.walk(dir_rel).ok());
        let Some(Ok(file)) = dir.as_ref().map(|d| d.open_read(name)) else {
            continue;
        };
        let Ok(md) = file.metadata() else { continue };
        if !md.is_file() || md.len() > max_file {
            continue;
        }
        let read_at = std::time::SystemTime::now();
        // At most `max_file` (checked above).
        let mut data = Vec::with_capacity(usize::try_from(md.len()).unwrap_or(0));
        if (&file).take(max_file + 1).read_to_end(&mut data).is_err()
            || data.len() as u64 != md.len()
        {
            continue;
        }
        let Ok(after) = file.metadata() else { continue };
        let ns = crate::sync::mtime_ns;
        let (mtime_ns, ctime_ns) = (
            ns(md.mtime(), md.mtime_nsec()),
            ns(md.ctime(), md.ctime_nsec()),
        );
        // Changed since, or so recently that a change may not show yet: such a file goes by
        // the per-file path, which checks it again once it settled (upload::settles_at).
        if after.len() != md.len()
            || ns(after.mtime(), after.mtime_nsec()) != mtime_ns
            || ns(after.ctime(), after.ctime_nsec()) != ctime_ns
            || crate::upload::settles_at(ctime_ns, read_at).is_some()
        {
            continue;
        }
        let entry = msg::TreeEntry {
            path: rel,
            size: md.len(),
            mtime_ns,
            mode: md.mode() & 0o7777,
            blake3: blake3::hash(&data).as_bytes().to_vec(),
            data: true,
            error: None,
        };
        let len = record_len(&entry, data.len());
        // Files may have grown since the plan: the frame stays within its size.
        if bytes + len > UP_BYTES && !out.is_empty() {
            continue;
        }
        bytes += len;
        out.push(Read1 { index, entry, data });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_every_bound() {
        let files: Vec<Small> = (0..3000).map(|i| (format!("d/f{i}"), 4096)).collect();
        let b = batches(files.clone(), 512, 1 << 20, usize::MAX);
        assert!(b.iter().all(|b| b.len() <= 512));
        assert!(b
            .iter()
            .all(|b| b.iter().map(|f| f.1 + 64 + f.0.len() as u64).sum::<u64>() <= 1 << 20));
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 3000);
        let b = batches(files, 4096, u64::MAX, 1000);
        assert!(b
            .iter()
            .all(|b| b.iter().map(|f| f.0.len() + 8).sum::<usize>() <= 1000));
        // A file bigger than a whole batch still gets one of its own.
        let b = batches(vec![("big".into(), 10 << 20)], 512, 1 << 20, usize::MAX);
        assert_eq!(b.len(), 1);
    }
}
