//! Whether a file needs to move at all: the per-file half of syncing that needs I/O. The
//! `--checksum` comparison (local BLAKE3 against the one fsd reports at OPEN READ), how a file
//! that does not move is reported, and the single-file entry points `download_sync` and
//! `upload_sync` (trees decide in `tree` from whole-tree walks).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fsd::protocol::ErrorCode;

use crate::client::{Client, Kind, Slots, Transfer};
use crate::download::{resolve_local, Dest};
use crate::error::{Error, Result};
use crate::local::sink::{spawn_blocking, Out};
use crate::local::LocalDir;
use crate::progress::Event;
use crate::sync::{compare, hash_file, SyncOptions, Verdict, SAME_HASH};
use crate::upload::{SourcePath, UploadOptions};

/// What fstat says of a file that any write, truncation or utimes changes: size, mtime and
/// ctime (which only the kernel sets).
#[derive(PartialEq, Eq)]
struct FileStamp([i64; 5]);

impl FileStamp {
    fn of(f: &File) -> std::io::Result<FileStamp> {
        let md = f.metadata()?;
        let size = i64::try_from(md.size()).unwrap_or(i64::MAX);
        Ok(FileStamp([
            size,
            md.mtime(),
            md.mtime_nsec(),
            md.ctime(),
            md.ctime_nsec(),
        ]))
    }
}

/// What became of one file of a sync.
pub(crate) enum Outcome {
    Sent(Transfer),
    /// Already at the destination (reported as [`Event::Unchanged`]).
    Unchanged,
    /// `--dry-run`: reported as [`Event::DryRun`], nothing moved.
    DryRun,
}

/// `(size, mtime_ns)` of a local regular file; `None` if there is none (or something else).
pub(crate) fn local_file(md: &std::fs::Metadata) -> Option<(u64, i64)> {
    md.is_file()
        .then(|| (md.len(), crate::sync::mtime_ns(md.mtime(), md.mtime_nsec())))
}

/// With `--no-clobber` an existing remote file is refused even when it is the same, as it
/// always was: scripts rely on "exists" failing. Nothing is skipped then.
pub(crate) fn clobber_check(verdict: Verdict, opts: &UploadOptions) -> Verdict {
    match verdict {
        Verdict::New => Verdict::New,
        _ if opts.no_clobber => Verdict::Changed("exists (--no-clobber refuses it)"),
        v => v,
    }
}

impl Client {
    /// `--checksum` for a download: the local file `name` in `dir` against remote `remote`. A
    /// local file found identical gets the remote mtime (as `rsync -c -t` does), so the next
    /// quick check agrees without hashing. (Uploads cannot do the same: the protocol sets a
    /// remote file's mtime only when it publishes one.)
    ///
    /// Only what was verified is stamped: the mtime goes on the very descriptor that was
    /// hashed (not on whatever carries the name by then), and only if its size, mtime and
    /// ctime are the same just before the hash and just before the stamp. A local write in
    /// between (ctime moves with every write and cannot be set back) makes the file unverified:
    /// a change, like any other, rather than an edit stamped as the server's version, which
    /// every later quick check would then call unchanged.
    pub(crate) async fn hash_down(
        &self,
        dir: LocalDir,
        name: &str,
        remote: &str,
        shown: String,
        mtime_ns: i64,
        dry_run: bool,
    ) -> Result<Verdict> {
        let (n, s) = (name.to_string(), shown.clone());
        let local = spawn_blocking(move || {
            let hashed = || -> std::io::Result<_> {
                let f = dir.open_regular(&n)?;
                let before = FileStamp::of(&f)?;
                let hash = hash_file(&f)?;
                Ok((f, before, hash))
            };
            hashed().map_err(|e| Error::io(s, e))
        });
        let (local, remote) = futures::try_join!(local, self.remote_blake3(remote))?;
        let (file, before, hash) = local;
        if hash != remote {
            return Ok(Verdict::Changed("BLAKE3 differs"));
        }
        spawn_blocking(move || {
            let stamp = || -> std::io::Result<_> {
                if FileStamp::of(&file)? != before {
                    return Ok(Verdict::Changed("changed while being compared"));
                }
                if !dry_run {
                    crate::local::set_mtime(&file, mtime_ns)?;
                }
                Ok(Verdict::Same(SAME_HASH))
            };
            stamp().map_err(|e| Error::io(shown, e))
        })
        .await
    }

    /// Settles a [`Verdict::Hash`]: BLAKE3 of the local file (opened by `open_local`) against
    /// the remote one's. Other verdicts are returned as they are.
    pub(crate) async fn settle_hash(
        &self,
        verdict: Verdict,
        remote: &str,
        shown: String,
        open_local: impl FnOnce() -> std::io::Result<File> + Send + 'static,
    ) -> Result<Verdict> {
        if verdict != Verdict::Hash {
            return Ok(verdict);
        }
        let local = spawn_blocking(move || {
            open_local()
                .and_then(|f| hash_file(&f))
                .map_err(|e| Error::io(shown, e))
        });
        let (local, remote) = futures::try_join!(local, self.remote_blake3(remote))?;
        Ok(if local == remote {
            Verdict::Same(SAME_HASH)
        } else {
            Verdict::Changed("BLAKE3 differs")
        })
    }

