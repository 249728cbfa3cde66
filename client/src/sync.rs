//! Sync decisions, apart from any I/O: whether a destination file already holds the source
//! (rsync's quick check, or BLAKE3 with `--checksum`), what a tree transfer must delete, create
//! and copy ([`plan`]), and the `--exclude`/`--include` filter.
//!
//! Both directions use the same code: a tree walk of each side gives a map from relative path
//! (`a/b/c`, `/`-separated, UTF-8) to [`Node`], and [`plan`] compares the two maps. The walks
//! live with the transfers (`tree`), the checks of single files in `Client::download_sync` /
//! `Client::upload_sync`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::error::{Error, Result};

/// How a transfer decides what to move, and what else it may do to the destination.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Compare whole-file BLAKE3 instead of size and mtime (files of equal size only: a size
    /// difference is a change either way).
    pub checksum: bool,
    /// Trees: remove destination entries that the source does not have (never excluded ones).
    /// Refused when any listing of either side failed.
    pub delete: bool,
    /// Report what would be copied, updated, deleted or skipped; change nothing.
    pub dry_run: bool,
    /// Trees: entries left out of the transfer (and protected from `delete`, with every
    /// directory above them).
    pub filter: Filter,
    /// Trees: copy symlinks as symlinks (`-l`), those whose relative target stays inside the
    /// tree; others, and all of them without this, are skipped with a note.
    pub links: bool,
}

/// One filter rule, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `--exclude PATTERN`: a gitignore line.
    Exclude(String),
    /// `--include PATTERN`: the gitignore line `!PATTERN`.
    Include(String),
    /// `--exclude-from FILE`: the lines of a gitignore file (`#` comments, `!` re-includes).
    ExcludeFrom(PathBuf),
}

/// Gitignore semantics over paths relative to the tree's top: the *last* rule that matches
/// decides (`!` or `--include` re-includes); a pattern without `/` matches a name at any depth,
/// one with a `/` is anchored at the top, a trailing `/` matches directories only, `**` spans
/// directories. An excluded directory is not descended into, so nothing beneath it can be
/// re-included (as in git).
#[derive(Clone, Default)]
pub struct Filter(Option<Arc<Gitignore>>);

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.as_ref().map_or(0, |g| g.len());
        write!(f, "Filter({n} rules)")
    }
}

/// Longest `--exclude-from` file read (a filter, not a data set).
const MAX_FILTER_FILE: u64 = 1 << 20;

impl Filter {
    pub fn new(rules: &[Rule]) -> Result<Filter> {
        if rules.is_empty() {
            return Ok(Filter(None));
        }
        // Root "." makes the matcher take our relative paths as they are.
        let mut b = GitignoreBuilder::new(".");
        let mut add = |from: Option<&Path>, line: &str| {
            b.add_line(from.map(Path::to_path_buf), line)
                .map(|_| ())
                .map_err(|e| Error::Usage(format!("filter {line:?}: {e}")))
        };
        for r in rules {
            match r {
                Rule::Exclude(p) => add(None, p)?,
                Rule::Include(p) => add(None, &format!("!{p}"))?,
                Rule::ExcludeFrom(file) => {
                    let text = read_small(file)?;
                    for line in text.lines() {
                        add(Some(file), line)?;
                    }
                }
            }
        }
        let g = b
            .build()
            .map_err(|e| Error::Usage(format!("filter: {e}")))?;
        Ok(Filter(Some(Arc::new(g))))
    }

    /// Whether the entry at `rel` (relative to the tree's top) is left out.
    pub fn excludes(&self, rel: &str, is_dir: bool) -> bool {
        self.0
            .as_ref()
            .is_some_and(|g| g.matched(rel, is_dir).is_ignore())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

fn read_small(file: &Path) -> Result<String> {
    use std::io::Read;
    let err = |e| Error::io(file.display(), e);
    let mut text = String::new();
    std::fs::File::open(file)
        .map_err(err)?
        .take(MAX_FILTER_FILE + 1)
        .read_to_string(&mut text)
        .map_err(err)?;
    if text.len() as u64 > MAX_FILTER_FILE {
        return Err(Error::Usage(format!(
            "{}: longer than {MAX_FILTER_FILE} bytes",
            file.display()
        )));
    }
    Ok(text)
}

/// An mtime in nanoseconds from a stat's seconds and nanoseconds, saturating as fsd does
/// (`src/fs/root.rs`): a file from beyond the year 2262 (or before 1677) gets the end of the
/// range rather than overflowing.
pub(crate) fn mtime_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// What one side holds at a path, as far as syncing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    File {
        size: u64,
        mtime_ns: i64,
        mode: u32,
    },
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    /// A symlink copied as one (`-l`): `target` identifies its link text (the text itself is
    /// in [`crate::walk::Walk::links`]). Never followed.
    Link {
        target: u64,
    },
    /// A symlink or special file: never transferred, never followed.
    Other,
}

