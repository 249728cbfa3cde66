//! Local directory handles and `-r` transfers.
//!
//! The client is attacked too (rsync CVE-2024-12086/12087, scp CVE-2019-6111): a hostile
//! server can name files we never asked for. Downloads therefore write only through a
//! [`LocalDir`] — an open directory fd — by one checked leaf name at a time, with `O_NOFOLLOW`,
//! so neither `../x`, `a/b`, an absolute name nor a symlink planted in the destination can lead
//! a write outside it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, futimens, mkdirat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};

use std::collections::VecDeque;

use fsd::durable::{link_anonymous, GroupSync};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::client::{Client, Kind, Transfer};
use crate::download::{Out, Slots};
use crate::error::{Error, Result};
use crate::progress::Event;
use crate::upload::UploadOptions;

/// Longest component name accepted from a server.
const NAME_MAX: usize = 255;

/// Accepts only a plain file name: not empty, `.` or `..`, no `/` or NUL, at most 255 bytes.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > NAME_MAX
    {
        return Err(Error::UnsafeName(name.to_string()));
    }
    Ok(())
}

/// An open directory. Every file operation is relative to it, by a single leaf name.
#[derive(Clone, Debug)]
pub(crate) struct LocalDir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

impl LocalDir {
    /// Opens a directory the user named (symlinks in the user's own path are followed).
    pub fn open(path: &Path) -> std::io::Result<LocalDir> {
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        Ok(LocalDir {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
        })
    }

    /// Path for messages.
    pub fn display(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    /// Opens (creating if `create`) the subdirectory `name`; a symlink there is refused.
    pub fn subdir(&self, name: &str, create: bool, mode: u32) -> std::io::Result<LocalDir> {
        if create {
            match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io(e)),
            }
        }
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        Ok(LocalDir {
            fd: Arc::new(fd),
            path: self.path.join(name),
        })
    }

    /// Opens `name` read-write, creating it (mode 0600 until published) if missing; a symlink
    /// there is refused.
    pub fn open_rw(&self, name: &str, truncate: bool) -> std::io::Result<File> {
        let mut flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if truncate {
            flags |= OFlag::O_TRUNC;
        }
        let fd = openat(
            self.fd.as_fd(),
            name,
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io)?;
        Ok(File::from(fd))
    }

    /// A new file with no name yet (O_TMPFILE) in this directory, for [`LocalDir::link_in`]:
    /// nothing is visible, and nothing is left behind by a crash, until it is complete.
    /// `None` where the file system does not support it.
    pub fn create_anonymous(&self) -> Option<File> {
        let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let fd = openat(self.fd.as_fd(), ".", flags, Mode::from_bits_truncate(0o600)).ok()?;
        Some(File::from(fd))
    }

    /// Gives an anonymous file the name `name`, replacing (atomically) whatever is there.
    pub fn link_in(&self, file: &File, name: &str) -> std::io::Result<()> {
        let link = |to: &str| link_anonymous(file.as_fd(), self.fd.as_fd(), to);
        match link(name) {
            Err(Errno::EEXIST) => {}
            r => return r.map_err(io),
        }
        // Something is there already (an older copy, or a planted symlink, which a rename
        // replaces rather than follows): link under a private name, then rename over it.
        let tmp = format!("{name}{}", crate::state::PART_SUFFIX);
        self.remove(&tmp)?;
        link(&tmp).map_err(io)?;
        self.rename(&tmp, name)
    }

    /// Reads a small file; `None` if it does not exist.
    pub fn read(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let fd = match openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut buf = Vec::new();
        File::from(fd).read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    /// Replaces `name` with `data` atomically (temp file + rename; not synced: see state.rs).
    pub fn write_atomic(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        let mut f = self.open_rw(&tmp, true)?;
        f.write_all(data)?;
        drop(f);
        self.rename(&tmp, name)
    }

    pub fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        renameat(self.fd.as_fd(), from, self.fd.as_fd(), to).map_err(io)
    }

    /// Removes a file; a missing one is fine.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Makes renames in this directory durable.
    pub fn sync(&self) -> std::io::Result<()> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(io)
    }

    /// Sets the directory's own permission bits and mtime.
    pub fn set_meta(&self, mode: u32, mtime_ns: i64) -> std::io::Result<()> {
        set_meta(self.fd.as_fd(), mode, mtime_ns)
    }
}

/// Sets permission bits (never setuid/setgid/sticky from a server) and mtime on an open fd.
pub(crate) fn set_meta(fd: impl AsFd, mode: u32, mtime_ns: i64) -> std::io::Result<()> {
    fchmod(fd.as_fd(), Mode::from_bits_truncate(mode & 0o777)).map_err(io)?;
    let mtime = TimeSpec::new(
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000),
    );
    futimens(fd.as_fd(), &TimeSpec::UTIME_OMIT, &mtime).map_err(io)
}