    /// Reports a file that does not move (already there, or a dry run) and says so; `None`
    /// when it must be transferred.
    pub(crate) fn report(
        &self,
        verdict: Verdict,
        dry_run: bool,
        path: &str,
        local: &str,
        bytes: u64,
    ) -> Option<Outcome> {
        let (action, reason) = match verdict {
            Verdict::Same(reason) if dry_run => ("skip", reason),
            Verdict::Same(reason) => {
                self.emit(Event::Unchanged {
                    path: path.to_string(),
                    local: local.to_string(),
                    bytes,
                    reason: reason.to_string(),
                });
                return Some(Outcome::Unchanged);
            }
            _ if !dry_run => return None,
            Verdict::New => ("copy", "new"),
            Verdict::Changed(reason) => ("update", reason),
            Verdict::Hash => ("update", "checksum not compared"),
        };
        self.emit(Event::DryRun {
            action: action.to_string(),
            path: path.to_string(),
            reason: reason.to_string(),
        });
        Some(if action == "skip" {
            Outcome::Unchanged
        } else {
            Outcome::DryRun
        })
    }

    /// Downloads `remote` to `dest` unless the destination already holds it (size and mtime,
    /// or BLAKE3 with [`SyncOptions::checksum`]); `None` if it did, or on a dry run. Standard
    /// output always receives the file.
    pub async fn download_sync(
        &self,
        remote: &str,
        dest: Dest,
        sync: &SyncOptions,
    ) -> Result<Option<Transfer>> {
        let out = match dest {
            Dest::Stdout => return self.download_to(remote, Dest::Stdout).await.map(Some),
            Dest::Path(p) => resolve_local(remote, &p)?,
        };
        let Out::File { dir, name, .. } = &out else {
            unreachable!("a path destination")
        };
        let shown = dir.display(name);
        let dry_run = sync.dry_run || self.shared.opts.dry_run;
        let entry = self.stat(remote).await?;
        if entry.kind != Kind::File && dry_run {
            // Nothing to compare, and nothing may be written: say what a real run would meet
            // rather than go on to the download (which, should the server have a file there
            // by the time it opens it, would write).
            let (code, what) = match entry.kind {
                Kind::Dir => (ErrorCode::IsADirectory, "a directory"),
                _ => (ErrorCode::NotAFile, "not a regular file"),
            };
            return Err(Error::Remote {
                code,
                message: format!("{remote}: {what} on the server; nothing to download"),
                retryable: false,
            });
        }
        if entry.kind == Kind::File {
            let have = dir.lstat(name).ok().and_then(|st| {
                (st.st_mode & libc::S_IFMT == libc::S_IFREG).then(|| {
                    let size = u64::try_from(st.st_size).unwrap_or(0);
                    (size, crate::sync::mtime_ns(st.st_mtime, st.st_mtime_nsec))
                })
            });
            let verdict = compare((entry.size, entry.mtime_ns), have, sync.checksum);
            let verdict = match verdict {
                Verdict::Hash => {
                    let (d, shown) = (dir.clone(), shown.clone());
                    let mtime = entry.mtime_ns;
                    self.hash_down(d, name, remote, shown, mtime, dry_run)
                        .await?
                }
                v => v,
            };
            if self
                .report(verdict, dry_run, remote, &shown, entry.size)
                .is_some()
            {
                return Ok(None);
            }
        }
        // Anything but a file: the download says what is wrong with it.
        self.download_file(remote, out, Slots::All).await.map(Some)
    }

    /// Uploads `local` to `remote` unless the server already holds it (as
    /// [`Client::download_sync`] decides); `None` if it did, or on a dry run. Creates the
    /// remote file's missing parent directories (`rsync --mkpath`).
    pub async fn upload_sync(
        &self,
        local: &Path,
        remote: &str,
        opts: &UploadOptions,
        sync: &SyncOptions,
    ) -> Result<Option<Transfer>> {
        let dry_run = sync.dry_run || self.shared.opts.dry_run;
        let md = std::fs::metadata(local).map_err(|e| Error::io(local.display(), e))?;
        let source = SourcePath::Named(local.to_path_buf());
        let Some(src) = local_file(&md) else {
            if dry_run {
                // What the upload would say, without going on to it (a file may have taken
                // the name by the time the upload opens it).
                return Err(Error::Usage(format!(
                    "{}: not a regular file",
                    local.display()
                )));
            }
            // Not a file: the upload says what is wrong with it, and nothing is created.
            return self
                .upload_file(&source, remote, opts, Slots::All, None)
                .await
                .map(Some);
        };
        let have = match self.stat(remote).await {
            Ok(e) if e.kind == Kind::File => Some((e.size, e.mtime_ns)),
            Ok(_) => None,
            Err(e) if e.remote_code() == Some(ErrorCode::NotFound) => {
                if !dry_run {
                    self.make_parents(remote).await?;
                }
                None
            }
            Err(e) => return Err(e),
        };
        let verdict = clobber_check(compare(src, have, sync.checksum), opts);
        let shown = local.display().to_string();
        let opened = source.clone();
        let verdict = self
            .settle_hash(verdict, remote, shown.clone(), move || opened.open())
            .await?;
        if self
            .report(verdict, dry_run, remote, &shown, src.0)
            .is_some()
        {
            return Ok(None);
        }
        let replaces = have.map(|(size, _)| size);
        self.upload_file(&source, remote, opts, Slots::All, replaces)
            .await
            .map(Some)
    }

    /// Creates the missing parent directories of the remote path `remote`.
    async fn make_parents(&self, remote: &str) -> Result<()> {
        let Some((parent, _)) = remote.trim_end_matches('/').rsplit_once('/') else {
            return Ok(());
        };
        match self.stat(parent).await {
            Err(e) if e.remote_code() == Some(ErrorCode::NotFound) => {
                self.mkdir(parent, true, 0).await
            }
            // There (or not ours to judge): the upload says what is wrong with it.
            _ => Ok(()),
        }
    }
}
