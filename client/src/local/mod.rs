//! The local side of a transfer: confined directory handles, fsc's working files, and
//! publishing a verified file under its final name.
//!
//! The client is attacked too (rsync CVE-2024-12086/12087, scp CVE-2019-6111): a hostile
//! server can name files we never asked for. Downloads therefore write only through a
//! [`LocalDir`] — an open directory fd — by one checked leaf name at a time, with `O_NOFOLLOW`,
//! so neither `../x`, `a/b`, an absolute name nor a symlink planted in the destination can lead
//! a write outside it.
//!
//! fsc's own files never share a namespace with the files it transfers: a partial download and
//! its resume state live in one hidden working directory per destination root ([`WORK_DIR`]),
//! named by a hash of the destination's path relative to that root ([`Work`]). So a remote
//! `big.fsc-part` is just another file, and publishing links the very inode that was written
//! and verified ([`publish`]) rather than renaming whatever currently has a name.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsd::durable::link_anonymous;
use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, futimens, mkdirat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::error::{Error, Result};

pub(crate) mod sink;
pub(crate) mod state;

/// Longest component name accepted from a server.
const NAME_MAX: usize = 255;

/// fsc's working directory in a destination root: partial downloads and their state. When the
/// server has something of that name where it would go, `.fsc-work.1`, `.fsc-work.2`, ... (see
/// [`work_dir_name`]), so a remote `.fsc-work` transfers like any other name.
pub(crate) const WORK_DIR: &str = ".fsc-work";

/// The working directory's name for a destination root where the server's names `taken`
/// will appear: the first candidate that is not one of them. Deterministic, so a rerun
/// against the same tree finds its partial downloads again.
pub(crate) fn work_dir_name(taken: impl Fn(&str) -> bool) -> Arc<str> {
    let candidates =
        std::iter::once(WORK_DIR.to_string()).chain((1..1000).map(|i| format!("{WORK_DIR}.{i}")));
    for name in candidates {
        if !taken(&name) {
            return name.into();
        }
    }
    // A server that lists all thousand: a name of our own making, not resumable.
    format!("{WORK_DIR}.{:016x}", rand::random::<u64>()).into()
}

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

