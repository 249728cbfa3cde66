//! `-r` transfers: walk both sides (`walk`), compare them (`sync::plan`), then delete what
//! `--delete` removes (`delete`), create directories, and transfer the files that differ.
//! Downloads write only beneath their destination directory, through [`LocalDir`] handles by
//! checked names (see `local`).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use fsd::durable::GroupSync;
use fsd::protocol::ErrorCode;
use futures::stream::StreamExt;

use crate::batch::DownTarget;
use crate::check::{clobber_check, Outcome};
use crate::client::{Client, Kind, Slots};
use crate::delete::{How, Removal, HOLDS_EXCLUDED};
use crate::error::{Error, Result};
use crate::local::sink::{spawn_blocking, Out};
use crate::local::{is_not_empty, new_mode, work_dir_name, LocalDir, Work};
use crate::progress::Event;
use crate::sync::{plan, Node, Plan, SyncOptions, Verdict};
use crate::upload::{SourcePath, UploadOptions};
use crate::walk::{rel_split, remote_join, walk_local, Walk, LISTS_IN_FLIGHT, MAX_TREE_DEPTH};

/// What a `-r` transfer did.
#[derive(Debug, Default)]
pub struct TreeSummary {
    /// Files transferred and verified.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Payload bytes moved over the network.
    pub transferred: u64,
    /// Files left as they were: the destination already held them.
    pub unchanged: u64,
    /// Destination entries removed by `--delete` (a directory counts once).
    pub deleted: u64,
    /// Destination directories `--delete` left in place: they hold excluded entries, or were
    /// found not empty (an [`Event::Kept`] each).
    pub kept: u64,
    /// Entries skipped (symlinks, special files).
    pub skipped: u64,
    /// The first [`MAX_KEPT_FAILURES`] of them, with why (paths as shown, not escaped): for
    /// a summary where no [`Event::Skip`] is shown.
    pub skips: Vec<(String, String)>,
    /// Symlinks created or replaced (`-l`).
    pub links: u64,
    /// Files that failed, with the error: the first [`MAX_KEPT_FAILURES`].
    pub failed: Vec<(String, Error)>,
    /// Failures past those, counted only (a hostile server can fail every file of a huge tree).
    pub failed_more: u64,
    /// The highest exit code among the failures only counted.
    failed_more_code: i32,
}

/// Why a source entry whose name is not UTF-8 fails.
const NOT_UTF8_SOURCE: &str =
    "name is not UTF-8: the protocol carries names as UTF-8, so it cannot be transferred";
/// Why a destination entry whose name is not UTF-8 fails a `--delete` run.
const NOT_UTF8_DEST: &str = "name is not UTF-8: it cannot be compared with the source's \
     names (the protocol carries UTF-8), so --delete leaves it in place";

/// Failures a tree run keeps with their error for its summary.
pub const MAX_KEPT_FAILURES: usize = 1000;

/// Files in flight per connection during a tree transfer: enough that per-file round trips
/// (open, read, close) overlap instead of adding up, and that files waiting for their group
/// sync do not starve the link.
const FILES_PER_CONN: usize = 128;
/// A download tree's group sync waits this long for this many files to join (fsd::durable).
const SYNC_GATHER: Duration = Duration::from_millis(3);
const SYNC_BATCH: usize = 64;
/// Files up to this size use one connection; bigger ones are split across all of them.
const SMALL_FILE: u64 = 4 << 20;

/// Descriptors a tree download keeps for itself and the connections, beyond files in flight.
const FD_RESERVE: u64 = 64;
/// Descriptors one file in flight may hold (its directory, part, direct-I/O twin, working
/// directory, and one spare for publishing).
const FDS_PER_FILE: u64 = 6;

/// A destination directory of a tree transfer, whose metadata is set once everything beneath
/// it is done (creating entries changes a directory's mtime): the source's mtime, both ways;
/// on a download also the source's mode, if this run created it (or always, `-p`).
struct TreeDir {
    depth: usize,
    rel: String,
    /// Created by this run (downloads: give it this mode).
    created: Option<u32>,
    /// `-p` on a download, the directory existed: its mode becomes this one (the source's).
    chmod: Option<u32>,
    mtime_ns: i64,
    /// The destination had it with this very mtime before the run.
    same: bool,
    /// The top, when it existed before: the user's directory keeps its mode and mtime (as
    /// with tar or cp); only what is beneath it follows the source.
    keep: bool,
}

