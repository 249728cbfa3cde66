//! Confinement of every client path beneath the server's --root, enforced by the kernel.
//!
//! Checking a path as a string and then opening it by name loses a race against a client that
//! swaps a directory for a symlink in between (../shared/SECURITY.md: a naive check-then-open escaped
//! 11–28% of swaps on this machine). So every path is resolved by `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` against an open directory handle, and every change
//! (mkdir, unlink, rename) acts on one checked leaf name inside a parent directory opened that
//! way. The lexical [`Root::check`] in front only turns obviously bad paths into clear errors; the
//! kernel is what confines.
//!
//! Gaps openat2 leaves, by design not closed here: a hard link inside the root to a file outside
//! it is just a file inside the root (nothing in path resolution can tell), and bind mounts
//! inside the root are crossed (`RESOLVE_NO_XDEV` would refuse them).
//!
//! All calls block: async callers run them on a blocking thread.

// The one module allowed to touch paths; everything else goes through it (see clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::ffi::{CStr, CString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, FcntlArg, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{self, FileStat, Mode};
use nix::unistd::{self, UnlinkatFlags};

use crate::durable::link_anonymous;
use crate::fs::listing::{ListCursors, Stamp};
use crate::protocol::{msg, ErrorCode, MAX_PATH_LEN};

/// Longest component (NAME_MAX); the longest path is the protocol's MAX_PATH_LEN.
const MAX_NAME_LEN: usize = 255;
/// openat2 fails with EAGAIN when a rename or mount anywhere races with a lookup that goes
/// through ".." (possible via a symlink's text); the answer is to try again.
const OPENAT2_RETRIES: usize = 8;
/// Deepest tree a recursive remove descends: each level holds one open directory.
const MAX_REMOVE_DEPTH: usize = 256;
/// Paths quoted in errors are cut to this many bytes: an overlong path must not make an overlong
/// error message.
const MAX_SHOWN_PATH: usize = 512;

/// Error of a file-system operation on a client path. [`FsError::code`] maps it to the wire
/// [`ErrorCode`]. Paths are printed quoted (`{:?}`) because they come from clients and may hold
/// newlines or control characters meant for the log.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path:?}: invalid path: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// openat2 refused the resolution: it would leave the root (EXDEV), go through a magic link,
    /// or loop through symlinks (ELOOP).
    #[error("{path:?}: resolution leaves the root (symlink out of it, magic link or loop)")]
    Escapes { path: String },
    #[error("{path:?}: not found")]
    NotFound { path: String },
    #[error("{path:?}: already exists")]
    AlreadyExists { path: String },
    #[error("{path:?}: not a directory")]
    NotADirectory { path: String },
    #[error("{path:?}: is a directory")]
    IsADirectory { path: String },
    /// A FIFO, socket or device where a regular file is required.
    #[error("{path:?}: not a regular file")]
    NotAFile { path: String },
    /// The final component is a symlink: it is never followed where a file is opened.
    #[error("{path:?}: is a symbolic link (not followed)")]
    Symlink { path: String },
    #[error("{path:?}: directory not empty")]
    DirectoryNotEmpty { path: String },
    #[error("{path:?}: no space left (ENOSPC or quota)")]
    NoSpace { path: String },
    #[error("{path:?}: permission denied")]
    PermissionDenied { path: String },
    /// The kernel lacks openat2 (Linux < 5.6, or a seccomp filter hides it). Confinement is not
    /// possible without it, so the server refuses to start rather than fall back.
    #[error("{path:?}: openat2 is unavailable, and confinement of client paths requires it")]
    Unsupported {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The file system under the root cannot do this (ENOTSUP/ENOSYS, or a flag it lacks):
    /// retrying will not help.
    #[error("{path:?}: the server's file system cannot {what}")]
    NotSupportedHere { path: String, what: &'static str },
    #[error("{path:?}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// The wire error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FsError::InvalidPath { .. } | FsError::Escapes { .. } => ErrorCode::InvalidPath,
            FsError::NotFound { .. } => ErrorCode::NotFound,
            FsError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            FsError::NotADirectory { .. } => ErrorCode::NotADirectory,
            FsError::IsADirectory { .. } => ErrorCode::IsADirectory,
            FsError::NotAFile { .. } | FsError::Symlink { .. } => ErrorCode::NotAFile,
            FsError::DirectoryNotEmpty { .. } => ErrorCode::DirectoryNotEmpty,
            FsError::NoSpace { .. } => ErrorCode::NoSpace,
            FsError::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            FsError::Unsupported { .. } => ErrorCode::Internal,
            FsError::NotSupportedHere { .. } => ErrorCode::Unsupported,
            FsError::Io { .. } => ErrorCode::Io,
        }
    }

    /// Maps an I/O error on `path` by its errno: the one place that does.
    pub fn from_io(path: &str, e: io::Error) -> FsError {
        let path = shown(path);
        match e.raw_os_error() {
            Some(libc::ENOENT) => FsError::NotFound { path },
            Some(libc::EEXIST) => FsError::AlreadyExists { path },
            Some(libc::ENOTDIR) => FsError::NotADirectory { path },
            Some(libc::EISDIR) => FsError::IsADirectory { path },
            Some(libc::ENOTEMPTY) => FsError::DirectoryNotEmpty { path },
            // What openat2's RESOLVE_BENEATH / RESOLVE_NO_MAGICLINKS answer. Renames map their
            // own EXDEV (a cross-device move) before coming here.
            Some(libc::EXDEV | libc::ELOOP) => FsError::Escapes { path },
            Some(libc::ENOSPC | libc::EDQUOT) => FsError::NoSpace { path },
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => FsError::PermissionDenied { path },
            Some(libc::ENAMETOOLONG) => FsError::InvalidPath {
                path,
                reason: "name too long",
            },
            // Opening a socket, or a device without a driver.
            Some(libc::ENXIO) => FsError::NotAFile { path },
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => FsError::NotSupportedHere {
                path,
                what: "do this operation",
            },
            _ => FsError::Io { path, source: e },
        }
    }
}

/// Adapts a nix call's error to [`FsError::from_io`].
fn errno(path: &str) -> impl FnOnce(Errno) -> FsError + '_ {
    move |e| FsError::from_io(path, e.into())
}