/// What identifies a symlink's text in a [`Node::Link`].
pub(crate) fn link_id(target: &str) -> u64 {
    let h = blake3::hash(target.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Why a file is copied, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not at the destination.
    New,
    /// At the destination, different: the reason.
    Changed(&'static str),
    /// At the destination and the same: how that was decided.
    Same(&'static str),
    /// Same size and `--checksum`: the hashes decide.
    Hash,
}

pub(crate) const SAME_QUICK: &str = "same size and mtime";
pub(crate) const SAME_HASH: &str = "same BLAKE3";

/// The quick check (or its `--checksum` variant) of a source file against what the destination
/// has there (`None`: nothing, or not a file). mtimes are compared to the destination's
/// precision ([`same_mtime`]).
pub(crate) fn compare(src: (u64, i64), dst: Option<(u64, i64)>, checksum: bool) -> Verdict {
    let Some((size, mtime_ns)) = dst else {
        return Verdict::New;
    };
    if size != src.0 {
        Verdict::Changed("size differs")
    } else if checksum {
        Verdict::Hash
    } else if !same_mtime(src.1, mtime_ns) {
        Verdict::Changed("mtime differs")
    } else {
        Verdict::Same(SAME_QUICK)
    }
}

/// Whether the destination's mtime `dst` is the source's `src` as far as the destination can
/// keep it: to the nanosecond, or to the second when the destination's has no nanoseconds (a
/// file system with 1-second mtimes — ext4 with 128-byte inodes, ext3, HFS+, many network
/// file systems — stores the seconds of what fsc set). Else every run would transfer every
/// file there again. (Both sides set mtimes exactly; a destination that truly has a whole
/// second and the same size within that second of the source is taken as the same file, as
/// `rsync --modify-window` would.)
pub(crate) fn same_mtime(src: i64, dst: i64) -> bool {
    const NS: i64 = 1_000_000_000;
    src == dst || (dst.rem_euclid(NS) == 0 && dst.div_euclid(NS) == src.div_euclid(NS))
}

/// What a tree transfer does, by relative path ("" is the top, never in here).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    /// Destination entries to remove before anything is created: not in the source, or of
    /// another type than the source's (only with `delete`). Only the topmost of a removed
    /// subtree is listed, and nothing excluded is beneath it; sorted.
    pub delete: Vec<String>,
    /// Destination directories `delete` would remove but that hold excluded entries, at any
    /// depth: they stay, with the excluded entries, and what else they hold is in `delete`
    /// (rsync's behaviour); sorted.
    pub kept: Vec<String>,
    /// Entries in the way of the source's that stay, and why: failures.
    pub blocked: Vec<(String, Blocked)>,
    /// Every source directory that is not blocked, parents first, and whether the destination
    /// lacks it (or it takes the place of a deleted entry): to create.
    pub dirs: Vec<(String, bool)>,
    /// Every source file that is not blocked, with its verdict.
    pub files: Vec<(String, Verdict)>,
    /// Source symlinks (`-l`) the destination lacks or has with another target, or of another
    /// type that a symlink replaces in place (a file, a symlink, a special file): to create.
    pub links: Vec<String>,
}

/// Why a source entry is not transferred: what is at the destination stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// An entry of another type, and no `delete`.
    OtherType,
    /// A directory `delete` keeps because it holds excluded entries.
    HoldsExcluded,
    /// An excluded entry of another type (a pattern for directories only, say `build/`, or a
    /// re-include of them): excluded entries are never deleted.
    Excluded,
}

impl Blocked {
    /// The failure's message.
    pub fn why(self) -> &'static str {
        match self {
            Blocked::OtherType => "something of another type is in the way (--delete replaces it)",
            Blocked::HoldsExcluded => {
                "a directory holding excluded entries is in the way; --delete keeps it, since \
                 excluded entries are never deleted"
            }
            Blocked::Excluded => {
                "an excluded entry of another type is in the way; excluded entries are never \
                 deleted"
            }
        }
    }
}