impl TreeDir {
    /// The plan's directories, and the top (`top`: source mode and mtime; `top_dst`: the
    /// destination top's mtime, if it existed), deepest first. `preserve`: existing
    /// directories beneath the top take the source's mode too (a download's `-p`).
    fn all(
        plan: &Plan,
        src: &Walk,
        dst: &Walk,
        top: (u32, i64),
        top_dst: Option<i64>,
        preserve: bool,
    ) -> Vec<Self> {
        let mut dirs = vec![TreeDir {
            depth: 0,
            rel: String::new(),
            created: top_dst.is_none().then_some(top.0),
            chmod: None,
            mtime_ns: top.1,
            same: top_dst == Some(top.1),
            keep: top_dst.is_some(),
        }];
        for (rel, create) in &plan.dirs {
            let Some(Node::Dir { mode, mtime_ns }) = src.nodes.get(rel) else {
                continue;
            };
            let had = match dst.nodes.get(rel) {
                Some(Node::Dir { mtime_ns, mode }) if !create => Some((*mtime_ns, *mode)),
                _ => None,
            };
            let chmod =
                (preserve && had.is_some_and(|(_, m)| m != mode & 0o777)).then_some(mode & 0o777);
            dirs.push(TreeDir {
                depth: depth_of(rel),
                rel: rel.clone(),
                created: create.then_some(*mode),
                chmod,
                mtime_ns: *mtime_ns,
                same: had.map(|h| h.0) == Some(*mtime_ns) && chmod.is_none(),
                keep: false,
            });
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
        dirs
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

fn depth_of(rel: &str) -> usize {
    rel.bytes().filter(|&b| b == b'/').count() + 1
}

impl Client {
    /// Reports what the walks skipped and could not list, and compares them. `--delete` acts
    /// only on complete walks: after any listing failure nothing is deleted (and the run
    /// fails). `shown_dst` names a destination entry for messages.
    fn plan_tree(
        &self,
        summary: &mut TreeSummary,
        src: &mut Walk,
        dst: &mut Walk,
        sync: &SyncOptions,
        shown_dst: &dyn Fn(&str) -> String,
    ) -> Plan {
        for (path, reason) in src.skipped.drain(..) {
            summary.skipped += 1;
            if summary.skips.len() < MAX_KEPT_FAILURES {
                summary.skips.push((path.clone(), reason.clone()));
            }
            self.emit(Event::Skip { path, reason });
        }
        let complete = src.complete() && dst.complete();
        for (path, e) in src.failed.drain(..).chain(dst.failed.drain(..)) {
            summary.fail(self, path, e);
        }
        if sync.delete && !complete {
            let e = Error::Usage(
                "not deleting anything: a listing failed, so the source or destination is \
                 not known completely"
                    .into(),
            );
            summary.fail(self, "--delete".into(), e);
        }
        // Source entries the protocol cannot name were asked for and are not transferred.
        for (_, path) in src.unnamed.drain(..) {
            summary.fail(self, path, Error::Usage(NOT_UTF8_SOURCE.into()));
        }
        let p = plan(
            &src.nodes,
            &dst.nodes,
            &dst.excluded,
            sync.delete && complete,
            sync.checksum,
        );
        // Destination entries the protocol cannot name cannot be compared with the source:
        // `--delete` leaves them (the source may hold them under a name the protocol cannot
        // carry either), and the run says so and fails rather than call the mirror complete.
        // Those beneath a directory removed whole go with it (the source lacks the directory).
        if sync.delete && complete {
            let gone: std::collections::HashSet<&str> =
                p.delete.iter().map(String::as_str).collect();
            let whole = sync.filter.is_empty();
            for (dir, path) in dst.unnamed.drain(..) {
                let mut up = Some(dir.as_str()).filter(|d| !d.is_empty());
                let mut removed = false;
                while let Some(d) = up {
                    removed |= gone.contains(d);
                    up = d.rsplit_once('/').map(|(parent, _)| parent);
                }
                if !(whole && removed) {
                    summary.fail(self, path, Error::Usage(NOT_UTF8_DEST.into()));
                }
            }
        }
        for (rel, why) in &p.blocked {
            let e = Error::Usage(why.why().into());
            summary.fail(self, shown_dst(rel), e);
        }
        if sync.dry_run {
            for rel in &p.delete {
                self.dry_run(
                    "delete",
                    shown_dst(rel),
                    "not in the source, or of another type",
                );
            }
            for rel in &p.kept {
                self.dry_run("keep", shown_dst(rel), HOLDS_EXCLUDED);
            }
            for (rel, _) in p.dirs.iter().filter(|(_, create)| *create) {
                self.dry_run("mkdir", shown_dst(rel), "new directory");
            }
        }
        p
    }

    /// Creates the symlink `path` → `target` with `make` (or says it would, on a dry run) and
    /// reports it.
    async fn link(
        &self,
        dry_run: bool,
        path: String,
        target: &str,
        make: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        if dry_run {
            self.dry_run("link", path, &format!("-> {target}"));
            return Ok(());
        }
        make.await?;
        self.emit(Event::Linked {
            path,
            target: target.to_string(),
        });
        Ok(())
    }

    fn dry_run(&self, action: &str, path: String, reason: &str) {
        self.emit(Event::DryRun {
            action: action.into(),
            path,
            reason: reason.into(),
        });
    }

    /// Downloads the remote directory `remote` into `local` (created if missing): files, the
    /// modes (less the umask, unless [`Options::preserve`](crate::Options)) of what this run
    /// creates, and the mtimes of every file and directory; a directory that existed before
    /// keeps its mode, and `local` itself, if it existed, its mtime too. A file the destination
    /// already holds is left alone ([`Event::Unchanged`]; [`SyncOptions`] says how that is
    /// decided, what is filtered out, whether extra entries are deleted). Symlinks and
    /// special files are skipped (a [`Event::Skip`] each). Every write and removal goes
    /// through handles opened beneath `local` by checked names; a server that names anything
    /// else (`..`, `a/b`, NUL) is refused. Directories are opened when needed and closed
    /// after, so the number of open files is bounded whatever the tree's shape.
    pub async fn download_tree(
        &self,
        remote: &str,
        local: &Path,
        sync: &SyncOptions,
    ) -> Result<TreeSummary> {
        let sync = &self.sync_options(sync);
        let top = self.stat(remote).await?;
        if top.kind != Kind::Dir {
            return Err(Error::Usage(format!("{remote}: not a directory (drop -r)")));
        }
        let mut src = self.walk_remote(remote, &sync.filter, sync.links).await?;
        // fsc's working directory at the destination's top: the first name the server's
        // top-level entries leave free (deterministic, so a rerun finds its partial downloads).
        let work_name = work_dir_name(|n| src.nodes.contains_key(n));
        let root_is_new = std::fs::symlink_metadata(local).is_err();
        let top_dst = std::fs::metadata(local)
            .ok()
            .map(|md| crate::sync::mtime_ns(md.mtime(), md.mtime_nsec()));
        let root = if root_is_new && sync.dry_run {
            None
        } else {
            std::fs::create_dir_all(local).map_err(|e| Error::io(local.display(), e))?;
            Some(LocalDir::open(local).map_err(|e| Error::io(local.display(), e))?)
        };
        let mut dst = match &root {
            Some(r) => {
                let (r, f, l) = (r.clone(), sync.filter.clone(), sync.links);
                let wd = work_name.clone();
                spawn_blocking(move || Ok(walk_local(&r, &f, l, Some(&wd)))).await?
            }
            None => Walk::default(),
        };
        let shown = |rel: &str| local.join(rel).display().to_string();
        let mut summary = TreeSummary::default();
        let plan = self.plan_tree(&mut summary, &mut src, &mut dst, sync, &shown);
        let files = self.plan_files(&plan, &src);
        let Some(root) = root else {
            // A dry run into a missing directory: everything is new.
            self.dry_run("mkdir", shown(""), "new directory");
            for (rel, size, verdict) in files {
                self.report(
                    verdict,
                    true,
                    &remote_join(remote, &rel),
                    &shown(&rel),
                    size,
                );
            }
            return Ok(summary);
        };
        let dry_run = sync.dry_run;
        if !dry_run {
            let remove = |rel: String, how: How| {
                let (root, shown) = (root.clone(), shown(&rel));
                spawn_blocking(move || {
                    let (parent, name) = rel_split(&rel);
                    let dir = root.walk(parent).map_err(|e| Error::io(&shown, e))?;
                    let r = match how {
                        How::Whole => dir.remove_all(OsStr::new(name), MAX_TREE_DEPTH),
                        How::Alone => dir.remove_one(name),
                    };
                    match r {
                        Ok(()) => Ok(Removal::Gone),
                        Err(e) if how == How::Alone && is_not_empty(&e) => Ok(Removal::NotEmpty),
                        Err(e) => Err(Error::io(&shown, e)),
                    }
                })
            };
            let filtered = !sync.filter.is_empty();
            self.delete_planned(&mut summary, &plan, &dst.nodes, filtered, &shown, remove)
                .await;
        }
        let preserve = self.shared.opts.preserve;
        if preserve && !dry_run {
            self.chmod_kept_files(&mut summary, &root, &plan, &src, &dst, &shown)
                .await;
        }
        let top_meta = (top.mode, top.mtime_ns);
        let mut dirs = TreeDir::all(&plan, &src, &dst, top_meta, top_dst, preserve);
        // Parents before children: the reverse of the order their metadata is set in.
        let mut failed = std::collections::HashSet::new();
        for d in dirs
            .iter_mut()
            .rev()
            .filter(|d| !dry_run && d.created.is_some())
        {
            if d.rel.is_empty() {
                continue;
            }
            let (parent, name) = rel_split(&d.rel);
            // Created with its final mode when that lets us write into it (the usual case), so
            // that a run interrupted (Ctrl-C, SIGTERM, SIGKILL) leaves it as a finished run
            // would; else 0700, writable by us until the end, whatever the server's mode
            // says. (mkdir applies the umask: with -p the exact mode comes at the end.)
            let mode = new_mode(d.created.unwrap_or(0), preserve);
            let first = if mode & 0o700 == 0o700 { mode } else { 0o700 };
            match root.walk(parent).and_then(|p| p.subdir(name, true, first)) {
                Ok((_, true)) => {}
                // Someone else made it meanwhile: not ours to give a mode.
                Ok((_, false)) => d.created = None,
                Err(e) => {
                    summary.fail(self, shown(&d.rel), Error::io(shown(&d.rel), e));
                    failed.insert(d.rel.clone());
                }
            }
        }
        dirs.retain(|d| !failed.contains(&d.rel));

        if !dry_run {
            self.emit(Event::Plan {
                files: files.len() as u64,
                bytes: files.iter().fold(0, |n: u64, f| n.saturating_add(f.1)),
            });
        }
        // Files are made durable in groups (one syncfs each), then renamed; see fsd::durable.
        let group = GroupSync::new(root.fd(), SYNC_GATHER, SYNC_BATCH)
            .map_err(|e| Error::io(local.display(), e))?;
        let (group, root) = (&group, &root);
        let work_name = &work_name;
        let nodes = &src.nodes;
        let (small, files) = self.split_small(files, dry_run, |v| v).await;
        let target = DownTarget {
            root: root.clone(),
            work_name: work_name.clone(),
            group: group.clone(),
            preserve: self.shared.opts.preserve,
        };
        let small = self.download_small(remote, &target, small);
        let results = futures::stream::iter(files)
            .map(|(rel, size, verdict)| async move {
                let rpath = remote_join(remote, &rel);
                let (dir_rel, name) = rel_split(&rel);
                let open_dir = || {
                    root.walk(dir_rel)
                        .map_err(|e| Error::io(root.display(dir_rel), e))
                };
                let verdict = match (verdict, nodes.get(&rel)) {
                    (Verdict::Hash, Some(Node::File { mtime_ns, .. })) => match open_dir() {
                        Ok(d) => {
                            let (shown, mtime) = (shown(&rel), *mtime_ns);
                            self.hash_down(d, name, &rpath, shown, mtime, dry_run).await
                        }
                        Err(e) => Err(e),
                    },
                    (v, _) => Ok(v),
                };
                let verdict = match verdict {
                    Ok(v) => v,
                    Err(e) => return self.failed_before(rpath, e),
                };
                if let Some(o) = self.report(verdict, dry_run, &rpath, &shown(&rel), size) {
                    return (rpath, Ok(o));
                }
                let dir = match open_dir() {
                    Ok(d) => d,
                    Err(e) => return self.failed_before(rpath, e),
                };
                let slots = if size <= SMALL_FILE {
                    Slots::One(self.pick_slot())
                } else {
                    Slots::All
                };
                let out = Out::File {
                    work: Work::new(root.clone(), work_name.clone(), &rel),
                    dir,
                    name: name.to_string(),
                    group: Some(group.clone()),
                };
                let r = self.download_file(&rpath, out, slots).await;
                (rpath, r.map(Outcome::Sent))
            })
            .buffer_unordered(files_in_flight(
                FILES_PER_CONN * self.connections(),
                self.connections(),
            ));
        summary
            .collect(futures::stream::select(results, small))
            .await;
        Work::new(root.clone(), work_name.clone(), "").tidy();
        for rel in &plan.links {
            let target = &src.links[rel];
            let r = self.link(dry_run, shown(rel), target, async {
                let (dir_rel, name) = rel_split(rel);
                let made = root.walk(dir_rel).and_then(|d| d.symlink(name, target));
                made.map_err(|e| Error::io(shown(rel), e))
            });
            if let Err(e) = r.await {
                summary.fail(self, shown(rel), e);
            } else if !dry_run {
                summary.links += 1;
            }
        }
        if dry_run {
            return Ok(summary);
        }

        // Directory metadata last, deepest first. Each directory is synced once here (its
        // renames) rather than after every rename in it. A run that changed nothing leaves
        // alone the directories whose mtime is already the source's.
        let changed = summary.changed() || dirs.iter().any(|d| d.created.is_some());
        for d in dirs.into_iter().filter(|d| changed || !d.same) {
            let r = root.walk(&d.rel).and_then(|dir| {
                if changed {
                    dir.sync()?;
                }
                match (d.created, d.chmod) {
                    (Some(mode), _) => dir.set_meta(new_mode(mode, preserve), d.mtime_ns),
                    (None, Some(mode)) => dir.set_meta(mode, d.mtime_ns),
                    (None, None) if d.keep => Ok(()),
                    (None, None) => dir.set_mtime(d.mtime_ns),
                }
            });
            if let Err(e) = r {
                let shown = root.display(&d.rel);
                summary.fail(self, shown.clone(), Error::io(shown, e));
            }
        }
        Ok(summary)
    }

    /// `-p`: files the destination keeps (the same, or to be compared by hash) whose mode is
    /// not the source's get it, as `rsync -p` does: a chmod on the source reaches the mirror.
    /// Through the file's own descriptor, opened as the walk saw it (never a symlink).
    async fn chmod_kept_files(
        &self,
        summary: &mut TreeSummary,
        root: &LocalDir,
        plan: &Plan,
        src: &Walk,
        dst: &Walk,
        shown: &dyn Fn(&str) -> String,
    ) {
        let todo: Vec<(String, u32)> = plan
            .files
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Same(_) | Verdict::Hash))
            .filter_map(|(rel, _)| match (src.nodes.get(rel), dst.nodes.get(rel)) {
                (Some(Node::File { mode: want, .. }), Some(Node::File { mode: have, .. }))
                    if *have != want & 0o777 =>
                {
                    Some((rel.clone(), want & 0o777))
                }
                _ => None,
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let root = root.clone();
        let failed = spawn_blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            let mut failed = Vec::new();
            for (rel, mode) in todo {
                let r = root
                    .open_source(&rel)
                    .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(mode)));
                if let Err(e) = r {
                    failed.push((rel, e));
                }
            }
            Ok(failed)
        })
        .await
        .unwrap_or_default();
        for (rel, e) in failed {
            summary.fail(self, shown(&rel), Error::io(shown(&rel), e));
        }
    }

    /// The plan's files with their sizes, in the order they are transferred.
    fn plan_files(&self, plan: &Plan, src: &Walk) -> Vec<(String, u64, Verdict)> {
        plan.files
            .iter()
            .filter_map(|(rel, v)| match src.nodes.get(rel) {
                Some(Node::File { size, .. }) => Some((rel.clone(), *size, *v)),
                _ => None,
            })
            .collect()
    }

    /// Uploads the local directory `local` to the remote directory `remote` (created with
    /// parents if missing), leaving alone the files the server already holds (as
    /// [`Client::download_tree`] decides, with the same [`SyncOptions`]). Symlinks and
    /// special files are skipped. `--delete` removes remote entries the local tree lacks
    /// beneath `remote` (fsd never follows symlinks there): each by one recursive REMOVE, or,
    /// with a filter, entry by entry as the walk listed them, so that nothing excluded goes
    /// (see `delete`).
    pub async fn upload_tree(
        &self,
        local: &Path,
        remote: &str,
        opts: &UploadOptions,
        sync: &SyncOptions,
    ) -> Result<TreeSummary> {
        let sync = &self.sync_options(sync);
        let md = std::fs::metadata(local).map_err(|e| Error::io(local.display(), e))?;
        if !md.is_dir() {
            return Err(Error::Usage(format!(
                "{}: not a directory (drop -r)",
                local.display()
            )));
        }
        let root = LocalDir::open(local).map_err(|e| Error::io(local.display(), e))?;
        let (walked, filter) = (root.clone(), sync.filter.clone());
        let links = sync.links;
        // A source: fsc makes no working directory there, so every entry is the user's.
        let mut src = spawn_blocking(move || Ok(walk_local(&walked, &filter, links, None))).await?;
        let (mut dst, top_dst) = match self.stat(remote).await {
            Ok(e) if e.kind == Kind::Dir => (
                self.walk_remote(remote, &sync.filter, sync.links).await?,
                Some(e.mtime_ns),
            ),
            // Nothing there yet (or not a directory: creating it says what is wrong).
            Ok(_) => (Walk::default(), None),
            Err(e) if e.remote_code() == Some(ErrorCode::NotFound) => (Walk::default(), None),
            Err(e) => return Err(e),
        };
        let shown = |rel: &str| match rel {
            "" => remote.to_string(),
            rel => remote_join(remote, rel),
        };
        let mut summary = TreeSummary::default();
        let plan = self.plan_tree(&mut summary, &mut src, &mut dst, sync, &shown);
        let mut files = self.plan_files(&plan, &src);
        // Directories not created (failed, or beneath one that failed): what they would hold
        // fails with them, and everything else is still uploaded.
        let mut unmade = BTreeSet::new();
        if sync.dry_run && top_dst.is_none() {
            self.dry_run("mkdir", remote.to_string(), "new directory");
        }
        if !sync.dry_run {
            let remove = |rel: String, how: How| async move {
                match self.remove(&shown(&rel), how == How::Whole).await {
                    Ok(()) => Ok(Removal::Gone),
                    Err(e) => match e.remote_code() {
                        Some(ErrorCode::DirectoryNotEmpty) if how == How::Alone => {
                            Ok(Removal::NotEmpty)
                        }
                        // Gone meanwhile: as wanted (a local removal says the same).
                        Some(ErrorCode::NotFound) => Ok(Removal::Gone),
                        _ => Err(e),
                    },
                }
            };
            let filtered = !sync.filter.is_empty();
            self.delete_planned(&mut summary, &plan, &dst.nodes, filtered, &shown, remove)
                .await;
            unmade = self
                .make_dirs(&mut summary, remote, md.mode() & 0o7777, &plan, &src)
                .await;
            if !unmade.is_empty() {
                files.retain(|(rel, _, _)| {
                    let lost = in_unmade(&unmade, rel);
                    if lost {
                        summary.fail(self, shown(rel), Error::Usage(NO_DIRECTORY.into()));
                    }
                    !lost
                });
            }
            self.emit(Event::Plan {
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.1).sum(),
            });
        }
        let dry_run = sync.dry_run;
        let (small, files) = self
            .split_small(files, dry_run, |v| clobber_check(v, opts))
            .await;
        let root = &root;
        let small = self.upload_small(root, remote, opts, small);
        // The size of the remote file each upload replaces, if any: a delta upload then.
        let files: Vec<_> = files
            .into_iter()
            .map(|(rel, size, verdict)| {
                let old = match dst.nodes.get(&rel) {
                    Some(Node::File { size, .. }) => Some(*size),
                    _ => None,
                };
                (rel, size, verdict, old)
            })
            .collect();
        let results = futures::stream::iter(files)
            .map(|(rel, size, verdict, old)| async move {
                let rpath = shown(&rel);
                // Opened as the walk saw it: never through a symlink that replaced it since.
                let source = SourcePath::InTree {
                    root: root.clone(),
                    rel: rel.clone(),
                };
                let shown_local = source.shown();
                let opened = source.clone();
                let verdict = clobber_check(verdict, opts);
                let verdict =
                    self.settle_hash(verdict, &rpath, shown_local.clone(), move || opened.open());
                let verdict = match verdict.await {
                    Ok(v) => v,
                    Err(e) => return self.failed_before(rpath, e),
                };
                if let Some(o) = self.report(verdict, dry_run, &rpath, &shown_local, size) {
                    return (rpath, Ok(o));
                }
                let slots = if size <= SMALL_FILE {
                    Slots::One(self.pick_slot())
                } else {
                    Slots::All
                };
                let r = self.upload_file(&source, &rpath, opts, slots, old).await;
                (rpath, r.map(Outcome::Sent))
            })
            .buffer_unordered(files_in_flight(
                FILES_PER_CONN * self.connections(),
                self.connections(),
            ));
        summary
            .collect(futures::stream::select(results, small))
            .await;
        for rel in &plan.links {
            let (path, target) = (shown(rel), &src.links[rel]);
            if in_unmade(&unmade, rel) {
                summary.fail(self, path, Error::Usage(NO_DIRECTORY.into()));
                continue;
            }
            if let Err(e) = self
                .link(dry_run, path.clone(), target, self.symlink(&path, target))
                .await
            {
                summary.fail(self, path, e);
            } else if !dry_run {
                summary.links += 1;
            }
        }
        if !dry_run {
            let top = (
                md.mode() & 0o7777,
                crate::sync::mtime_ns(md.mtime(), md.mtime_nsec()),
            );
            let mut dirs = TreeDir::all(&plan, &src, &dst, top, top_dst, false);
            dirs.retain(|d| !unmade.contains(&d.rel));
            let changed = summary.changed() || dirs.iter().any(|d| d.created.is_some());
            let stamp = dirs.into_iter().filter(|d| !d.keep && (changed || !d.same));
            let stamped = futures::stream::iter(stamp)
                .map(|d| async move {
                    let path = shown(&d.rel);
                    let r = self.set_dir_mtime(&path, d.mtime_ns).await;
                    (path, r)
                })
                .buffer_unordered(LISTS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            for (path, r) in stamped {
                if let Err(e) = r {
                    summary.fail(self, path, e);
                }
            }
        }
        Ok(summary)
    }

    /// Creates `remote` (with parents) and the plan's new directories beneath it: parents
    /// before children, one level at a time, each level's MKDIRs overlapping. A directory that
    /// cannot be created is a failure (recorded in `summary`); nothing beneath it is tried.
    /// Returns the directories not created, by relative path ("" for `remote` itself).
    async fn make_dirs(
        &self,
        summary: &mut TreeSummary,
        remote: &str,
        top_mode: u32,
        plan: &Plan,
        src: &Walk,
    ) -> BTreeSet<String> {
        let mut by_depth: Vec<Vec<(String, u32)>> = vec![vec![(String::new(), top_mode)]];
        for (rel, _) in plan.dirs.iter().filter(|(_, create)| *create) {
            let Some(Node::Dir { mode, .. }) = src.nodes.get(rel) else {
                continue;
            };
            let depth = depth_of(rel);
            if by_depth.len() <= depth {
                by_depth.resize(depth + 1, Vec::new());
            }
            by_depth[depth].push((rel.clone(), *mode));
        }
        let mut unmade = BTreeSet::new();
        for level in by_depth {
            let (lost, level): (Vec<_>, Vec<_>) = level
                .into_iter()
                .partition(|(rel, _)| in_unmade(&unmade, rel));
            unmade.extend(lost.into_iter().map(|(rel, _)| rel));
            let made = futures::stream::iter(level)
                .map(|(rel, mode)| async move {
                    let path = match rel.as_str() {
                        "" => remote.to_string(),
                        rel => remote_join(remote, rel),
                    };
                    let r = self.mkdir(&path, true, mode).await;
                    (rel, path, r)
                })
                .buffer_unordered(LISTS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            for (rel, path, r) in made {
                if let Err(e) = r {
                    summary.fail(self, path, e);
                    unmade.insert(rel);
                }
            }
        }
        unmade
    }
}