pub(crate) fn io(e: Errno) -> std::io::Error {
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

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path for messages.
    pub fn display(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    /// Opens (creating if `create`) the subdirectory `name`; a symlink there is refused.
    /// Returns whether this call created it.
    pub fn subdir(&self, name: &str, create: bool, mode: u32) -> std::io::Result<(LocalDir, bool)> {
        let mut created = false;
        if create {
            match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode)) {
                Ok(()) => created = true,
                Err(Errno::EEXIST) => {}
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
        let dir = LocalDir {
            fd: Arc::new(fd),
            path: self.path.join(name),
        };
        Ok((dir, created))
    }

    /// Opens the directory at `rel` ("a/b", "" for this one) beneath this one, one component at
    /// a time with `O_NOFOLLOW`: a symlink anywhere on the way is refused.
    pub fn walk(&self, rel: &str) -> std::io::Result<LocalDir> {
        let mut dir = self.clone();
        for name in rel.split('/').filter(|c| !c.is_empty()) {
            dir = dir.subdir(name, false, 0)?.0;
        }
        Ok(dir)
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

    /// A new file with no name yet (O_TMPFILE) in this directory, for [`publish`]: nothing is
    /// visible, and nothing is left behind by a crash, until it is complete. `None` where the
    /// file system does not support it, or is not known to keep such a file once it is linked
    /// (JuiceFS links it, then destroys it: fsd::fskind).
    pub fn create_anonymous(&self) -> Option<File> {
        let (kind, _) = fsd::fskind::detect(self.fd.as_fd()).ok()?;
        if !kind.keeps_anonymous_files() {
            return None;
        }
        self.anonymous().ok()
    }

    /// [`LocalDir::create_anonymous`] without asking the file system first: for a directory
    /// already known to keep anonymous files (a batch writes many into one directory).
    pub fn anonymous(&self) -> std::io::Result<File> {
        let flags = OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC;
        let fd =
            openat(self.fd.as_fd(), ".", flags, Mode::from_bits_truncate(0o600)).map_err(io)?;
        Ok(File::from(fd))
    }

    /// Opens `name` read-only; a symlink there is refused, and a FIFO does not block the open
    /// (O_NONBLOCK changes nothing for a regular file).
    pub fn open_read(&self, name: &str) -> std::io::Result<File> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(self.fd.as_fd(), name, flags, Mode::empty()).map_err(io)?;
        Ok(File::from(fd))
    }

    /// Opens `name`, an entry a tree walk saw as a regular file, to read it as a source:
    /// [`LocalDir::open_read`] (a symlink there is refused, a FIFO does not block), and then
    /// only if it is still a regular file ([`regular`]).
    pub fn open_regular(&self, name: &str) -> std::io::Result<File> {
        match self.open_read(name) {
            Ok(f) => regular(f),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a symlink now (replaced since it was listed?): not followed",
            )),
            Err(e) => Err(e),
        }
    }

    /// Opens the source file `rel` ("a/b/f") beneath this directory, through handles opened
    /// one component at a time with `O_NOFOLLOW` ([`LocalDir::walk`]), the file itself with
    /// [`LocalDir::open_regular`]: whatever replaced the walk's entry, or a directory above it,
    /// since it was listed (a symlink, a FIFO, a device), nothing but that regular file is
    /// read.
    pub fn open_source(&self, rel: &str) -> std::io::Result<File> {
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        self.walk(parent)?.open_regular(name)
    }

    /// Reads a small file (at most `max` bytes, else InvalidData); `None` if it does not exist.
    pub fn read(&self, name: &str, max: u64) -> std::io::Result<Option<Vec<u8>>> {
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
        File::from(fd).take(max + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > max {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
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

    /// Sets the directory's mtime only.
    pub fn set_mtime(&self, mtime_ns: i64) -> std::io::Result<()> {
        futimens(self.fd.as_fd(), &TimeSpec::UTIME_OMIT, &timespec(mtime_ns)).map_err(io)
    }

    /// `lstat` of `name`: a symlink is reported as itself.
    /// The link text of the symlink `name` in this directory (never followed).
    pub fn read_link(&self, name: &str) -> std::io::Result<std::ffi::OsString> {
        nix::fcntl::readlinkat(self.fd(), name).map_err(io)
    }

    /// Makes `name` a symlink to `target`, replacing a file or symlink there atomically (a new
    /// link under a temporary name, renamed over it); a directory there is an error. The link
    /// is created, never followed.
    pub fn symlink(&self, name: &str, target: &str) -> std::io::Result<()> {
        let temp = format!(
            ".fsc-link.{}.{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        nix::unistd::symlinkat(target, self.fd(), temp.as_str()).map_err(io)?;
        let r = nix::fcntl::renameat(self.fd(), temp.as_str(), self.fd(), name).map_err(io);
        if r.is_err() {
            let _ = nix::unistd::unlinkat(
                self.fd(),
                temp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        r
    }

    pub fn lstat(&self, name: &str) -> std::io::Result<nix::sys::stat::FileStat> {
        nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io)
    }

    /// The entries of this directory (not `.` and `..`), each `lstat`ed: a symlink is reported
    /// as itself, never followed.
    pub fn entries(&self) -> std::io::Result<Vec<(std::ffi::OsString, nix::sys::stat::FileStat)>> {
        use std::os::unix::ffi::OsStrExt;
        let mut d = nix::dir::Dir::openat(
            self.fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        let mut out = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(io)?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = std::ffi::OsStr::from_bytes(name).to_os_string();
            let flags = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
            let st =
                nix::sys::stat::fstatat(self.fd.as_fd(), name.as_os_str(), flags).map_err(io)?;
            out.push((name, st));
        }
        Ok(out)
    }

    /// Removes `name` and, if it is a directory, everything beneath it, through handles opened
    /// with `O_NOFOLLOW` one level at a time: a symlink is removed as itself, never followed,
    /// so nothing outside this directory can be touched. At most `depth` levels deep.
    pub fn remove_all(&self, name: &std::ffi::OsStr, depth: usize) -> std::io::Result<()> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            // Linux answers EISDIR for a directory (POSIX allows EPERM).
            Err(Errno::EISDIR | Errno::EPERM) => {}
            Err(e) => return Err(io(e)),
        }
        if depth == 0 {
            return Err(std::io::Error::other("directory tree too deep to remove"));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(self.fd.as_fd(), name, flags, Mode::empty()).map_err(io)?;
        let sub = LocalDir {
            fd: Arc::new(fd),
            path: self.path.join(name),
        };
        for (child, _) in sub.entries()? {
            sub.remove_all(&child, depth - 1)?;
        }
        unlinkat(self.fd.as_fd(), name, UnlinkatFlags::RemoveDir).map_err(io)
    }
}

impl LocalDir {
    /// Removes `name` by itself: a file, a symlink or special file (never followed), or an
    /// empty directory; a missing one is fine. A directory that is not empty stays, and the
    /// error says so ([`is_not_empty`]).
    pub fn remove_one(&self, name: &str) -> std::io::Result<()> {
        let first = match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            // Linux answers EISDIR for a directory (POSIX allows EPERM).
            Err(e @ (Errno::EISDIR | Errno::EPERM)) => e,
            Err(e) => return Err(io(e)),
        };
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            // Not a directory after all: the unlink's EPERM was the answer.
            Err(Errno::ENOTDIR) => Err(io(first)),
            Err(e) => Err(io(e)),
        }
    }
}

/// `f` if it is a regular file, back in blocking mode (it was opened with `O_NONBLOCK` so that
/// a FIFO could not hang the open); an error naming what it is otherwise. A source that is
/// not a regular file is never read: a FIFO or a device has no size to check the data against
/// and may never end.
pub(crate) fn regular(f: File) -> std::io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg};
    let kind = f.metadata()?.file_type();
    if !kind.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "something else"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({what} now): not read"),
        ));
    }
    let flags = OFlag::from_bits_retain(fcntl(&f, FcntlArg::F_GETFL).map_err(io)?);
    fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map_err(io)?;
    Ok(f)
}