/// Compares a source tree with a destination tree (both already filtered). `dst_excluded`
/// holds the destination entries the filter left out (by the walk that made `dst`): never
/// deleted, and neither is any directory above one.
pub(crate) fn plan(
    src: &BTreeMap<String, Node>,
    dst: &BTreeMap<String, Node>,
    dst_excluded: &BTreeSet<String>,
    delete: bool,
    checksum: bool,
) -> Plan {
    let mut p = Plan::default();
    let mut gone = HashSet::new();
    let mut blocked = HashSet::new();
    // Destination entries where the source has something never transferred (a symlink
    // without -l, a special file): left as they are, with everything beneath them.
    let mut left = HashSet::new();
    // Under a removed or blocked directory nothing needs a decision of its own.
    let under = |set: &HashSet<&str>, rel: &str| ancestors(rel).any(|a| set.contains(a));
    let holding: HashSet<&str> = dst_excluded.iter().flat_map(|r| ancestors(r)).collect();
    for (rel, d) in dst {
        if under(&gone, rel) || under(&left, rel) {
            continue;
        }
        let differs = match (src.get(rel), d) {
            (None, _) => true,
            (Some(Node::File { .. }), Node::File { .. } | Node::Link { .. } | Node::Other)
            | (Some(Node::Link { .. }), Node::File { .. } | Node::Link { .. } | Node::Other)
            | (Some(Node::Dir { .. }), Node::Dir { .. }) => false,
            // A source symlink is not transferred: whatever the destination has there stays,
            // a directory with its contents (they used to be deleted one by one, as if the
            // source lacked them).
            (Some(Node::Other), _) => {
                left.insert(rel.as_str());
                false
            }
            // A symlink where a file goes is replaced by it (never followed); anything else of
            // another type is in the way.
            (Some(_), _) => {
                if !delete {
                    p.blocked.push((rel.clone(), Blocked::OtherType));
                    blocked.insert(rel.as_str());
                } else if holding.contains(rel.as_str()) {
                    p.blocked.push((rel.clone(), Blocked::HoldsExcluded));
                    blocked.insert(rel.as_str());
                }
                true
            }
        };
        if !(differs && delete) {
            continue;
        }
        if holding.contains(rel.as_str()) {
            // Stays, as with rsync. What it holds gets decisions of its own below; the source
            // has none of it (it lacks this directory, or has something else here).
            p.kept.push(rel.clone());
        } else {
            p.delete.push(rel.clone());
            gone.insert(rel.as_str());
        }
    }
    for (rel, s) in src {
        if blocked.contains(rel.as_str()) || under(&blocked, rel) {
            continue;
        }
        if dst_excluded.contains(rel) {
            // Excluded there but not here: the filter told them apart by type.
            p.blocked.push((rel.clone(), Blocked::Excluded));
            blocked.insert(rel.as_str());
            continue;
        }
        let d = if gone.contains(rel.as_str()) || under(&gone, rel) {
            None
        } else {
            dst.get(rel)
        };
        match s {
            Node::Dir { .. } => p.dirs.push((rel.clone(), d.is_none())),
            Node::File { size, mtime_ns, .. } => {
                let have = match d {
                    Some(Node::File { size, mtime_ns, .. }) => Some((*size, *mtime_ns)),
                    _ => None,
                };
                p.files
                    .push((rel.clone(), compare((*size, *mtime_ns), have, checksum)));
            }
            Node::Link { target } if d != Some(&Node::Link { target: *target }) => {
                p.links.push(rel.clone());
            }
            _ => {}
        }
    }
    p
}

/// `a/b/c` → `a`, `a/b` (proper ancestors, shortest first).
fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    rel.match_indices('/').map(move |(i, _)| &rel[..i])
}

