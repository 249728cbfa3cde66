//! `-r` transfers. Downloads write only beneath their destination directory, through
//! [`LocalDir`] handles by checked names (see `local`).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fsd::durable::GroupSync;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::client::{entry_cost, Client, Entry, Kind, Slots, Transfer};
use crate::error::{Error, Result};
use crate::local::sink::Out;
use crate::local::{check_name, is_work_dir_name, new_mode, work_dir_name, LocalDir, Work};
use crate::progress::Event;
use crate::upload::UploadOptions;

/// `parent/name` for remote paths, where "" is the root.
pub(crate) fn remote_join(parent: &str, name: &str) -> String {
    let parent = parent.trim_end_matches('/');
    if parent.is_empty() || parent == "." {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// A local file name as a remote name component (must be UTF-8).
pub(crate) fn utf8_name(name: &OsStr) -> Result<&str> {
    std::str::from_utf8(name.as_bytes()).map_err(|_| {
        Error::Usage(format!(
            "{name:?}: not UTF-8, cannot be named on the server"
        ))
    })
}

/// What a `-r` transfer did.
#[derive(Debug, Default)]
pub struct TreeSummary {
    /// Files transferred and verified.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Payload bytes moved over the network.
    pub transferred: u64,
    /// Entries skipped (symlinks, special files).
    pub skipped: u64,
    /// Files that failed, with the error.
    pub failed: Vec<(String, Error)>,
}

/// Files in flight per connection during a tree transfer: enough that per-file round trips
/// (open, read, close) overlap instead of adding up, and that files waiting for their group
/// sync do not starve the link.
const FILES_PER_CONN: usize = 128;
/// A download tree's group sync waits this long for this many files to join (fsd::durable).
const SYNC_GATHER: Duration = Duration::from_millis(3);
const SYNC_BATCH: usize = 64;
/// Directory listings in flight at once.
const LISTS_IN_FLIGHT: usize = 16;
/// Files up to this size use one connection; bigger ones are split across all of them.
const SMALL_FILE: u64 = 4 << 20;

/// Most entries (files, directories, anything listed) a tree download takes from a server, and
/// most memory it spends on them (paths, names, link targets and a fixed overhead each): the
/// plan of a tree is held in memory, so a server that lists without end, or very deep, meets a
/// limit rather than exhausting the machine.
pub const MAX_TREE_ENTRIES: u64 = 1 << 20;
pub const MAX_TREE_BYTES: u64 = 128 << 20;
/// Deepest directory level of a tree download.
pub const MAX_TREE_DEPTH: usize = 1024;
/// Longest remote path a tree download follows: the protocol's path limit (docs/PROTOCOL.md
/// §13). Keeps what one entry of a deep tree costs bounded too.
const MAX_REMOTE_PATH: usize = 4096;
/// Descriptors a tree download keeps for itself and the connections, beyond files in flight.
const FD_RESERVE: u64 = 64;
/// Descriptors one file in flight may hold (its directory, part, direct-I/O twin, working
/// directory, and one spare for publishing).
const FDS_PER_FILE: u64 = 6;

/// A remote file found by a tree walk, and where it goes locally.
struct RemoteFile {
    remote: String,
    /// Local directory, relative to the destination root ("" for the root itself).
    dir: String,
    name: String,
    size: u64,
}

/// A local directory of a tree download: synced at the end (its renames), and given the
/// server's mode and mtime only if this run created it (`meta`).
struct TreeDir {
    depth: usize,
    rel: String,
    meta: Option<(u32, i64)>,
}

/// Counts what a tree walk keeps, against [`MAX_TREE_ENTRIES`] and the path-bytes limit.
#[derive(Default)]
struct Budget {
    entries: u64,
    bytes: u64,
}

impl Budget {
    /// Charges entry `e` listed in `dir` (its remote and local paths are kept as well).
    fn take(&mut self, dir: &str, e: &Entry) -> Result<()> {
        self.entries += 1;
        self.bytes += 2 * (dir.len() + 1 + e.name.len()) as u64 + entry_cost(e);
        if self.exceeded() {
            return Err(Error::Protocol(format!(
                "the tree has more than {MAX_TREE_ENTRIES} entries or {} MiB of names; \
                 download it in parts",
                MAX_TREE_BYTES >> 20
            )));
        }
        Ok(())
    }

    fn exceeded(&self) -> bool {
        self.entries > MAX_TREE_ENTRIES || self.bytes > MAX_TREE_BYTES
    }
}

/// `parent/name` for local relative paths, where "" is the root.
fn rel_join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Files a tree transfer over `conns` connections keeps in flight: as many as asked, but
/// never so many that their descriptors, with the connections' sockets, would exceed the
/// process's limit (`ulimit -n`).
fn files_in_flight(wanted: usize, conns: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit writes into the struct we pass, nothing else.
    let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur,
        _ => 1024,
    };
    let reserve = FD_RESERVE + u64::try_from(conns).unwrap_or(u64::MAX);
    let budget = soft.saturating_sub(reserve) / FDS_PER_FILE;
    wanted
        .min(usize::try_from(budget).unwrap_or(usize::MAX))
        .max(1)
}

impl Client {
    /// Downloads the remote directory `remote` into `local` (created if missing): files, modes
    /// (less the umask, unless [`Options::preserve`](crate::Options)) and mtimes of what this
    /// run creates; a directory that existed before is left as it was. Symlinks and special
    /// files are skipped (a [`Event::Skip`] each). Every write goes through handles opened
    /// beneath `local` by checked names; a server that names anything else (`..`, `a/b`, NUL)
    /// is refused. Directories are opened when needed and closed after, so the number of
    /// open files is bounded whatever the tree's shape.
    pub async fn download_tree(&self, remote: &str, local: &Path) -> Result<TreeSummary> {
        let top = self.stat(remote).await?;
        if top.kind != Kind::Dir {
            return Err(Error::Usage(format!("{remote}: not a directory (drop -r)")));
        }
        let root_is_new = std::fs::symlink_metadata(local).is_err();
        std::fs::create_dir_all(local).map_err(|e| Error::io(local.display(), e))?;
        let root = LocalDir::open(local).map_err(|e| Error::io(local.display(), e))?;
        let mut summary = TreeSummary::default();
        let mut files = Vec::new();
        // Names the server has at the top, where fsc's working directory would go.
        let mut top_names = std::collections::HashSet::new();
        let mut dirs = vec![TreeDir {
            depth: 0,
            rel: String::new(),
            meta: root_is_new.then_some((top.mode, top.mtime_ns)),
        }];
        let budget = &std::sync::Mutex::new(Budget::default());
        // Files are made durable in groups (one syncfs each), then renamed; see fsd::durable.
        let group = GroupSync::new(root.fd(), SYNC_GATHER, SYNC_BATCH)
            .map_err(|e| Error::io(local.display(), e))?;
        let group = &group;

        // Breadth-first, with listings of different directories overlapping. A queued
        // directory is a remote path and a local relative path, not an open handle.
        let mut lists = FuturesUnordered::new();
        let mut waiting = VecDeque::from([(remote.to_string(), String::new(), 1usize)]);
        loop {
            while lists.len() < LISTS_IN_FLIGHT {
                let Some((path, rel, depth)) = waiting.pop_front() else {
                    break;
                };
                lists.push(async move {
                    let mut entries = Vec::new();
                    let r = self.list_each(&path, |e| {
                        budget.lock().unwrap().take(&path, &e)?;
                        entries.push(e);
                        Ok(())
                    });
                    let r = r.await.map(|()| entries);
                    (path, rel, depth, r)
                });
            }
            let Some((path, rel, depth, listed)) = lists.next().await else {
                break;
            };
            let entries = match listed {
                Ok(e) => e,
                // Too big to plan: nothing of it is transferred.
                Err(e) if budget.lock().unwrap().exceeded() => return Err(e),
                Err(e) => {
                    self.emit(error_event(&path, &e));
                    summary.failed.push((path, e));
                    continue;
                }
            };
            let dir = match root.walk(&rel) {
                Ok(d) => d,
                Err(e) => {
                    let e = Error::io(root.display(&rel), e);
                    self.emit(error_event(&path, &e));
                    summary.failed.push((path, e));
                    continue;
                }
            };
            for e in entries {
                if rel.is_empty() {
                    top_names.insert(e.name.clone());
                }
                let rpath = remote_join(&path, &e.name);
                if let Err(err) = check_name(&e.name) {
                    self.emit(error_event(&rpath, &err));
                    summary.failed.push((rpath, err));
                    continue;
                }
                if rpath.len() > MAX_REMOTE_PATH {
                    let err = Error::Protocol(format!(
                        "path longer than {MAX_REMOTE_PATH} bytes; not transferred"
                    ));
                    self.emit(error_event(&rpath, &err));
                    summary.failed.push((rpath, err));
                    continue;
                }
                match e.kind {
                    Kind::File => files.push(RemoteFile {
                        remote: rpath,
                        dir: rel.clone(),
                        name: e.name,
                        size: e.size,
                    }),
                    Kind::Dir if depth >= MAX_TREE_DEPTH => {
                        let err = Error::Protocol(format!(
                            "deeper than {MAX_TREE_DEPTH} levels; not descending"
                        ));
                        self.emit(error_event(&rpath, &err));
                        summary.failed.push((rpath, err));
                    }
                    // Writable by us until the end, whatever the server's mode says.
                    Kind::Dir => match dir.subdir(&e.name, true, 0o700) {
                        Ok((_, created)) => {
                            let sub = rel_join(&rel, &e.name);
                            dirs.push(TreeDir {
                                depth,
                                rel: sub.clone(),
                                meta: created.then_some((e.mode, e.mtime_ns)),
                            });
                            waiting.push_back((rpath, sub, depth + 1));
                        }
                        Err(err) => {
                            let err = Error::io(dir.display(&e.name), err);
                            self.emit(error_event(&rpath, &err));
                            summary.failed.push((rpath, err));
                        }
                    },
                    Kind::Symlink | Kind::Other => {
                        summary.skipped += 1;
                        self.emit(Event::Skip {
                            path: rpath,
                            reason: format!("{:?}", e.kind).to_lowercase(),
                        });
                    }
                }
            }
        }

        self.emit(Event::Plan {
            files: files.len() as u64,
            bytes: files.iter().fold(0, |n: u64, f| n.saturating_add(f.size)),
        });
        let root = &root;
        let work_name = work_dir_name(|n| top_names.contains(n));
        drop(top_names);
        let work_name = &work_name;
        let results = futures::stream::iter(files)
            .map(|f| async move {
                let slots = if f.size <= SMALL_FILE {
                    Slots::One(self.pick_slot())
                } else {
                    Slots::All
                };
                let dir = match root.walk(&f.dir) {
                    Ok(d) => d,
                    Err(e) => return (f.remote, Err(Error::io(root.display(&f.dir), e))),
                };
                let out = Out::File {
                    work: Work::new(root.clone(), work_name.clone(), &rel_join(&f.dir, &f.name)),
                    dir,
                    name: f.name,
                    group: Some(group.clone()),
                };
                let r = self.download_file(&f.remote, out, slots).await;
                (f.remote, r)
            })
            .buffer_unordered(files_in_flight(
                FILES_PER_CONN * self.connections(),
                self.connections(),
            ));
        summary.collect(results).await;
        Work::new(root.clone(), work_name.clone(), "").tidy();

        // Directory metadata last, deepest first: creating entries changes a directory's mtime.
        // Each directory is synced once here (its renames) rather than after every rename in
        // it. Only directories this run created get the server's mode and mtime.
        let preserve = self.shared.opts.preserve;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
        for d in dirs {
            let r = root.walk(&d.rel).and_then(|dir| {
                dir.sync()?;
                match d.meta {
                    Some((mode, mtime_ns)) => dir.set_meta(new_mode(mode, preserve), mtime_ns),
                    None => Ok(()),
                }
            });
            if let Err(e) = r {
                summary
                    .failed
                    .push((root.display(&d.rel), Error::io(root.display(&d.rel), e)));
            }
        }
        Ok(summary)
    }

    /// Uploads the local directory `local` to the remote directory `remote` (created with
    /// parents if missing). Symlinks and special files are skipped. The protocol cannot set a
    /// remote directory's mtime, so only files keep theirs.
    pub async fn upload_tree(
        &self,
        local: &Path,
        remote: &str,
        opts: &UploadOptions,
    ) -> Result<TreeSummary> {
        let local_owned = local.to_path_buf();
        let remote_owned = remote.to_string();
        let walk = tokio::task::spawn_blocking(move || walk_local(&local_owned, &remote_owned))
            .await
            .expect("walk thread")?;
        let mut summary = TreeSummary::default();
        for (path, reason) in walk.skipped {
            summary.skipped += 1;
            self.emit(Event::Skip { path, reason });
        }
        // Parents before children: one level at a time, each level's mkdirs overlapping.
        let mut by_depth: Vec<Vec<(String, u32)>> = Vec::new();
        for (path, mode, depth) in walk.dirs {
            if by_depth.len() <= depth {
                by_depth.resize(depth + 1, Vec::new());
            }
            by_depth[depth].push((path, mode));
        }
        for level in by_depth {
            let made =
                futures::stream::iter(level)
                    .map(|(path, mode)| async move {
                        (path.clone(), self.mkdir(&path, true, mode).await)
                    })
                    .buffer_unordered(LISTS_IN_FLIGHT)
                    .collect::<Vec<_>>()
                    .await;
            for (path, r) in made {
                if let Err(e) = r {
                    // Without its directory nothing beneath can be uploaded.
                    self.emit(error_event(&path, &e));
                    return Err(e);
                }
            }
        }
        self.emit(Event::Plan {
            files: walk.files.len() as u64,
            bytes: walk.files.iter().map(|f| f.2).sum(),
        });
        let results = futures::stream::iter(walk.files)
            .map(|(local, remote, size)| async move {
                let slots = if size <= SMALL_FILE {
                    Slots::One(self.pick_slot())
                } else {
                    Slots::All
                };
                let r = self.upload_file(&local, &remote, opts, slots).await;
                (remote, r)
            })
            .buffer_unordered(files_in_flight(
                FILES_PER_CONN * self.connections(),
                self.connections(),
            ));
        summary.collect(results).await;
        Ok(summary)
    }
}

fn error_event(path: &str, e: &Error) -> Event {
    Event::Error {
        path: path.to_string(),
        code: e.exit_code(),
        message: e.to_string(),
    }
}

impl TreeSummary {
    async fn collect(&mut self, results: impl futures::Stream<Item = (String, Result<Transfer>)>) {
        futures::pin_mut!(results);
        while let Some((path, r)) = results.next().await {
            match r {
                Ok(t) => {
                    self.files += 1;
                    self.bytes += t.bytes;
                    self.transferred += t.transferred;
                }
                Err(e) => self.failed.push((path, e)),
            }
        }
    }

    /// The exit code for this outcome: 0 if everything verified, else the worst failure's.
    pub fn exit_code(&self) -> i32 {
        self.failed
            .iter()
            .map(|(_, e)| e.exit_code())
            .max()
            .unwrap_or(0)
    }
}

/// A local tree: directories (remote path, mode, depth), files (local, remote, size), skipped.
struct LocalTree {
    dirs: Vec<(String, u32, usize)>,
    files: Vec<(PathBuf, String, u64)>,
    skipped: Vec<(String, String)>,
}

fn walk_local(root: &Path, remote: &str) -> Result<LocalTree> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(root).map_err(|e| Error::io(root.display(), e))?;
    if !md.is_dir() {
        return Err(Error::Usage(format!(
            "{}: not a directory (drop -r)",
            root.display()
        )));
    }
    let mut tree = LocalTree {
        dirs: vec![(remote.to_string(), md.mode() & 0o7777, 0)],
        files: Vec::new(),
        skipped: Vec::new(),
    };
    let mut stack = vec![(root.to_path_buf(), remote.to_string(), 1usize)];
    while let Some((dir, rdir, depth)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut entries: Vec<_> = rd
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(dir.display(), e))?;
        entries.sort_by_key(|e| e.file_name());
        for ent in entries {
            let path = ent.path();
            let rpath = match utf8_name(&ent.file_name()) {
                Ok(n) => remote_join(&rdir, n),
                Err(e) => {
                    tree.skipped
                        .push((path.display().to_string(), e.to_string()));
                    continue;
                }
            };
            // lstat: a symlink is never followed out of the tree.
            let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(path.display(), e))?;
            let ft = md.file_type();
            if ft.is_dir() && ent.file_name().to_str().is_some_and(is_work_dir_name) {
                // fsc's own partial downloads, not the user's data.
                tree.skipped.push((rpath, "fsc working directory".into()));
            } else if ft.is_dir() {
                tree.dirs.push((rpath.clone(), md.mode() & 0o7777, depth));
                stack.push((path, rpath, depth + 1));
            } else if ft.is_file() {
                tree.files.push((path, rpath, md.len()));
            } else {
                let why = if ft.is_symlink() {
                    "symlink"
                } else {
                    "special file"
                };
                tree.skipped.push((rpath, why.to_string()));
            }
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_skip_fscs_working_directories() {
        let tmp = tempfile::tempdir().unwrap();
        for d in [".fsc-work", ".fsc-work.1", ".fsc-workshop"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
            std::fs::write(tmp.path().join(d).join("x"), b"x").unwrap();
        }
        std::fs::write(tmp.path().join("f"), b"f").unwrap();
        let tree = walk_local(tmp.path(), "r").unwrap();
        let mut files: Vec<_> = tree.files.iter().map(|f| f.1.as_str()).collect();
        files.sort();
        assert_eq!(files, ["r/.fsc-workshop/x", "r/f"]);
        assert_eq!(tree.skipped.len(), 2);
    }

    #[test]
    fn remote_path_helpers() {
        use crate::client::remote_basename;
        assert_eq!(remote_basename("a/b/c"), "c");
        assert_eq!(remote_basename("c"), "c");
        assert_eq!(remote_basename("a/b/"), "b");
        assert_eq!(remote_join("", "x"), "x");
        assert_eq!(remote_join("a/b", "x"), "a/b/x");
    }
}