/// Why an entry beneath a directory that could not be created is not uploaded.
const NO_DIRECTORY: &str = "not uploaded: its directory could not be created";

/// Whether `rel` lies beneath a directory of `unmade` (relative paths, "" the top).
fn in_unmade(unmade: &BTreeSet<String>, rel: &str) -> bool {
    if unmade.is_empty() {
        return false;
    }
    unmade.contains("")
        || rel
            .match_indices('/')
            .any(|(i, _)| unmade.contains(&rel[..i]))
}

impl Client {
    /// A file of a tree that failed before its transfer began (comparing it, opening its
    /// directory): reported as the transfer would have reported it.
    fn failed_before(&self, path: String, e: Error) -> (String, Result<Outcome>) {
        self.emit(error_event(&path, &e));
        (path, Err(e))
    }
}

fn error_event(path: &str, e: &Error) -> Event {
    Event::Error {
        path: path.to_string(),
        code: e.exit_code(),
        message: e.message_for(path),
    }
}

impl TreeSummary {
    /// Records (and reports) a failure that is not a file transfer's own.
    pub(crate) fn fail(&mut self, client: &Client, path: String, e: Error) {
        client.emit(error_event(&path, &e));
        self.keep_failure(path, e);
    }

    fn keep_failure(&mut self, path: String, e: Error) {
        if self.failed.len() < MAX_KEPT_FAILURES {
            self.failed.push((path, e));
        } else {
            self.failed_more += 1;
            self.failed_more_code = self.failed_more_code.max(e.exit_code());
        }
    }

    async fn collect(&mut self, results: impl futures::Stream<Item = (String, Result<Outcome>)>) {
        futures::pin_mut!(results);
        while let Some((path, r)) = results.next().await {
            match r {
                Ok(Outcome::Sent(t)) => {
                    self.files += 1;
                    self.bytes += t.bytes;
                    self.transferred += t.transferred;
                }
                Ok(Outcome::Unchanged) => self.unchanged += 1,
                Ok(Outcome::DryRun) => {}
                Err(e) => self.keep_failure(path, e),
            }
        }
    }

    /// Whether the run changed the destination's contents (so directory mtimes moved).
    fn changed(&self) -> bool {
        self.files > 0 || self.deleted > 0 || self.links > 0
    }

    /// The exit code for this outcome: 0 if everything verified, else the worst failure's.
    pub fn exit_code(&self) -> i32 {
        self.failed
            .iter()
            .map(|(_, e)| e.exit_code())
            .fold(self.failed_more_code, i32::max)
    }
}