/// Opens a source file by a path the user named (symlinks on it are followed, as cp and scp
/// do with the files they are given), without blocking on a FIFO, and only if it is a regular
/// file ([`regular`]).
pub(crate) fn open_named_source(path: &Path) -> std::io::Result<File> {
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(nix::fcntl::AT_FDCWD, path, flags, Mode::empty()).map_err(io)?;
    regular(File::from(fd))
}

/// Whether `e` says that a directory is not empty (Linux: ENOTEMPTY; POSIX allows EEXIST).
pub(crate) fn is_not_empty(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST))
}

/// Sets permission bits (never setuid/setgid/sticky from a server) and mtime on an open fd.
pub(crate) fn set_meta(fd: impl AsFd, mode: u32, mtime_ns: i64) -> std::io::Result<()> {
    fchmod(fd.as_fd(), Mode::from_bits_truncate(mode & 0o777)).map_err(io)?;
    futimens(fd.as_fd(), &TimeSpec::UTIME_OMIT, &timespec(mtime_ns)).map_err(io)
}

/// Sets the mtime of an open file (the one a caller checked, whatever has its name by now).
pub(crate) fn set_mtime(fd: impl AsFd, mtime_ns: i64) -> std::io::Result<()> {
    futimens(fd.as_fd(), &TimeSpec::UTIME_OMIT, &timespec(mtime_ns)).map_err(io)
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// `Some((needed, free))` if the file system holding `file` lacks room for it to grow to
/// `size` bytes (what it has allocated already counts as its own).
pub(crate) fn lacks_space(file: &File, size: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let have = file.metadata()?.blocks().saturating_mul(512);
    let needed = size.saturating_sub(have);
    // A file system that does not say how much is free is not checked.
    let Some(free) = fsd::fskind::free_bytes(file)? else {
        return Ok(None);
    };
    Ok((needed > free).then_some((needed, free)))
}

/// Gives back the space of byte ranges of `file` that hold nothing received (keeps its size).
pub(crate) fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file, flags, off, len).map_err(io)
}

/// The process's umask, read once (without changing it: /proc/self/status says it).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            // Without /proc, the conservative default of most systems.
            .unwrap_or(0o022)
    })
}

/// The permission bits to give a file or directory this run created, from the server's mode:
/// less the umask (as tar and scp do), or exactly with `preserve`; never setuid, setgid or
/// sticky.
pub(crate) fn new_mode(server_mode: u32, preserve: bool) -> u32 {
    let mode = server_mode & 0o777;
    if preserve {
        mode
    } else {
        mode & !umask()
    }
}

/// Where the working files of one destination file live: `ROOT/.fsc-work/KEY.part` and
/// `KEY.state`, KEY a hash of the destination's path relative to ROOT. The working directory
/// is created only when a file needs it (a download of more than one chunk, or a publish over
/// an existing name) and removed when a run leaves it empty.
#[derive(Clone, Debug)]
pub(crate) struct Work {
    root: LocalDir,
    /// The working directory's name in `root` ([`work_dir_name`]).
    name: Arc<str>,
    key: String,
}

impl Work {
    /// `rel`: the destination's path relative to `root` ("a/b/file"); `name`: the working
    /// directory's ([`work_dir_name`]).
    pub fn new(root: LocalDir, name: Arc<str>, rel: &str) -> Work {
        let key = hex::encode(&blake3::hash(rel.as_bytes()).as_bytes()[..16]);
        Work { root, name, key }
    }

    /// Opens (creating, mode 0700) the working directory.
    pub fn dir(&self) -> std::io::Result<LocalDir> {
        Ok(self.root.subdir(&self.name, true, 0o700)?.0)
    }