/// BLAKE3 of a whole local file (the value fsd reports: docs/PROTOCOL.md §9).
pub(crate) fn hash_file(file: &std::fs::File) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(file)?;
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, mtime_ns: i64) -> Node {
        Node::File {
            size,
            mtime_ns,
            mode: 0o644,
        }
    }
    const DIR: Node = Node::Dir {
        mode: 0o755,
        mtime_ns: 0,
    };

    fn tree(entries: &[(&str, Node)]) -> BTreeMap<String, Node> {
        entries.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    #[test]
    fn mtimes_compare_to_the_destinations_precision() {
        let s = 1_700_000_000 * 1_000_000_000;
        assert!(same_mtime(s + 123, s + 123));
        assert!(same_mtime(s + 123, s), "a destination of whole seconds");
        assert!(!same_mtime(s + 123, s + 1));
        assert!(
            !same_mtime(s, s + 123),
            "the source's precision is not the question"
        );
        assert!(!same_mtime(s + 123, s - 1_000_000_000));
        assert!(
            same_mtime(-1_500_000_000, -2_000_000_000),
            "before 1970 too"
        );
    }

    #[test]
    fn the_quick_check_and_checksum() {
        assert_eq!(compare((5, 1), None, false), Verdict::New);
        assert_eq!(
            compare((5, 1), Some((5, 1)), false),
            Verdict::Same(SAME_QUICK)
        );
        assert_eq!(
            compare((5, 1), Some((5, 2)), false),
            Verdict::Changed("mtime differs")
        );
        assert_eq!(
            compare((5, 1), Some((6, 1)), false),
            Verdict::Changed("size differs")
        );
        assert_eq!(compare((5, 1), Some((5, 1)), true), Verdict::Hash);
        assert_eq!(
            compare((5, 1), Some((6, 1)), true),
            Verdict::Changed("size differs")
        );
    }

    #[test]
    fn a_plan_deletes_extras_topmost_and_replaces_other_types() {
        let src = tree(&[
            ("a", DIR),
            ("a/f", file(1, 1)),
            ("b", file(2, 2)),
            ("c", DIR),
            ("c/g", file(3, 3)),
            ("l", Node::Other),
            ("s", file(4, 4)),
        ]);
        let dst = tree(&[
            ("a", DIR),
            ("a/f", file(1, 1)),
            ("a/x", file(9, 9)),
            ("b", DIR),
            ("b/deep", file(1, 1)),
            ("c", file(3, 3)),
            ("l", file(1, 1)),
            ("s", Node::Other),
            ("z", DIR),
            ("z/y", DIR),
            ("z/y/q", file(1, 1)),
        ]);
        let p = plan(&src, &dst, &BTreeSet::new(), true, false);
        assert_eq!(p.delete, ["a/x", "b", "c", "z"]);
        assert!(p.blocked.is_empty());
        let dirs = [("a".to_string(), false), ("c".to_string(), true)];
        assert_eq!(p.dirs, dirs);
        assert_eq!(
            p.files,
            [
                ("a/f".to_string(), Verdict::Same(SAME_QUICK)),
                ("b".to_string(), Verdict::New),
                ("c/g".to_string(), Verdict::New),
                ("s".to_string(), Verdict::New),
            ]
        );

        // Without delete: extras stay, entries of another type block (and what is beneath).
        let p = plan(&src, &dst, &BTreeSet::new(), false, false);
        assert!(p.delete.is_empty());
        let why = Blocked::OtherType;
        assert_eq!(p.blocked, [("b".to_string(), why), ("c".to_string(), why)]);
        assert_eq!(p.dirs, [("a".to_string(), false)]);
        assert_eq!(
            p.files,
            [
                ("a/f".to_string(), Verdict::Same(SAME_QUICK)),
                ("s".to_string(), Verdict::New)
            ]
        );
    }

    #[test]
    fn what_the_destination_has_where_the_source_has_a_skipped_symlink_stays_whole() {
        let src = tree(&[("l", Node::Other)]);
        let dst = tree(&[("l", DIR), ("l/keep", file(1, 1)), ("l/d", DIR)]);
        let p = plan(&src, &dst, &BTreeSet::new(), true, false);
        assert!(p.delete.is_empty(), "{:?}", p.delete);
        assert!(p.blocked.is_empty() && p.files.is_empty() && p.dirs.is_empty());
    }

    #[test]
    fn delete_keeps_excluded_entries_and_every_directory_above_them() {
        // The destination walk left out gone/p.log, gone/sub/deeper/q.log, the directory
        // gone/cache and d2/r.log; d2 is a file in the source now.
        let excluded: BTreeSet<String> = ["gone/p.log", "gone/sub/deeper/q.log", "gone/cache"]
            .into_iter()
            .chain(["d2/r.log", "top.log"])
            .map(String::from)
            .collect();
        let src = tree(&[("a", file(1, 1)), ("d2", file(2, 2))]);
        let dst = tree(&[
            ("a", file(1, 1)),
            ("d2", DIR),
            ("d2/x", file(1, 1)),
            ("gone", DIR),
            ("gone/other", DIR),
            ("gone/other/o", file(1, 1)),
            ("gone/s", file(1, 1)),
            ("gone/sub", DIR),
            ("gone/sub/deeper", DIR),
            ("gone/sub/t", file(1, 1)),
            ("plain", DIR),
            ("plain/f", file(1, 1)),
        ]);
        let p = plan(&src, &dst, &excluded, true, false);
        assert_eq!(
            p.delete,
            ["d2/x", "gone/other", "gone/s", "gone/sub/t", "plain"]
        );
        assert_eq!(p.kept, ["d2", "gone", "gone/sub", "gone/sub/deeper"]);
        // The source's file d2 cannot go where the kept directory is: that one fails.
        assert_eq!(p.blocked, [("d2".to_string(), Blocked::HoldsExcluded)]);
        assert_eq!(p.files, [("a".to_string(), Verdict::Same(SAME_QUICK))]);
        assert!(p.dirs.is_empty());

        // Without delete nothing is kept or deleted, and d2 is in the way as before.
        let p = plan(&src, &dst, &excluded, false, false);
        assert!(p.delete.is_empty() && p.kept.is_empty());
        assert_eq!(p.blocked, [("d2".to_string(), Blocked::OtherType)]);
    }

    #[test]
    fn an_excluded_entry_of_another_type_blocks_the_source_entry() {
        // `--exclude build/`: the destination's directory build is excluded, the source's
        // file build is not; the file must not replace the directory, nor anything beneath
        // a source directory go where an excluded file is.
        let excluded: BTreeSet<String> = ["build", "x"].into_iter().map(String::from).collect();
        let src = tree(&[("build", file(1, 1)), ("x", DIR), ("x/y", file(1, 1))]);
        for delete in [true, false] {
            let p = plan(&src, &BTreeMap::new(), &excluded, delete, false);
            let why = Blocked::Excluded;
            assert_eq!(
                p.blocked,
                [("build".to_string(), why), ("x".to_string(), why)]
            );
            assert!(p.files.is_empty() && p.dirs.is_empty() && p.delete.is_empty());
        }
    }

    #[test]
    fn sibling_names_sorting_between_parent_and_child_are_not_children() {
        // "a-x" sorts between "a" and "a/..." and is not beneath "a".
        let src = tree(&[("a-x", file(1, 1))]);
        let dst = tree(&[("a", DIR), ("a-x", file(1, 1)), ("a/f", file(1, 1))]);
        let p = plan(&src, &dst, &BTreeSet::new(), true, false);
        assert_eq!(p.delete, ["a"]);
        assert_eq!(p.files, [("a-x".to_string(), Verdict::Same(SAME_QUICK))]);
    }

    #[test]
    fn filters_are_gitignore_lines_last_match_wins() {
        let f = Filter::new(&[
            Rule::Exclude("*.log".into()),
            Rule::Include("keep.log".into()),
            Rule::Exclude("build/".into()),
            Rule::Exclude("/top.txt".into()),
        ])
        .unwrap();
        assert!(f.excludes("x.log", false));
        assert!(f.excludes("d/e/x.log", false));
        assert!(!f.excludes("d/keep.log", false));
        assert!(f.excludes("src/build", true));
        assert!(!f.excludes("src/build", false), "dir-only pattern");
        assert!(f.excludes("top.txt", false));
        assert!(!f.excludes("d/top.txt", false), "anchored");
        assert!(!f.excludes("x.txt", false));
        assert!(!Filter::default().excludes("x", false));

        let tmp = tempfile::tempdir().unwrap();
        let list = tmp.path().join("ex");
        std::fs::write(&list, "# comment\n*.tmp\n!important.tmp\n").unwrap();
        let f = Filter::new(&[Rule::ExcludeFrom(list)]).unwrap();
        assert!(f.excludes("a/b.tmp", false));
        assert!(!f.excludes("important.tmp", false));
        assert!(Filter::new(&[Rule::ExcludeFrom(tmp.path().join("missing"))]).is_err());
    }
}