/// The last component of a remote path ("" for the root).
pub(crate) fn remote_basename(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

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

/// A remote file found by a tree walk, and where it goes locally.
struct RemoteFile {
    remote: String,
    dir: LocalDir,
    name: String,
    size: u64,
}

impl Client {
    /// Downloads the remote directory `remote` into `local` (created if missing): files, modes
    /// and mtimes. Symlinks and special files are skipped (a [`Event::Skip`] each). Every write
    /// goes through an open handle on `local` by checked names; a server that names anything
    /// else (`..`, `a/b`, NUL) is refused.
    pub async fn download_tree(&self, remote: &str, local: &Path) -> Result<TreeSummary> {
        let top = self.stat(remote).await?;
        if top.kind != Kind::Dir {
            return Err(Error::Usage(format!("{remote}: not a directory (drop -r)")));
        }
        std::fs::create_dir_all(local).map_err(|e| Error::io(local.display(), e))?;
        let root = LocalDir::open(local).map_err(|e| Error::io(local.display(), e))?;
        let mut summary = TreeSummary::default();
        let mut files = Vec::new();
        let mut dirs = vec![(0usize, root.clone(), top.mode, top.mtime_ns)];
        // Files are made durable in groups (one syncfs each), then renamed; see fsd::durable.
        let group = GroupSync::new(root.fd.as_fd(), SYNC_GATHER, SYNC_BATCH)
            .map_err(|e| Error::io(local.display(), e))?;
        let group = &group;

        // Breadth-first, with listings of different directories overlapping.
        let mut lists = FuturesUnordered::new();
        let mut waiting = VecDeque::from([(remote.to_string(), root, 1usize)]);
        loop {
            while lists.len() < LISTS_IN_FLIGHT {
                let Some((path, dir, depth)) = waiting.pop_front() else {
                    break;
                };
                lists.push(async move {
                    let r = self.list(&path).await;
                    (path, dir, depth, r)
                });
            }
            let Some((path, dir, depth, listed)) = lists.next().await else {
                break;
            };
            let entries = match listed {
                Ok(e) => e,
                Err(e) => {
                    self.emit(error_event(&path, &e));
                    summary.failed.push((path, e));
                    continue;
                }
            };
            for e in entries {
                let rpath = remote_join(&path, &e.name);
                if let Err(err) = check_name(&e.name) {
                    self.emit(error_event(&rpath, &err));
                    summary.failed.push((rpath, err));
                    continue;
                }
                match e.kind {
                    Kind::File => files.push(RemoteFile {
                        remote: rpath,
                        dir: dir.clone(),
                        name: e.name,
                        size: e.size,
                    }),
                    Kind::Dir => match dir.subdir(&e.name, true, 0o700) {
                        Ok(sub) => {
                            dirs.push((depth, sub.clone(), e.mode, e.mtime_ns));
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
            bytes: files.iter().map(|f| f.size).sum(),
        });
        let results = futures::stream::iter(files)
            .map(|f| async move {
                let slots = if f.size <= SMALL_FILE {
                    Slots::One(self.pick_slot())
                } else {
                    Slots::All
                };
                let out = Out::File {
                    dir: f.dir,
                    name: f.name,
                    group: Some(group.clone()),
                };
                (
                    f.remote.clone(),
                    self.download_file(&f.remote, out, slots).await,
                )
            })
            .buffer_unordered(FILES_PER_CONN * self.connections());
        summary.collect(results).await;

        // Directory metadata last, deepest first: creating entries changes a directory's mtime.
        // Each directory is synced once here (its renames) rather than after every rename in it.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (_, dir, mode, mtime_ns) in dirs {
            if let Err(e) = dir.sync().and_then(|_| dir.set_meta(mode, mtime_ns)) {
                let e = Error::io(dir.display(""), e);
                summary.failed.push((dir.display(""), e));
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
            .buffer_unordered(FILES_PER_CONN * self.connections());
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
            if ft.is_dir() {
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
    fn hostile_names_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            "x\0y",
            &"n".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", ".hidden", "..x", "x..", "naïve", &"n".repeat(255)] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn local_dir_does_not_follow_planted_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), dest.join("f")).unwrap();
        let dir = LocalDir::open(&dest).unwrap();
        assert!(dir.subdir("sub", true, 0o755).is_err());
        assert!(dir.open_rw("f", false).is_err());
        assert!(!outside.join("f").exists());
    }

    #[test]
    fn remote_path_helpers() {
        assert_eq!(remote_basename("a/b/c"), "c");
        assert_eq!(remote_basename("c"), "c");
        assert_eq!(remote_basename("a/b/"), "b");
        assert_eq!(remote_join("", "x"), "x");
        assert_eq!(remote_join("a/b", "x"), "a/b/x");
    }
}