    /// The working directory if it exists.
    pub fn existing_dir(&self) -> std::io::Result<Option<LocalDir>> {
        match self.root.subdir(&self.name, false, 0) {
            Ok((d, _)) => Ok(Some(d)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn part(&self) -> String {
        format!("{}.part", self.key)
    }

    pub fn state(&self) -> String {
        format!("{}.state", self.key)
    }

    /// A private name to link a finished file under before renaming it into place.
    fn staging(&self) -> String {
        format!("{}.pub", self.key)
    }

    /// Removes the working directory if nothing is left in it.
    pub fn tidy(&self) {
        let _ = unlinkat(self.root.fd(), &*self.name, UnlinkatFlags::RemoveDir);
    }
}

/// Gives `file` — the inode that was written and verified, named or not — the name `name` in
/// `dir`, replacing (atomically) whatever is there. A planted symlink is replaced, never
/// followed. Another file that happens to carry a working name can never be published instead.
pub(crate) fn publish(file: &File, dir: &LocalDir, name: &str, work: &Work) -> std::io::Result<()> {
    let link = |d: &LocalDir, to: &str| link_anonymous(file.as_fd(), d.fd(), to);
    match link(dir, name) {
        Err(Errno::EEXIST) => {}
        r => return r.map_err(io),
    }
    // Something is there already (an older copy, or a symlink): link under a private name in
    // the working directory, then rename over it.
    let wd = work.dir()?;
    let staging = work.staging();
    wd.remove(&staging)?;
    link(&wd, &staging).map_err(io)?;
    let r = renameat(wd.fd(), staging.as_str(), dir.fd(), name).map_err(io);
    if r.is_err() {
        // E.g. a directory has that name: nothing of ours stays behind.
        let _ = wd.remove(&staging);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_one_takes_one_entry_and_a_directory_only_when_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        let t = tmp.path();
        std::fs::write(t.join("f"), b"f").unwrap();
        std::fs::create_dir_all(t.join("full/sub")).unwrap();
        std::fs::create_dir(t.join("empty")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("link")).unwrap();
        let d = LocalDir::open(t).unwrap();
        for name in ["f", "empty", "link", "missing"] {
            d.remove_one(name).unwrap();
            assert!(std::fs::symlink_metadata(t.join(name)).is_err(), "{name}");
        }
        assert!(
            outside.path().join("keep").exists(),
            "the link was not followed"
        );
        let e = d.remove_one("full").unwrap_err();
        assert!(is_not_empty(&e), "{e}");
        assert!(t.join("full/sub").is_dir());
    }

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
    fn the_working_directory_avoids_the_servers_names() {
        assert_eq!(&*work_dir_name(|_| false), ".fsc-work");
        assert_eq!(&*work_dir_name(|n| n == ".fsc-work"), ".fsc-work.1");
        let taken = |n: &str| n.starts_with(".fsc-work");
        assert!(work_dir_name(taken).len() == ".fsc-work.".len() + 16);
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
    fn publish_links_the_verified_inode_never_a_name() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let root = LocalDir::open(tmp.path()).unwrap();
        let work = Work::new(root.clone(), WORK_DIR.into(), "f");
        let wd = work.dir().unwrap();
        let mut part = wd.open_rw(&work.part(), true).unwrap();
        part.write_all(b"verified").unwrap();
        // A symlink where the file goes is replaced, not followed.
        let outside = tmp.path().join("outside");
        std::os::unix::fs::symlink(&outside, tmp.path().join("f")).unwrap();
        publish(&part, &root, "f", &work).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"verified");
        assert!(!outside.exists());

        // Another file takes the working name: publishing fails rather than publish it.
        let mut part = wd.open_rw("g.part", true).unwrap();
        part.write_all(b"verified").unwrap();
        std::fs::write(tmp.path().join(WORK_DIR).join("impostor"), b"impostor").unwrap();
        wd.rename("impostor", "g.part").unwrap();
        assert!(publish(&part, &root, "g", &work).is_err());
        assert!(!tmp.path().join("g").exists());

        // A directory where the file goes: an error, and no staging name left behind.
        let mut part = wd.open_rw("h.part", true).unwrap();
        part.write_all(b"verified").unwrap();
        std::fs::create_dir(tmp.path().join("h")).unwrap();
        assert!(publish(&part, &root, "h", &work).is_err());
        let mut left: Vec<_> = std::fs::read_dir(tmp.path().join(WORK_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![work.part(), "g.part".into(), "h.part".into()];
        want.sort();
        assert_eq!(left, want);
    }
}