/// `path`, cut at a char boundary to [`MAX_SHOWN_PATH`] bytes.
fn shown(path: &str) -> String {
    if path.len() <= MAX_SHOWN_PATH {
        return path.to_owned();
    }
    let mut end = MAX_SHOWN_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

/// "" and "." name the root itself.
fn is_root(path: &str) -> bool {
    path.is_empty() || path == "."
}

/// How every client path is opened: resolution may not leave the directory fd it starts from,
/// nor go through /proc-style magic links.
fn beneath(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// openat2, retried on EAGAIN.
fn openat2(dir: impl AsFd, path: &CStr, how: OpenHow) -> Result<OwnedFd, Errno> {
    let mut tries = 0;
    loop {
        match fcntl::openat2(dir.as_fd(), path, how) {
            Err(Errno::EAGAIN) if tries < OPENAT2_RETRIES => tries += 1,
            r => return r,
        }
    }
}

/// A checked client path as a C string (check() has ruled out NUL bytes).
fn c_path(path: &str) -> CString {
    let path = if is_root(path) { "." } else { path };
    CString::new(path).expect("checked paths hold no NUL")
}

fn lstat_at(dir: impl AsFd, name: &CStr) -> Result<FileStat, Errno> {
    stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// A directory's entry for `name`, from lstat; a symlink's text is read, never followed.
fn entry_at(
    dir: BorrowedFd<'_>,
    leaf: &CStr,
    name: String,
    path: &str,
) -> Result<msg::Entry, FsError> {
    let st = lstat_at(dir, leaf).map_err(errno(path))?;
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => msg::Kind::File,
        libc::S_IFDIR => msg::Kind::Dir,
        libc::S_IFLNK => msg::Kind::Symlink,
        _ => msg::Kind::Other,
    };
    let target = if kind == msg::Kind::Symlink {
        let text = fcntl::readlinkat(dir, leaf).map_err(errno(path))?;
        text.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    Ok(msg::Entry {
        name,
        kind: kind as i32,
        size: st.st_size.max(0) as u64,
        mtime_ns: st
            .st_mtime
            .saturating_mul(1_000_000_000)
            .saturating_add(st.st_mtime_nsec),
        mode: st.st_mode & 0o7777,
        target,
    })
}

/// A readdir stream over a directory fd. (nix's `Dir` needs its `dir` feature, which the package
/// does not enable; this is the part of it we use.)
struct DirStream(NonNull<libc::DIR>);

impl DirStream {
    fn new(fd: OwnedFd) -> Result<DirStream, Errno> {
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` is an open directory fd that we own; on success fdopendir owns it.
        let dirp = unsafe { libc::fdopendir(raw) };
        match NonNull::new(dirp) {
            Some(dirp) => Ok(DirStream(dirp)),
            None => {
                let e = Errno::last();
                // SAFETY: fdopendir failed, so `raw` is still ours to close.
                unsafe { libc::close(raw) };
                Err(e)
            }
        }
    }

    /// The next name other than "." and "..", or None at the end.
    fn next_name(&mut self) -> Option<Result<CString, Errno>> {
        loop {
            // readdir reports an error only through errno, with a null that also means "end".
            Errno::clear();
            // SAFETY: the stream is open until drop.
            let ent = unsafe { libc::readdir(self.0.as_ptr()) };
            if ent.is_null() {
                return match Errno::last_raw() {
                    0 => None,
                    e => Some(Err(Errno::from_raw(e))),
                };
            }
            // SAFETY: d_name is NUL-terminated and valid until the next readdir on this stream.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if name != c"." && name != c".." {
                return Some(Ok(name.to_owned()));
            }
        }
    }

    /// All names, read before the caller changes the directory: readdir while unlinking in the
    /// same directory may skip entries.
    fn names(mut self) -> Result<(DirStream, Vec<CString>), Errno> {
        let mut names = Vec::new();
        while let Some(name) = self.next_name() {
            names.push(name?);
        }
        Ok((self, names))
    }
}

impl AsFd for DirStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: dirfd of an open stream is valid for as long as the stream.
        unsafe { BorrowedFd::borrow_raw(libc::dirfd(self.0.as_ptr())) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: opened by fdopendir, closed once here (this also closes the fd).
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// An open directory handle under which every client path is resolved by the kernel.
#[derive(Debug)]
pub struct Root {
    /// O_PATH|O_DIRECTORY: only ever the starting point of openat2.
    dir: OwnedFd,
    /// Refused as any path component and hidden from listings (the server's state directory).
    reserved: Option<String>,
    /// The state directory's absolute path when it lies inside the root: a symlink elsewhere in
    /// the root could still lead into it, so every resolved fd is checked against it.
    hidden: Option<std::path::PathBuf>,
}

impl Root {
    /// Opens `path` as the root. `reserved` is a name (e.g. ".fsd-state") that is refused as any
    /// path component and hidden from listings. Probes openat2 once and fails with
    /// [`FsError::Unsupported`] if the kernel lacks it: there is no fallback to string checks.
    pub fn open(path: &Path, reserved: Option<String>) -> Result<Root, FsError> {
        let shown_path = path.display().to_string();
        if let Some(name) = &reserved {
            if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
                return Err(FsError::InvalidPath {
                    path: shown(name),
                    reason: "the reserved name must be one plain path component",
                });
            }
        }
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let dir = fcntl::open(path, flags, Mode::empty()).map_err(errno(&shown_path))?;
        // ENOSYS: no openat2; EPERM: a seccomp filter denies it; EINVAL/E2BIG: it lacks our
        // resolve flags or struct size. Opening "." beneath a directory we hold cannot otherwise
        // fail this way.
        match openat2(&dir, c".", beneath(OFlag::O_PATH | OFlag::O_DIRECTORY)) {
            Ok(_) => Ok(Root {
                dir,
                reserved,
                hidden: None,
            }),
            Err(e @ (Errno::ENOSYS | Errno::EPERM | Errno::EINVAL | Errno::E2BIG)) => {
                Err(FsError::Unsupported {
                    path: shown_path,
                    source: e.into(),
                })
            }
            Err(e) => Err(FsError::from_io(&shown_path, e.into())),
        }
    }

    /// A Root confined to the directory `prefix` beneath self (for credentials limited to a
    /// prefix). Paths are then resolved beneath the prefix's own fd, so a symlink inside the
    /// prefix that points elsewhere in the root is refused too. Same reserved name.
    pub fn sub(&self, prefix: &str) -> Result<Root, FsError> {
        let dir = self.open_beneath(prefix, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        Ok(Root {
            dir,
            reserved: self.reserved.clone(),
            hidden: self.hidden.clone(),
        })
    }

    /// Makes the directory `dir` (absolute, canonical) and everything beneath it unreachable,
    /// even through symlinks inside the root that lead there.
    pub fn hide(mut self, dir: std::path::PathBuf) -> Root {
        self.hidden = Some(dir);
        self
    }

    /// Lexical check of a client path: relative, no NUL, ≤ 4096 bytes, components separated by
    /// single '/', none empty, ".", ".." or the reserved name, each ≤ 255 bytes. "" and "." mean
    /// the root itself. Only a first line of clear errors: confinement is openat2's job.
    pub fn check(&self, path: &str) -> Result<(), FsError> {
        if is_root(path) {
            return Ok(());
        }
        let bad = |reason| {
            Err(FsError::InvalidPath {
                path: shown(path),
                reason,
            })
        };
        if path.len() > MAX_PATH_LEN {
            return bad("longer than 4096 bytes");
        }
        if path.contains('\0') {
            return bad("contains a NUL byte");
        }
        if path.starts_with('/') {
            return bad("absolute (paths are relative to the root)");
        }
        for component in path.split('/') {
            match component {
                "" => return bad("empty component (\"//\" or a trailing \"/\")"),
                "." => return bad("\".\" component"),
                ".." => return bad("\"..\" component"),
                c if c.len() > MAX_NAME_LEN => return bad("component longer than 255 bytes"),
                c if self.reserved.as_deref() == Some(c) => return bad("reserved name"),
                _ => {}
            }
        }
        Ok(())
    }

    /// Opens a regular file for reading. The final component is never followed
    /// ([`FsError::Symlink`]); a FIFO, socket or device is refused ([`FsError::NotAFile`]) without
    /// blocking, a directory with [`FsError::IsADirectory`]. Returns the (blocking) file and its
    /// metadata from fstat.
    pub fn open_read(&self, path: &str) -> Result<(File, Metadata), FsError> {
        self.check_target(path)?;
        // O_NONBLOCK: opening a FIFO would otherwise wait for a writer.
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        let fd = match self.open_beneath(path, flags) {
            Ok(fd) => fd,
            // O_NOFOLLOW meeting a final symlink is ELOOP too: say which one it was.
            Err(FsError::Escapes { .. }) if self.is_symlink(path) => {
                return Err(FsError::Symlink { path: shown(path) });
            }
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| FsError::from_io(path, e))?;
        if meta.is_dir() {
            return Err(FsError::IsADirectory { path: shown(path) });
        }
        if !meta.is_file() {
            return Err(FsError::NotAFile { path: shown(path) });
        }
        let flags = fcntl::fcntl(&file, FcntlArg::F_GETFL).map_err(errno(path))?;
        let flags = OFlag::from_bits_retain(flags) - OFlag::O_NONBLOCK;
        fcntl::fcntl(&file, FcntlArg::F_SETFL(flags)).map_err(errno(path))?;
        Ok((file, meta))
    }

    /// Stat without following a final symlink. `entry.name` is the path as given.
    pub fn stat(&self, path: &str) -> Result<msg::Entry, FsError> {
        self.check(path)?;
        if is_root(path) {
            // The root's own entry: its parent is not ours to open.
            return entry_at(self.dir.as_fd(), c".", path.to_owned(), path);
        }
        let (parent, leaf) = self.open_parent(path, OFlag::O_PATH)?;
        entry_at(parent.as_fd(), &leaf, path.to_owned(), path)
    }

    /// Lists a directory: entries sorted bytewise by name, only names after `after` (the last
    /// name of the previous page; "" for the first page), at most `limit`. Returns the entries,
    /// whether more remain, and how many names were left out because they are not UTF-8.
    /// Symlinks are reported as such with their text, never followed; the reserved name and
    /// non-UTF-8 names (logged and counted) are left out. The page comes from one of
    /// `cursors` when one still serves it, else from a scan that leaves a cursor for the next
    /// pages (see [`crate::fs::listing`]).
    pub fn list(
        &self,
        path: &str,
        after: &str,
        limit: usize,
        cursors: &mut ListCursors,
    ) -> Result<(Vec<msg::Entry>, bool, u32), FsError> {
        self.check(path)?;
        let fd = self.open_beneath(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
        // Before any readdir: a change during the scan then shows as a different stamp.
        let stamp = Stamp::of(&stat::fstat(&fd).map_err(errno(path))?);
        let mut dir = DirStream::new(fd).map_err(errno(path))?;
        let cursor = match cursors.take(path, &stamp, after, limit) {
            Some(cursor) => cursor,
            None => {
                let mut scan = cursors.scan(path, stamp, after, limit);
                while let Some(name) = dir.next_name() {
                    let name = name.map_err(errno(path))?;
                    let Ok(name) = name.into_string() else {
                        tracing::warn!(dir = %shown(path), "skipping a non-UTF-8 name in a listing");
                        scan.unlisted();
                        continue;
                    };
                    if self.reserved.as_deref() != Some(name.as_str()) {
                        scan.offer(name);
                    }
                }
                scan.into_cursor()
            }
        };
        let (names, more) = cursor.page(after, limit);
        let unlisted = cursor.unlisted();
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let child = if is_root(path) {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            let leaf = CString::new(name.as_str()).expect("readdir names hold no NUL");
            match entry_at(dir.as_fd(), &leaf, name.clone(), &child) {
                Ok(entry) => entries.push(entry),
                // Removed since readdir: it is simply no longer there.
                Err(FsError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if more {
            cursors.put(cursor);
        }
        Ok((entries, more, unlisted))
    }

    /// Creates a directory (`mode` & 0o777, minus the umask). With `parents`, missing ancestors
    /// are created too and an existing directory is fine (like `mkdir -p`).
    pub fn mkdir(&self, path: &str, parents: bool, mode: u32) -> Result<(), FsError> {
        // No setuid/setgid/sticky bits from a client.
        let mode = Mode::from_bits_truncate(mode & 0o777);
        if !parents {
            let (parent, leaf) = self.open_parent(path, OFlag::O_RDONLY)?;
            return stat::mkdirat(&parent, leaf.as_c_str(), mode).map_err(errno(path));
        }
        self.check_target(path)?;
        // Each prefix is resolved afresh from the root, so a component swapped for a symlink in
        // the meantime is judged by the kernel like any other.
        let ends = path.match_indices('/').map(|(i, _)| i).chain([path.len()]);
        for end in ends {
            let prefix = &path[..end];
            let (parent, leaf) = self.open_parent(prefix, OFlag::O_RDONLY)?;
            match stat::mkdirat(&parent, leaf.as_c_str(), mode) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(FsError::from_io(prefix, e.into())),
            }
        }
        // It existed already: fine if it is a directory (possibly via a symlink inside the root).
        match self.open_beneath(path, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(_) => Ok(()),
            Err(FsError::NotADirectory { .. }) => Err(FsError::AlreadyExists { path: shown(path) }),
            Err(e) => Err(e),
        }
    }

    /// Sets the mtime of the directory at `path` (MKDIR `mtime_ns`), resolved beneath the root
    /// like every path; its final component is never followed (O_NOFOLLOW with O_DIRECTORY:
    /// a symlink there is NotADirectory).
    pub fn set_dir_mtime(&self, path: &str, mtime_ns: i64) -> Result<(), FsError> {
        self.check_target(path)?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
        let fd = self.open_beneath(path, flags)?;
        let t = nix::sys::time::TimeSpec::new(
            mtime_ns.div_euclid(1_000_000_000),
            mtime_ns.rem_euclid(1_000_000_000),
        );
        stat::futimens(&fd, &nix::sys::time::TimeSpec::UTIME_OMIT, &t).map_err(errno(path))
    }

    /// Creates the symlink `path` → `target`, replacing a file or symlink there atomically (a
    /// new link under a temporary name in the same directory, renamed over it); a directory
    /// there is [`FsError::IsADirectory`]. `target` must stay beneath the root by name
    /// ([`crate::protocol::link_stays_within`]); nothing here ever follows it.
    pub fn symlink(&self, path: &str, target: &str) -> Result<(), FsError> {
        if !crate::protocol::link_stays_within(path, target) {
            return Err(FsError::InvalidPath {
                path: shown(path),
                reason: "link target must be relative and stay beneath the root",
            });
        }
        // The `..` a target may start with are counted from the link's directories by name:
        // with a symlink among them the link would sit elsewhere than its name says. A target
        // that only descends stays beneath its directory wherever that is.
        let (parent, leaf) = if target.split('/').any(|c| c == "..") {
            self.check_target(path)?;
            let (dir, leaf) = path.rsplit_once('/').unwrap_or(("", path));
            let no_links = beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_SYMLINKS,
            );
            let parent = openat2(&self.dir, &c_path(dir), no_links).map_err(errno(path))?;
            (parent, c_path(leaf))
        } else {
            self.open_parent(path, OFlag::O_RDONLY)?
        };
        let target_c = CString::new(target).map_err(|_| FsError::InvalidPath {
            path: shown(path),
            reason: "NUL in the link target",
        })?;
        match lstat_at(&parent, &leaf) {
            Err(Errno::ENOENT) => {
                match unistd::symlinkat(target_c.as_c_str(), &parent, leaf.as_c_str()) {
                    // Created meanwhile by someone else: replace it below, as if it had been there.
                    Err(Errno::EEXIST) => {}
                    r => return r.map_err(errno(path)),
                }
            }
            Err(e) => return Err(errno(path)(e)),
            Ok(st) if is_dir(&st) => return Err(FsError::IsADirectory { path: shown(path) }),
            Ok(_) => {}
        }
        let temp = c_path(&format!(
            ".fsd-link.{}.{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        unistd::symlinkat(target_c.as_c_str(), &parent, temp.as_c_str()).map_err(errno(path))?;
        let renamed = fcntl::renameat2(
            &parent,
            temp.as_c_str(),
            &parent,
            leaf.as_c_str(),
            RenameFlags::empty(),
        );
        if let Err(e) = renamed {
            let _ = unistd::unlinkat(&parent, temp.as_c_str(), UnlinkatFlags::NoRemoveDir);
            return Err(rename_error(path, e));
        }
        Ok(())
    }

    /// Removes a file, a symlink (not its target) or an empty directory; with `recursive`, a
    /// whole tree, never following a symlink: each entry is unlinked through its directory's fd.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FsError> {
        let (parent, leaf) = self.open_parent(path, OFlag::O_RDONLY)?;
        let st = lstat_at(&parent, &leaf).map_err(errno(path))?;
        if !is_dir(&st) {
            return unistd::unlinkat(&parent, leaf.as_c_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(errno(path));
        }
        if recursive {
            let dir = open_subdir(&parent, &leaf).map_err(errno(path))?;
            empty_tree(dir, path, 0)?;
        }
        unistd::unlinkat(&parent, leaf.as_c_str(), UnlinkatFlags::RemoveDir).map_err(errno(path))
    }

    /// Renames `from` to `to`, both beneath the root (renameat2 between the two confined
    /// parents); with `no_clobber` an existing `to` is refused ([`FsError::AlreadyExists`]).
    pub fn rename(&self, from: &str, to: &str, no_clobber: bool) -> Result<(), FsError> {
        let (from_dir, from_leaf) = self.open_parent(from, OFlag::O_RDONLY)?;
        let (to_dir, to_leaf) = self.open_parent(to, OFlag::O_RDONLY)?;
        let flags = if no_clobber {
            RenameFlags::RENAME_NOREPLACE
        } else {
            RenameFlags::empty()
        };
        let renamed = fcntl::renameat2(
            &from_dir,
            from_leaf.as_c_str(),
            &to_dir,
            to_leaf.as_c_str(),
            flags,
        );
        let renamed = match renamed {
            // EINVAL: a directory moving beneath itself, or a file system without
            // RENAME_NOREPLACE (GlusterFS, MooseFS). A file cannot hold anything, so for a file
            // it is the missing flag: link, which never replaces.
            Err(Errno::EINVAL) if no_clobber => {
                if !lstat_at(&from_dir, &from_leaf).is_ok_and(|st| is_dir(&st)) {
                    return move_without_clobbering(&from_dir, &from_leaf, &to_dir, &to_leaf)
                        .map_err(|e| match e {
                            Errno::ENOENT => FsError::from_io(from, e.into()),
                            _ => rename_error(to, e),
                        });
                }
                if !(to == from || to.starts_with(&format!("{from}/"))) {
                    return Err(FsError::NotSupportedHere {
                        path: shown(to),
                        what: "move a directory without replacing the destination (no RENAME_NOREPLACE), unless the move is beneath itself",
                    });
                }
                renamed
            }
            r => r,
        };
        renamed.map_err(|e| match e {
            // Both parents exist, so a missing entry is the source.
            Errno::ENOENT => FsError::from_io(from, e.into()),
            Errno::EINVAL => FsError::InvalidPath {
                path: shown(to),
                reason: "a directory cannot move beneath itself",
            },
            _ => rename_error(to, e),
        })
    }

    /// Publishes a finished upload: renames `src_name` in the server-owned directory `src_dir`
    /// (same file system) onto `dest` beneath the root. With `no_clobber` an existing `dest` is
    /// refused ([`FsError::AlreadyExists`]); an existing directory always is
    /// ([`FsError::IsADirectory`]). Returns the destination's directory: the caller makes the
    /// new name durable (fsync it, or a group sync). Where RENAME_NOREPLACE is missing, a
    /// no-clobber publish is a link and then an unlink of `src_name`: it has succeeded once the
    /// link is made, and `src_name` stays, a second name of the published file, if the unlink
    /// fails.
    pub fn publish(
        &self,
        src_dir: BorrowedFd<'_>,
        src_name: &CStr,
        dest: &str,
        no_clobber: bool,
    ) -> Result<OwnedFd, FsError> {
        let (parent, leaf) = self.publish_target(dest)?;
        let flags = if no_clobber {
            RenameFlags::RENAME_NOREPLACE
        } else {
            RenameFlags::empty()
        };
        match fcntl::renameat2(src_dir, src_name, &parent, leaf.as_c_str(), flags) {
            // No RENAME_NOREPLACE here (GlusterFS, MooseFS): link, which never replaces.
            Err(Errno::EINVAL) if no_clobber => {
                unistd::linkat(
                    src_dir,
                    src_name,
                    &parent,
                    leaf.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| rename_error(dest, e))?;
                // Published from here, whatever the unlink does: an error now would have the
                // caller take the upload up again, writing into what is the published file. A
                // name left is a second name of the published file, which the upload store
                // recognises by its link count and never writes.
                if let Err(e) = unistd::unlinkat(src_dir, src_name, UnlinkatFlags::NoRemoveDir) {
                    let name = src_name.to_string_lossy();
                    tracing::warn!(%name, error = %e, "published by link; the old name stays");
                }
                Ok(())
            }
            r => r,
        }
        .map_err(|e| rename_error(dest, e))?;
        Ok(parent)
    }

    /// Links what `dest` names now (never following it) as `name` in `dir`, a server-owned
    /// directory on the same file system: a publish that replaces it then only drops a name,
    /// and the old file's blocks are freed when that link is removed, off the COMMIT's path
    /// (freeing a 1 GiB file took 0.23 s on ext4 here). An error (nothing there, another file
    /// system, a file system without hard links) only means the publish frees it itself.
    pub fn keep_link(&self, dest: &str, dir: BorrowedFd<'_>, name: &CStr) -> Result<(), FsError> {
        let (parent, leaf) = self.open_parent(dest, OFlag::O_PATH)?;
        unistd::linkat(&parent, leaf.as_c_str(), dir, name, AtFlags::empty()).map_err(errno(dest))
    }

    /// [`Root::publish`] for an anonymous (O_TMPFILE) file: links it in as `dest`. Replacing an
    /// existing file links it under a private name in `spare_dir` (a server-owned directory on
    /// the same file system) and renames that over `dest`, so the swap stays atomic.
    pub fn publish_anonymous(
        &self,
        file: BorrowedFd<'_>,
        spare_dir: BorrowedFd<'_>,
        dest: &str,
        no_clobber: bool,
    ) -> Result<OwnedFd, FsError> {
        let (parent, leaf) = self.open_parent(dest, OFlag::O_RDONLY)?;
        let link = |dir: BorrowedFd<'_>, name: &CStr| link_anonymous(file, dir, name);
        match link(parent.as_fd(), &leaf) {
            Ok(()) => return Ok(parent),
            // Something is at the name: only now is it worth a look (a new name, the usual
            // case, costs no lstat).
            Err(Errno::EEXIST) if lstat_at(&parent, &leaf).is_ok_and(|st| is_dir(&st)) => {
                return Err(FsError::IsADirectory { path: shown(dest) })
            }
            Err(Errno::EEXIST) if !no_clobber => {}
            Err(e) => return Err(rename_error(dest, e)),
        }
        let spare = CString::new(format!("replace.{}", super::private_suffix())).unwrap();
        link(spare_dir, &spare).map_err(errno(dest))?;
        let moved = fcntl::renameat2(
            spare_dir,
            spare.as_c_str(),
            &parent,
            leaf.as_c_str(),
            RenameFlags::empty(),
        );
        if moved.is_err() {
            let _ = unistd::unlinkat(spare_dir, spare.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
        moved.map_err(|e| rename_error(dest, e))?;
        Ok(parent)
    }

    /// The directory a file is published into and its leaf name; an existing directory there
    /// is refused (the kernel would say EISDIR anyway, but not for every source).
    fn publish_target(&self, dest: &str) -> Result<(OwnedFd, CString), FsError> {
        // O_RDONLY, not O_PATH: fsync on an O_PATH fd fails with EBADF.
        let (parent, leaf) = self.open_parent(dest, OFlag::O_RDONLY)?;
        if lstat_at(&parent, &leaf).is_ok_and(|st| is_dir(&st)) {
            return Err(FsError::IsADirectory { path: shown(dest) });
        }
        Ok((parent, leaf))
    }

    /// Whether `path` exists (a final symlink is not followed: a dangling one exists).
    pub fn exists(&self, path: &str) -> Result<bool, FsError> {
        self.check(path)?;
        if is_root(path) {
            return Ok(true);
        }
        let found = self
            .open_parent(path, OFlag::O_PATH)
            .and_then(|(parent, leaf)| lstat_at(&parent, &leaf).map_err(errno(path)));
        match found {
            Ok(_) => Ok(true),
            Err(FsError::NotFound { .. } | FsError::NotADirectory { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// check(), and refuse the root itself: it cannot be opened as a file, created, removed or
    /// renamed.
    fn check_target(&self, path: &str) -> Result<(), FsError> {
        self.check(path)?;
        if is_root(path) {
            return Err(FsError::InvalidPath {
                path: path.to_owned(),
                reason: "the root itself",
            });
        }
        Ok(())
    }

    /// openat2 of a checked path beneath the root.
    fn open_beneath(&self, path: &str, flags: OFlag) -> Result<OwnedFd, FsError> {
        self.check(path)?;
        if self.hidden.is_some() {
            // Without a symlink on the way the kernel lands where the path says, and `check`
            // has already refused the state directory's name as any component: no need to ask
            // /proc where it landed (that readlink was 11 % of fsd's CPU on a 100,000-file
            // upload). A symlink on the way (ELOOP) takes the checked path below.
            let no_links = beneath(flags).resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_SYMLINKS,
            );
            match openat2(&self.dir, &c_path(path), no_links) {
                Err(Errno::ELOOP) => {}
                r => return r.map_err(errno(path)),
            }
        }
        let fd = openat2(&self.dir, &c_path(path), beneath(flags)).map_err(errno(path))?;
        if let Some(hidden) = &self.hidden {
            // Where the kernel actually landed, whatever symlinks led there.
            let landed = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| FsError::from_io(path, e))?;
            if landed.starts_with(hidden) {
                return Err(FsError::InvalidPath {
                    path: shown(path),
                    reason: "leads into the server's state directory",
                });
            }
        }
        Ok(fd)
    }

    /// The parent directory of a (non-root) path, opened beneath the root with `flags` |
    /// O_DIRECTORY, and the leaf name to act on inside it.
    fn open_parent(&self, path: &str, flags: OFlag) -> Result<(OwnedFd, CString), FsError> {
        self.check_target(path)?;
        let (dir, leaf) = path.rsplit_once('/').unwrap_or(("", path));
        let fd = self.open_beneath(dir, flags | OFlag::O_DIRECTORY)?;
        Ok((fd, c_path(leaf)))
    }

    /// Whether the final component of `path` is a symlink (false when it cannot be told).
    fn is_symlink(&self, path: &str) -> bool {
        self.open_parent(path, OFlag::O_PATH)
            .is_ok_and(|(parent, leaf)| {
                lstat_at(&parent, &leaf).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            })
    }
}

/// Moves `from` to `to` without ever replacing `to`, where RENAME_NOREPLACE is missing: a hard
/// link (EEXIST if `to` exists: exactly one of racing linkers wins, on every engine tried) and
/// then the old name's removal. Files only: a directory cannot be hard-linked.
fn move_without_clobbering(
    from_dir: impl AsFd,
    from: &CStr,
    to_dir: impl AsFd,
    to: &CStr,
) -> Result<(), Errno> {
    unistd::linkat(from_dir.as_fd(), from, to_dir.as_fd(), to, AtFlags::empty())?;
    unistd::unlinkat(from_dir.as_fd(), from, UnlinkatFlags::NoRemoveDir)
}

/// A rename's error, reported on the destination `path`. EXDEV from a rename is a move across
/// file systems (both parents were already resolved beneath the root), not an escape.
fn rename_error(path: &str, e: Errno) -> FsError {
    match e {
        Errno::EXDEV => FsError::Io {
            path: shown(path),
            source: e.into(),
        },
        _ => FsError::from_io(path, e.into()),
    }
}

/// Opens the directory `name` inside `dir`, refusing a symlink even one swapped in just now
/// (O_NOFOLLOW, and RESOLVE_NO_SYMLINKS for good measure).
fn open_subdir(dir: impl AsFd, name: &CStr) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, name, how)
}

/// Removes everything inside the directory `dir` (shown as `path` in errors), depth first.
fn empty_tree(dir: OwnedFd, path: &str, depth: usize) -> Result<(), FsError> {
    if depth >= MAX_REMOVE_DEPTH {
        let source = io::Error::other("directory tree too deep to remove");
        return Err(FsError::Io {
            path: shown(path),
            source,
        });
    }
    let (dir, names) = DirStream::new(dir)
        .and_then(DirStream::names)
        .map_err(errno(path))?;
    for name in names {
        let child = format!("{path}/{}", name.to_string_lossy());
        // Unlink first: Linux answers EISDIR for a directory, which saves an lstat per file.
        match unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => continue,
            Err(Errno::EISDIR) => {}
            Err(e) => return Err(FsError::from_io(&child, e.into())),
        }
        let sub = open_subdir(&dir, &name).map_err(errno(&child))?;
        empty_tree(sub, &child, depth + 1)?;
        match unistd::unlinkat(&dir, name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(FsError::from_io(&child, e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, MetadataExt};
    use std::path::PathBuf;
    use std::time::Duration;

    const RESERVED: &str = ".fsd-state";

    /// A temp dir holding `root/` (the [`Root`]), `outside/` (with `secret` = "OUTSIDE") and
    /// `state/` (server-owned, for publish). On drop it checks that nothing outside `root/` and
    /// `state/` changed, so every test also proves it wrote nothing beyond the root.
    struct Fixture {
        tmp: tempfile::TempDir,
        root: Root,
        before: BTreeMap<PathBuf, String>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            for dir in ["root", "outside", "outside/dir", "state"] {
                fs::create_dir(tmp.path().join(dir)).unwrap();
            }
            fs::write(tmp.path().join("outside/secret"), "OUTSIDE").unwrap();
            fs::write(tmp.path().join("outside/dir/secret"), "OUTSIDE").unwrap();
            let root = Root::open(&tmp.path().join("root"), Some(RESERVED.into())).unwrap();
            let before = snapshot(tmp.path());
            Fixture { tmp, root, before }
        }

        /// A path inside root/ on the real file system, for setting up and checking.
        fn at(&self, rel: &str) -> PathBuf {
            self.tmp.path().join("root").join(rel)
        }

        fn outside(&self) -> PathBuf {
            self.tmp.path().join("outside")
        }

        fn write(&self, rel: &str, contents: &str) {
            fs::write(self.at(rel), contents).unwrap();
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.at(rel)).unwrap();
        }

        fn link(&self, rel: &str, target: impl AsRef<Path>) {
            symlink(target, self.at(rel)).unwrap();
        }

        fn read(&self, path: &str) -> Result<String, FsError> {
            let (mut file, _) = self.root.open_read(path)?;
            let mut text = String::new();
            file.read_to_string(&mut text).unwrap();
            Ok(text)
        }

        fn state_dir(&self) -> OwnedFd {
            let path = self.tmp.path().join("state");
            fcntl::open(
                &path,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                assert_eq!(
                    snapshot(self.tmp.path()),
                    self.before,
                    "something outside root/ changed"
                );
            }
        }
    }

    /// Everything under `top` except root/ and state/: kind, inode, contents, link text.
    fn snapshot(top: &Path) -> BTreeMap<PathBuf, String> {
        fn walk(top: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(top).unwrap().to_owned();
                if rel == Path::new("root") || rel == Path::new("state") {
                    continue;
                }
                let meta = fs::symlink_metadata(&path).unwrap();
                let desc = if meta.is_symlink() {
                    format!("link {:?}", fs::read_link(&path).unwrap())
                } else if meta.is_dir() {
                    walk(top, &path, out);
                    format!("dir {}", meta.ino())
                } else {
                    format!("file {} {:?}", meta.ino(), fs::read(&path).unwrap())
                };
                out.insert(rel, desc);
            }
        }
        let mut out = BTreeMap::new();
        walk(top, top, &mut out);
        out
    }

    fn code<T: std::fmt::Debug>(r: Result<T, FsError>) -> ErrorCode {
        r.unwrap_err().code()
    }

    /// A listing that keeps no cursor for the next page.
    fn list(
        root: &Root,
        path: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<msg::Entry>, bool), FsError> {
        root.list(path, after, limit, &mut ListCursors::default())
            .map(|(entries, more, _)| (entries, more))
    }

    fn names(entries: &[msg::Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.name.as_str()).collect()
    }

    fn bad_paths() -> Vec<String> {
        let mut paths: Vec<String> = [
            "/",
            "/abs",
            "/etc/passwd",
            "//",
            "a//b",
            "a/",
            "a/b/",
            "./a",
            "a/.",
            "a/./b",
            "..",
            "../x",
            "a/..",
            "a/../b",
            "../../etc/passwd",
            "x\0y",
            "\0",
            ".fsd-state",
            ".fsd-state/x",
            "a/.fsd-state",
            "a/b/.fsd-state/c",
        ]
        .map(String::from)
        .into();
        paths.push(format!("{}b", "a/".repeat(2048))); // 4097 bytes
        paths.push("x".repeat(256));
        paths.push(format!("a/{}/b", "x".repeat(256)));
        // ".." and "." in every position of a four-component path.
        for dots in ["..", "."] {
            for i in 0..4 {
                let mut parts = ["a", "b", "c", "d"];
                parts[i] = dots;
                paths.push(parts.join("/"));
            }
        }
        paths
    }

    #[test]
    fn check_refuses_every_lexically_bad_path() {
        let f = Fixture::new();
        for path in bad_paths() {
            let err = f.root.check(&path).unwrap_err();
            assert!(
                matches!(err, FsError::InvalidPath { .. }),
                "{path:?}: {err}"
            );
            assert_eq!(err.code(), ErrorCode::InvalidPath);
        }
        let long17 = vec!["x".repeat(240); 17].join("/");
        assert_eq!(long17.len(), 4096);
        for ok in [
            "",
            ".",
            "a",
            "a/b",
            "...",
            "..a",
            "a..",
            ".hidden",
            ".fsd-state2",
            &"x".repeat(255),
            &long17,
        ] {
            f.root.check(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        // Without a reserved name, the state directory's name is an ordinary name.
        let plain = Root::open(&f.at(""), None).unwrap();
        plain.check(RESERVED).unwrap();
        assert!(
            matches!(f.root.check(&"x".repeat(5000)), Err(FsError::InvalidPath { path, .. }) if path.len() < 600)
        );
    }

    #[test]
    fn every_operation_refuses_bad_paths_and_changes_nothing() {
        let f = Fixture::new();
        f.write("ok", "ok");
        f.mkdir("a/b/c/d");
        fs::write(f.tmp.path().join("state/staged"), "new").unwrap();
        let state = f.state_dir();
        for path in bad_paths() {
            let p = path.as_str();
            let invalid =
                |what: &str, c: ErrorCode| assert_eq!(c, ErrorCode::InvalidPath, "{what} {p:?}");
            invalid("open_read", code(f.root.open_read(p)));
            invalid("stat", code(f.root.stat(p)));
            invalid("list", code(list(&f.root, p, "", 10)));
            invalid("mkdir", code(f.root.mkdir(p, false, 0o755)));
            invalid("mkdir -p", code(f.root.mkdir(p, true, 0o755)));
            invalid("remove", code(f.root.remove(p, false)));
            invalid("remove -r", code(f.root.remove(p, true)));
            invalid("rename from", code(f.root.rename(p, "moved", false)));
            invalid("rename to", code(f.root.rename("ok", p, false)));
            invalid(
                "publish",
                code(f.root.publish(state.as_fd(), c"staged", p, false)),
            );
            invalid("exists", code(f.root.exists(p)));
            invalid("sub", code(f.root.sub(p)));
        }
        assert_eq!(fs::read_to_string(f.at("ok")).unwrap(), "ok");
        assert!(f.at("a/b/c/d").is_dir());
        assert!(!f.at("moved").exists());
        assert!(f.tmp.path().join("state/staged").exists());
        assert!(!f.at(RESERVED).exists());
    }

    #[test]
    fn the_root_itself_is_only_listed_and_stated() {
        let f = Fixture::new();
        f.write("x", "x");
        fs::write(f.tmp.path().join("state/staged"), "new").unwrap();
        let state = f.state_dir();
        for root in ["", "."] {
            assert_eq!(f.root.stat(root).unwrap().kind, msg::Kind::Dir as i32);
            assert_eq!(f.root.stat(root).unwrap().name, root);
            assert_eq!(names(&list(&f.root, root, "", 10).unwrap().0), ["x"]);
            assert!(f.root.exists(root).unwrap());
            assert_eq!(code(f.root.open_read(root)), ErrorCode::InvalidPath);
            assert_eq!(
                code(f.root.mkdir(root, false, 0o755)),
                ErrorCode::InvalidPath
            );
            assert_eq!(
                code(f.root.mkdir(root, true, 0o755)),
                ErrorCode::InvalidPath
            );
            assert_eq!(code(f.root.remove(root, true)), ErrorCode::InvalidPath);
            assert_eq!(
                code(f.root.rename(root, "y", false)),
                ErrorCode::InvalidPath
            );
            assert_eq!(
                code(f.root.rename("x", root, false)),
                ErrorCode::InvalidPath
            );
            assert_eq!(
                code(f.root.publish(state.as_fd(), c"staged", root, false)),
                ErrorCode::InvalidPath
            );
        }
        assert!(f.at("x").is_file());
        assert!(f.tmp.path().join("state/staged").is_file());
    }

    #[test]
    fn open_refuses_bad_roots_and_reserved_names() {
        let f = Fixture::new();
        f.write("file", "x");
        assert!(matches!(
            Root::open(&f.at("missing"), None),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            Root::open(&f.at("file"), None),
            Err(FsError::NotADirectory { .. })
        ));
        for reserved in ["", "a/b", ".", "..", "x\0"] {
            let r = Root::open(&f.at(""), Some(reserved.into()));
            assert!(
                matches!(r, Err(FsError::InvalidPath { .. })),
                "{reserved:?}"
            );
        }
    }

    #[test]
    fn reserved_name_is_refused_at_any_depth_and_hidden_from_listings() {
        let f = Fixture::new();
        f.mkdir(".fsd-state/uploads");
        f.mkdir("a/.fsd-state");
        f.write("a/f", "f");
        assert_eq!(names(&list(&f.root, "", "", 10).unwrap().0), ["a"]);
        assert_eq!(names(&list(&f.root, "a", "", 10).unwrap().0), ["f"]);
        for path in [".fsd-state", ".fsd-state/uploads", "a/.fsd-state"] {
            assert_eq!(code(f.root.stat(path)), ErrorCode::InvalidPath);
            assert_eq!(code(f.root.remove(path, true)), ErrorCode::InvalidPath);
            assert_eq!(
                code(f.root.rename("a/f", path, false)),
                ErrorCode::InvalidPath
            );
        }
        assert!(f.at(".fsd-state/uploads").is_dir());
        assert!(f.at("a/.fsd-state").is_dir());
        assert!(f.at("a/f").is_file());
    }

    #[test]
    fn final_symlink_out_of_the_root_is_shown_never_followed() {
        let f = Fixture::new();
        f.link("pw", "/etc/passwd");
        f.link("up", "../outside/secret");
        f.link("dangling", "nowhere");
        for path in ["pw", "up"] {
            let err = f.root.open_read(path).unwrap_err();
            assert!(matches!(err, FsError::Symlink { .. }), "{path}: {err}");
            assert_eq!(err.code(), ErrorCode::NotAFile);
        }
        assert!(matches!(
            f.root.open_read("dangling"),
            Err(FsError::Symlink { .. })
        ));
        let entry = f.root.stat("pw").unwrap();
        assert_eq!(entry.kind, msg::Kind::Symlink as i32);
        assert_eq!(entry.target, "/etc/passwd");
        assert_eq!(entry.size, "/etc/passwd".len() as u64);
        let (entries, more) = list(&f.root, "", "", 10).unwrap();
        assert!(!more);
        assert_eq!(names(&entries), ["dangling", "pw", "up"]);
        assert!(entries.iter().all(|e| e.kind == msg::Kind::Symlink as i32));
        assert_eq!(entries[2].target, "../outside/secret");
        assert!(f.root.exists("dangling").unwrap());
    }

    #[test]
    fn symlink_out_of_the_root_as_an_intermediate_component_is_refused() {
        let f = Fixture::new();
        f.link("etc", "/etc");
        f.link("abs", f.outside());
        f.link("rel", "../outside");
        f.mkdir("d");
        f.link("d/deep", "../../outside");
        fs::write(f.tmp.path().join("state/staged"), "new").unwrap();
        let state = f.state_dir();
        let escapes = |what: &str, r: Result<(), FsError>| {
            let err = r.unwrap_err();
            assert!(matches!(err, FsError::Escapes { .. }), "{what}: {err}");
            assert_eq!(err.code(), ErrorCode::InvalidPath);
        };
        escapes("etc/passwd", f.root.open_read("etc/passwd").map(drop));
        for dir in ["abs", "rel", "d/deep"] {
            let secret = format!("{dir}/secret");
            escapes("open_read", f.root.open_read(&secret).map(drop));
            escapes("stat", f.root.stat(&secret).map(drop));
            escapes("list", list(&f.root, dir, "", 10).map(drop));
            escapes("exists", f.root.exists(&secret).map(drop));
            escapes("mkdir", f.root.mkdir(&format!("{dir}/new"), false, 0o755));
            escapes(
                "mkdir -p",
                f.root.mkdir(&format!("{dir}/new/deeper"), true, 0o755),
            );
            escapes("remove", f.root.remove(&secret, false));
            escapes("remove -r", f.root.remove(&format!("{dir}/dir"), true));
            escapes("rename from", f.root.rename(&secret, "stolen", false));
            f.write("mine", "mine");
            escapes(
                "rename to",
                f.root.rename("mine", &format!("{dir}/planted"), false),
            );
            escapes(
                "publish",
                f.root
                    .publish(state.as_fd(), c"staged", &secret, false)
                    .map(drop),
            );
            let anonymous = fcntl::openat(
                &state,
                c".",
                OFlag::O_TMPFILE | OFlag::O_RDWR,
                Mode::from_bits_truncate(0o600),
            )
            .unwrap();
            escapes(
                "publish_anonymous",
                f.root
                    .publish_anonymous(anonymous.as_fd(), state.as_fd(), &secret, false)
                    .map(drop),
            );
            escapes(
                "sub",
                f.root
                    .sub(dir)
                    .and_then(|s| s.open_read("secret"))
                    .map(drop),
            );
        }
        assert!(!f.at("stolen").exists());
        assert!(f.tmp.path().join("state/staged").exists());
        // Drop: outside/ is exactly as it was.
    }

    #[test]
    fn magic_links_are_refused() {
        let f = Fixture::new();
        let secret = File::open(f.outside().join("secret")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&secret);
        f.link("proc_root", "/proc/self/root");
        f.link("fd", format!("/proc/self/fd/{fd}"));
        f.link("fds", "/proc/self/fd");
        assert!(matches!(
            f.root.open_read("proc_root/etc/passwd"),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            list(&f.root, "proc_root", "", 10),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            f.root.open_read("fd"),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            f.root.open_read(&format!("fds/{fd}")),
            Err(FsError::Escapes { .. })
        ));

        // Magic links *beneath* the root: only RESOLVE_NO_MAGICLINKS stands between "root/..."
        // and the whole file system when the root holds a procfs.
        let proc = Root::open(Path::new("/proc/self"), None).unwrap();
        for path in ["root/etc/passwd", "cwd/Cargo.toml", "exe"] {
            assert!(proc.open_read(path).is_err(), "{path}");
        }
        assert!(matches!(
            proc.open_read("root/etc/passwd"),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            proc.open_read(&format!("fd/{fd}")),
            Err(FsError::Symlink { .. })
        ));
        assert!(matches!(
            list(&proc, "root", "", 10),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            list(&proc, "cwd", "", 10),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(proc.sub("root"), Err(FsError::Escapes { .. })));
        // Reading an ordinary procfs file through the same root works, so the refusals above are
        // about the magic links.
        assert!(proc.open_read("status").is_ok());
    }

    #[test]
    fn symlinks_within_the_root() {
        let f = Fixture::new();
        f.write("real", "inside");
        f.link("alias", "real");
        f.mkdir("d");
        f.write("d/f", "in d");
        f.link("dl", "d");
        f.mkdir("e");
        f.link("e/up", "../d");
        f.link("abs", f.at("d"));
        // A final symlink is never followed, even one pointing inside the root.
        assert!(matches!(
            f.root.open_read("alias"),
            Err(FsError::Symlink { .. })
        ));
        // As an intermediate directory it resolves, as long as it stays beneath the root.
        assert_eq!(f.read("dl/f").unwrap(), "in d");
        assert_eq!(f.read("e/up/f").unwrap(), "in d");
        assert_eq!(names(&list(&f.root, "dl", "", 10).unwrap().0), ["f"]);
        f.root.mkdir("dl/new", false, 0o755).unwrap();
        assert!(f.at("d/new").is_dir());
        // An absolute link is refused even when it names a place inside the root: RESOLVE_BENEATH
        // judges the path, not where it lands.
        assert!(matches!(
            f.root.open_read("abs/f"),
            Err(FsError::Escapes { .. })
        ));
        // A loop is refused, not followed forever.
        f.link("loop1", "loop2");
        f.link("loop2", "loop1");
        assert!(matches!(
            f.root.open_read("loop1/x"),
            Err(FsError::Escapes { .. })
        ));
    }

    /// The links SYMLINK creates stay beneath the root even through one another: a `..` after
    /// a name (which may be a link) is refused, and so is a link whose directory is reached
    /// through a link (its `..` would climb from elsewhere than its name says).
    #[test]
    fn created_links_cannot_chain_out_of_the_root() {
        let f = Fixture::new();
        f.mkdir("a");
        f.root.symlink("a/s", "..").unwrap();
        f.root.symlink("l", ".").unwrap();
        // By name "a/s/y" -> "../x" is the root's x; on disk a/s is the root, so it would be
        // the root's sibling x.
        assert!(f.root.symlink("a/s/y", "../x").is_err());
        assert!(f.root.symlink("m", "l/..").is_err());
        assert!(f.root.symlink("a/up", "s/../x").is_err());
        for name in ["a/s/y", "m", "a/up", "y"] {
            assert!(fs::symlink_metadata(f.at(name)).is_err(), "{name} created");
        }
        // Climbing first, then descending, through links or not, is fine; so is a link that
        // only descends, in a directory reached through a link.
        f.root.symlink("a/ok", "../l/a").unwrap();
        f.root.symlink("a/s/down", "a/ok").unwrap();
        assert_eq!(fs::read_link(f.at("down")).unwrap(), Path::new("a/ok"));
    }

    /// openat2 cannot see hard links: a hard link inside the root to a file outside it is just a
    /// file inside the root. Only the operator can prevent that (and, unprivileged, only the
    /// file's owner can make one under fs.protected_hardlinks). This test documents the gap.
    #[test]
    fn hardlinks_are_files_inside_the_root() {
        let f = Fixture::new();
        fs::hard_link(f.outside().join("secret"), f.at("hl")).unwrap();
        assert_eq!(f.read("hl").unwrap(), "OUTSIDE");
        fs::remove_file(f.at("hl")).unwrap();
    }

    #[test]
    fn fifos_sockets_and_devices_are_not_files_and_do_not_hang() {
        let f = Fixture::new();
        unistd::mkfifo(&f.at("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(f.at("sock")).unwrap();
        let null = stat::mknod(
            &f.at("null"),
            stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            libc::makedev(1, 3),
        );
        f.link("devnull", "/dev/null");
        f.link("dev", "/dev");
        f.mkdir("dir");

        let root = Root::open(&f.at(""), None).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let results = [
                "fifo", "sock", "null", "devnull", "dev/null", "dev/zero", "dir",
            ]
            .map(|path| (path, root.open_read(path).map(drop)));
            tx.send(results).unwrap();
        });
        let results = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("open_read hung");
        for (path, result) in results {
            let err = match result {
                Err(e) => e,
                Ok(()) => panic!("{path}: opened"),
            };
            match path {
                "fifo" | "sock" => {
                    assert!(matches!(err, FsError::NotAFile { .. }), "{path}: {err}")
                }
                // A device node on a nodev mount fails with EACCES before the type check.
                "null" if null.is_ok() => {
                    assert!(
                        matches!(
                            err,
                            FsError::NotAFile { .. } | FsError::PermissionDenied { .. }
                        ),
                        "{err}"
                    )
                }
                "null" => assert!(matches!(err, FsError::NotFound { .. })), // no CAP_MKNOD here
                "devnull" => assert!(matches!(err, FsError::Symlink { .. })),
                "dev/null" | "dev/zero" => assert!(matches!(err, FsError::Escapes { .. })),
                "dir" => assert!(matches!(err, FsError::IsADirectory { .. })),
                _ => unreachable!(),
            }
        }
        assert_eq!(f.root.stat("fifo").unwrap().kind, msg::Kind::Other as i32);
        assert_eq!(f.root.stat("sock").unwrap().kind, msg::Kind::Other as i32);
    }

    #[test]
    fn open_read_returns_a_blocking_file_and_its_metadata() {
        let f = Fixture::new();
        f.write("f", "hello");
        let (file, meta) = f.root.open_read("f").unwrap();
        assert_eq!(meta.len(), 5);
        let flags = OFlag::from_bits_retain(fcntl::fcntl(&file, FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_NONBLOCK));
        assert!(matches!(
            f.root.open_read("missing"),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            f.root.open_read("f/x"),
            Err(FsError::NotADirectory { .. })
        ));
    }

    #[test]
    fn list_sorts_bytewise_and_pages() {
        let f = Fixture::new();
        let mut expected = vec!["b", "a", "c", "B", "é", "aa", "a b", "_", "Z9", "z"];
        for name in &expected {
            f.write(name, name);
        }
        f.mkdir("sub");
        f.link("ln", "a");
        f.mkdir(RESERVED);
        let bad = f.at("").join(std::ffi::OsStr::from_bytes(b"bad\xff"));
        fs::write(&bad, "x").unwrap();
        expected.extend(["sub", "ln"]);
        expected.sort();

        let (all, more, unlisted) = f
            .root
            .list("", "", 1000, &mut ListCursors::default())
            .unwrap();
        assert!(!more);
        assert_eq!(names(&all), expected);
        // The non-UTF-8 name is left out, and counted for the client to report.
        assert_eq!(unlisted, 1);
        let sub = all.iter().find(|e| e.name == "sub").unwrap();
        assert_eq!(sub.kind, msg::Kind::Dir as i32);
        let ln = all.iter().find(|e| e.name == "ln").unwrap();
        assert_eq!(
            (ln.kind, ln.target.as_str()),
            (msg::Kind::Symlink as i32, "a")
        );
        let aa = all.iter().find(|e| e.name == "aa").unwrap();
        let meta = fs::metadata(f.at("aa")).unwrap();
        assert_eq!(aa.kind, msg::Kind::File as i32);
        assert_eq!(aa.size, 2);
        assert_eq!(aa.mode, meta.mode() & 0o7777);
        assert_eq!(
            aa.mtime_ns,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
        );

        for limit in [1, 3, 5, 12, 13] {
            let (mut seen, mut after) = (Vec::new(), String::new());
            loop {
                let (page, more) = list(&f.root, "", &after, limit).unwrap();
                assert!(page.len() <= limit);
                seen.extend(page.iter().map(|e| e.name.clone()));
                if !more {
                    break;
                }
                assert_eq!(page.len(), limit);
                after = page.last().unwrap().name.clone();
            }
            assert_eq!(seen, expected, "limit {limit}");
        }
        assert_eq!(list(&f.root, "", "", 0).unwrap(), (vec![], true));
        assert_eq!(list(&f.root, "", "é", 10).unwrap(), (vec![], false));
        assert_eq!(names(&list(&f.root, "", "ab", 2).unwrap().0), ["b", "c"]);
        assert!(matches!(
            list(&f.root, "aa", "", 10),
            Err(FsError::NotADirectory { .. })
        ));
        assert!(matches!(
            list(&f.root, "missing", "", 10),
            Err(FsError::NotFound { .. })
        ));
        assert_eq!(list(&f.root, "sub", "", 10).unwrap(), (vec![], false));
    }

    /// Pages through `dir` with `limit`-name pages and one set of cursors, checking each page:
    /// names ascending, full pages while `more`, at most `max_pages` pages. Returns the names.
    fn page_through(
        root: &Root,
        dir: &str,
        limit: usize,
        cursors: &mut ListCursors,
        max_pages: usize,
    ) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..max_pages {
            let after = seen.last().cloned().unwrap_or_default();
            let (page, more, _) = root.list(dir, &after, limit, cursors).unwrap();
            for e in page {
                assert!(e.name > after, "{:?} served after {after:?}", e.name);
                seen.push(e.name);
            }
            if !more {
                return seen;
            }
            assert_eq!(seen.len() % limit, 0, "a short page with more = true");
        }
        panic!("{dir:?} not listed in {max_pages} pages of {limit}");
    }

    /// Creates `n` files `big/f00000`.. (and the names a listing leaves out), then waits until
    /// the directory's last change is older than `listing::RACY`, so its cursors are kept.
    fn big_dir(f: &Fixture, n: usize) -> Vec<String> {
        f.mkdir("big");
        f.mkdir(&format!("big/{RESERVED}"));
        fs::write(
            f.at("big").join(std::ffi::OsStr::from_bytes(b"bad\xff")),
            "x",
        )
        .unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("f{i:05}")).collect();
        for name in &names {
            fs::File::create(f.at("big").join(name)).unwrap();
        }
        std::thread::sleep(crate::fs::listing::RACY + Duration::from_millis(100));
        names
    }

    #[test]
    fn paging_a_big_directory_reads_it_a_bounded_number_of_times() {
        let f = Fixture::new();
        let all = big_dir(&f, 20_000);

        // 300 pages of one name: one scan (today's cursor holds ~8,700 such names), where
        // listing without cursors reads the directory once per page.
        let mut cursors = ListCursors::default();
        let mut after = String::new();
        for expected in &all[..300] {
            let (page, more, _) = f.root.list("big", &after, 1, &mut cursors).unwrap();
            assert_eq!(names(&page), [expected.as_str()]);
            assert!(more);
            after = page[0].name.clone();
        }
        assert!(
            cursors.scans() <= 2,
            "{} scans for 300 pages",
            cursors.scans()
        );

        // All of it, in pages that end exactly at the end: each scan serves thousands of pages.
        for limit in [1, 8, 4000] {
            let mut cursors = ListCursors::default();
            let seen = page_through(&f.root, "big", limit, &mut cursors, 20_001);
            assert_eq!(seen, all, "limit {limit}");
            assert!(
                cursors.scans() <= 5,
                "limit {limit}: {} scans",
                cursors.scans()
            );
        }
    }

    #[test]
    fn a_change_between_pages_is_seen_by_the_next_page() {
        let f = Fixture::new();
        let mut expected = big_dir(&f, 100);
        let mut cursors = ListCursors::default();
        let (first, _, unlisted) = f.root.list("big", "", 10, &mut cursors).unwrap();
        // A page served from the kept cursor still counts what was left out.
        let (second, _, unlisted_later) = f.root.list("big", "f00009", 10, &mut cursors).unwrap();
        assert_eq!((unlisted, unlisted_later), (1, 1));
        assert_eq!(names(&second), expected[10..20]);
        assert_eq!(cursors.scans(), 1);

        // Ahead of the position: one created, one removed; behind it: one created (missed, as
        // it always was with stateless paging).
        f.write("big/f00050a", "new");
        fs::remove_file(f.at("big/f00060")).unwrap();
        f.write("big/f00001a", "behind");
        let mut seen: Vec<String> = first.into_iter().chain(second).map(|e| e.name).collect();
        for _ in 0..100 {
            let after = seen.last().unwrap().clone();
            let (page, more, _) = f.root.list("big", &after, 10, &mut cursors).unwrap();
            seen.extend(page.into_iter().map(|e| e.name));
            if !more {
                break;
            }
        }
        expected.retain(|n| n != "f00060");
        expected.push("f00050a".into());
        expected.sort();
        assert_eq!(seen, expected);
        // The change made the next page read the directory again (and, as it changed so
        // recently, the pages after it too: no cursor is trusted within listing::RACY).
        assert!(cursors.scans() >= 2);

        // Once the directory is quiet again, cursors are kept again.
        std::thread::sleep(crate::fs::listing::RACY + Duration::from_millis(100));
        expected.insert(2, "f00001a".into());
        let mut cursors = ListCursors::default();
        assert_eq!(page_through(&f.root, "big", 10, &mut cursors, 11), expected);
        assert_eq!(cursors.scans(), 1);
    }

    /// What paging costs (no assertions on time): LIST_BENCH_N entries (default 200,000), then
    /// LIST_BENCH_PAGES pages of one name (default 2,000) with cursors, and a tenth as many
    /// reading the directory for every page as fsd did before cursors. Run with
    /// `cargo test -p fsd --lib --config 'profile.dev.package.fsd.opt-level=3' -- --ignored
    /// list_paging_cost --nocapture`.
    #[test]
    #[ignore]
    fn list_paging_cost() {
        let var = |name, default| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (n, pages) = (var("LIST_BENCH_N", 200_000), var("LIST_BENCH_PAGES", 2_000));
        let f = Fixture::new();
        big_dir(&f, n);
        let run = |pages: usize, keep_cursors: bool| {
            let mut cursors = ListCursors::default();
            let mut scans = 0;
            let mut after = String::new();
            let start = std::time::Instant::now();
            for _ in 0..pages {
                if !keep_cursors {
                    scans += cursors.scans();
                    cursors = ListCursors::default();
                }
                let (page, more, _) = f.root.list("big", &after, 1, &mut cursors).unwrap();
                assert!(more && page.len() == 1);
                after = page[0].name.clone();
            }
            let took = start.elapsed();
            scans += cursors.scans();
            eprintln!(
                "{n} entries, {pages} pages of 1, cursors {keep_cursors}: {took:.2?} \
                 ({:.1?}/page), {scans} scans",
                took / pages as u32
            );
        };
        run(pages, true);
        run(pages / 10, false);
    }

    #[test]
    fn mkdir_with_and_without_parents() {
        let f = Fixture::new();
        assert!(matches!(
            f.root.mkdir("a/b", false, 0o755),
            Err(FsError::NotFound { .. })
        ));
        f.root.mkdir("a", false, 0o700).unwrap();
        assert_eq!(fs::metadata(f.at("a")).unwrap().mode() & 0o777, 0o700);
        assert!(matches!(
            f.root.mkdir("a", false, 0o755),
            Err(FsError::AlreadyExists { .. })
        ));
        f.root.mkdir("a/b/c/d", true, 0o755).unwrap();
        assert!(f.at("a/b/c/d").is_dir());
        f.root.mkdir("a/b/c/d", true, 0o755).unwrap();
        // Setuid/setgid/sticky bits are not a client's to set.
        f.root.mkdir("s", false, 0o7777).unwrap();
        assert_eq!(fs::metadata(f.at("s")).unwrap().mode() & 0o7000, 0);
        f.write("file", "x");
        assert!(matches!(
            f.root.mkdir("file", true, 0o755),
            Err(FsError::AlreadyExists { .. })
        ));
        assert!(matches!(
            f.root.mkdir("file/x", true, 0o755),
            Err(FsError::NotADirectory { .. })
        ));
        assert!(matches!(
            f.root.mkdir("file", false, 0o755),
            Err(FsError::AlreadyExists { .. })
        ));
        f.link("to_a", "a");
        f.root.mkdir("to_a", true, 0o755).unwrap();
        f.root.mkdir("to_a/x/y", true, 0o755).unwrap();
        assert!(f.at("a/x/y").is_dir());
    }

    #[test]
    fn remove_files_links_dirs_and_trees_without_following_links() {
        let f = Fixture::new();
        f.write("file", "x");
        f.root.remove("file", false).unwrap();
        assert!(!f.at("file").exists());
        f.link("ln", f.outside().join("secret"));
        f.root.remove("ln", false).unwrap();
        assert!(fs::symlink_metadata(f.at("ln")).is_err());
        f.link("lndir", f.outside());
        f.root.remove("lndir", true).unwrap();
        assert!(fs::symlink_metadata(f.at("lndir")).is_err());

        f.mkdir("empty");
        f.root.remove("empty", false).unwrap();
        f.mkdir("full/sub");
        assert!(matches!(
            f.root.remove("full", false),
            Err(FsError::DirectoryNotEmpty { .. })
        ));
        assert!(f.at("full/sub").is_dir());

        f.mkdir("tree/a/b/c");
        f.write("tree/a/b/c/f", "f");
        f.write("tree/top", "t");
        f.link("tree/out", f.outside());
        f.link("tree/a/rel", "../../../outside/dir");
        f.link("tree/a/b/secret", f.outside().join("secret"));
        fs::write(
            f.at("tree").join(std::ffi::OsStr::from_bytes(b"bad\xff")),
            "x",
        )
        .unwrap();
        f.mkdir("keep");
        f.root.remove("tree", true).unwrap();
        assert!(fs::symlink_metadata(f.at("tree")).is_err());
        assert!(f.at("keep").is_dir());

        assert!(matches!(
            f.root.remove("missing", true),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            f.root.remove("missing/x", true),
            Err(FsError::NotFound { .. })
        ));
        // Drop: outside/ and everything in it survived.
    }

    #[test]
    fn rename_within_the_root() {
        let f = Fixture::new();
        f.write("a", "A");
        f.write("b", "B");
        f.mkdir("d/sub");
        f.root.rename("a", "d/a", false).unwrap();
        assert_eq!(fs::read_to_string(f.at("d/a")).unwrap(), "A");
        assert!(matches!(
            f.root.rename("d/a", "b", true),
            Err(FsError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read_to_string(f.at("d/a")).unwrap(), "A");
        assert_eq!(fs::read_to_string(f.at("b")).unwrap(), "B");
        f.root.rename("d/a", "b", false).unwrap();
        assert_eq!(fs::read_to_string(f.at("b")).unwrap(), "A");
        assert!(!f.at("d/a").exists());
        assert!(matches!(
            f.root.rename("missing", "c", false),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            f.root.rename("d", "d/sub/d", false),
            Err(FsError::InvalidPath { .. })
        ));
        assert!(matches!(
            f.root.rename("b", "d", false),
            Err(FsError::IsADirectory { .. })
        ));
        f.root.rename("d", "e", true).unwrap();
        assert!(f.at("e/sub").is_dir());
    }

    #[test]
    fn publish_replaces_atomically_and_refuses_directories() {
        let f = Fixture::new();
        let state = f.state_dir();
        let staged = |name: &str, text: &str| {
            let path = f.tmp.path().join("state").join(name);
            fs::write(&path, text).unwrap();
            fs::metadata(&path).unwrap().ino()
        };
        f.write("dest", "old");
        let ino = staged("one", "new");
        f.root
            .publish(state.as_fd(), c"one", "dest", false)
            .unwrap();
        // Same inode: the staged file itself took the name (a rename), not a copy.
        assert_eq!(fs::metadata(f.at("dest")).unwrap().ino(), ino);
        assert_eq!(fs::read_to_string(f.at("dest")).unwrap(), "new");
        assert!(!f.tmp.path().join("state/one").exists());

        staged("two", "newer");
        assert!(matches!(
            f.root.publish(state.as_fd(), c"two", "dest", true),
            Err(FsError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read_to_string(f.at("dest")).unwrap(), "new");
        f.mkdir("dir");
        f.mkdir("full/x");
        for dir in ["dir", "full"] {
            let r = f.root.publish(state.as_fd(), c"two", dir, false);
            assert!(matches!(r, Err(FsError::IsADirectory { .. })), "{dir}");
            assert!(f.at(dir).is_dir());
        }
        assert!(matches!(
            f.root.publish(state.as_fd(), c"two", "nodir/x", false),
            Err(FsError::NotFound { .. })
        ));
        assert!(f.tmp.path().join("state/two").exists());
        f.root
            .publish(state.as_fd(), c"two", "dir/fresh", true)
            .unwrap();
        assert_eq!(fs::read_to_string(f.at("dir/fresh")).unwrap(), "newer");
        assert!(f
            .root
            .publish(state.as_fd(), c"gone", "dir/other", false)
            .is_err());
        assert!(!f.at("dir/other").exists());
    }

    #[test]
    fn publish_anonymous_links_or_replaces_and_leaves_nothing_behind() {
        let f = Fixture::new();
        let state = f.state_dir();
        let tmpfile = |text: &str| {
            let fd = fcntl::openat(
                &state,
                c".",
                OFlag::O_TMPFILE | OFlag::O_RDWR,
                Mode::from_bits_truncate(0o600),
            )
            .unwrap();
            let file = File::from(fd);
            std::os::unix::fs::FileExt::write_all_at(&file, text.as_bytes(), 0).unwrap();
            file
        };
        let one = tmpfile("one");
        f.root
            .publish_anonymous(one.as_fd(), state.as_fd(), "fresh", true)
            .unwrap();
        assert_eq!(fs::read_to_string(f.at("fresh")).unwrap(), "one");
        // Same inode: linked, not copied.
        assert_eq!(
            fs::metadata(f.at("fresh")).unwrap().ino(),
            one.metadata().unwrap().ino()
        );

        let two = tmpfile("two");
        assert!(matches!(
            f.root
                .publish_anonymous(two.as_fd(), state.as_fd(), "fresh", true),
            Err(FsError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read_to_string(f.at("fresh")).unwrap(), "one");
        f.root
            .publish_anonymous(two.as_fd(), state.as_fd(), "fresh", false)
            .unwrap();
        assert_eq!(fs::read_to_string(f.at("fresh")).unwrap(), "two");

        f.mkdir("dir");
        let three = tmpfile("three");
        for dest in ["dir", "nodir/x", "../out"] {
            assert!(
                f.root
                    .publish_anonymous(three.as_fd(), state.as_fd(), dest, false)
                    .is_err(),
                "{dest}"
            );
        }
        assert!(f.at("dir").is_dir());
        assert!(!f.outside().join("out").exists());
        // The private names used for replacing are gone.
        let left: Vec<_> = fs::read_dir(f.tmp.path().join("state")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn sub_confines_to_its_prefix() {
        let f = Fixture::new();
        f.mkdir("p/inner");
        f.write("p/ok", "ok");
        f.write("p/inner/g", "g");
        f.mkdir("other");
        f.write("other/f", "other");
        f.link("p/esc", "../other");
        f.link("p/in", "inner");
        let s = f.root.sub("p").unwrap();
        assert_eq!(f.read("p/ok").unwrap(), "ok");
        let read = |path: &str| -> Result<String, FsError> {
            let (mut file, _) = s.open_read(path)?;
            let mut text = String::new();
            file.read_to_string(&mut text).unwrap();
            Ok(text)
        };
        assert_eq!(read("ok").unwrap(), "ok");
        assert_eq!(read("in/g").unwrap(), "g");
        // Inside the root, but not beneath the prefix: refused through the sub-root only.
        assert!(matches!(read("esc/f"), Err(FsError::Escapes { .. })));
        assert_eq!(f.read("p/esc/f").unwrap(), "other");
        assert!(matches!(
            s.mkdir("esc/new", false, 0o755),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            s.remove("esc/f", false),
            Err(FsError::Escapes { .. })
        ));
        assert!(matches!(
            s.rename("ok", "esc/ok", false),
            Err(FsError::Escapes { .. })
        ));
        assert!(!f.at("other/new").exists());
        assert!(f.at("other/f").exists());
        assert_eq!(
            names(&list(&s, "", "", 10).unwrap().0),
            ["esc", "in", "inner", "ok"]
        );
        assert_eq!(s.stat("").unwrap().kind, msg::Kind::Dir as i32);
        assert!(matches!(
            s.check(RESERVED),
            Err(FsError::InvalidPath { .. })
        ));
        assert_eq!(read("ok").unwrap(), "ok");
        assert!(matches!(
            f.root.sub("missing"),
            Err(FsError::NotFound { .. })
        ));
        assert!(matches!(
            f.root.sub("p/ok"),
            Err(FsError::NotADirectory { .. })
        ));
        assert!(matches!(
            f.root.sub("../x"),
            Err(FsError::InvalidPath { .. })
        ));
        // A sub-root of a sub-root narrows further.
        let inner = s.sub("inner").unwrap();
        assert!(inner.exists("g").unwrap());
        assert!(!inner.exists("ok").unwrap());
    }

    #[test]
    fn exists_does_not_follow_or_escape() {
        let f = Fixture::new();
        f.write("f", "x");
        f.link("out", f.outside());
        assert!(f.root.exists("f").unwrap());
        assert!(!f.root.exists("g").unwrap());
        assert!(!f.root.exists("g/h").unwrap());
        assert!(!f.root.exists("f/h").unwrap());
        assert!(f.root.exists("out").unwrap());
        assert!(matches!(
            f.root.exists("out/secret"),
            Err(FsError::Escapes { .. })
        ));
    }

    #[test]
    fn errno_maps_to_wire_codes() {
        let map = |errno: i32| FsError::from_io("p", io::Error::from_raw_os_error(errno)).code();
        assert_eq!(map(libc::ENOENT), ErrorCode::NotFound);
        assert_eq!(map(libc::EEXIST), ErrorCode::AlreadyExists);
        assert_eq!(map(libc::ENOTDIR), ErrorCode::NotADirectory);
        assert_eq!(map(libc::EISDIR), ErrorCode::IsADirectory);
        assert_eq!(map(libc::ENOTEMPTY), ErrorCode::DirectoryNotEmpty);
        assert_eq!(map(libc::EXDEV), ErrorCode::InvalidPath);
        assert_eq!(map(libc::ELOOP), ErrorCode::InvalidPath);
        assert_eq!(map(libc::ENAMETOOLONG), ErrorCode::InvalidPath);
        assert_eq!(map(libc::ENOSPC), ErrorCode::NoSpace);
        assert_eq!(map(libc::EDQUOT), ErrorCode::NoSpace);
        assert_eq!(map(libc::EACCES), ErrorCode::PermissionDenied);
        assert_eq!(map(libc::EPERM), ErrorCode::PermissionDenied);
        assert_eq!(map(libc::EROFS), ErrorCode::PermissionDenied);
        assert_eq!(map(libc::ENXIO), ErrorCode::NotAFile);
        assert_eq!(map(libc::EIO), ErrorCode::Io);
        assert_eq!(rename_error("p", Errno::EXDEV).code(), ErrorCode::Io);
        // Client paths are quoted in messages, so a newline cannot forge a log line.
        let err = FsError::NotFound {
            path: "a\nb".into(),
        };
        assert_eq!(err.to_string(), "\"a\\nb\": not found");
    }
}
