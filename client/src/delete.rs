//! `--delete` carried out, on either side: removing what a tree's plan deletes
//! ([`Plan::delete`]) and reporting the directories it keeps ([`Plan::kept`]).
//!
//! The plan comes from the walks, which applied the filter: nothing the destination's walk left
//! out lies beneath a deleted entry, and every directory above an excluded entry is kept. The
//! filter is not matched again here, so it cannot be matched differently from the walks.
//!
//! Without a filter, each deleted entry goes whole (`LocalDir::remove_all`, or one recursive
//! REMOVE): there is nothing to spare. With one, an excluded entry may still appear between the
//! walk and the removal (a log being written), and a recursive removal would take it along. So
//! every entry the walk listed beneath a deleted one is removed by itself, deepest level first,
//! and a directory only while it is empty (REMOVE without `recursive`, rmdir): whatever the walk
//! did not see stays, and so does its directory — reported with an [`Event::Kept`], not as a
//! failure. The walk bounded what it listed (entries, bytes of names, depth), and this never
//! lists anything more.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use futures::stream::StreamExt;

use crate::client::Client;
use crate::error::Result;
use crate::progress::Event;
use crate::sync::{Node, Plan};
use crate::tree::TreeSummary;
use crate::walk::LISTS_IN_FLIGHT;

/// How one removal is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// The entry and everything beneath it (no filter in effect).
    Whole,
    /// The entry by itself: a directory only if it is empty.
    Alone,
}

/// What a removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Removed (or already gone).
    Gone,
    /// A directory that is not empty: left in place.
    NotEmpty,
}

/// Why the plan keeps a directory (`--dry-run` says it too).
pub(crate) const HOLDS_EXCLUDED: &str = "holds excluded entries";
/// Why a directory was found not empty when removed by itself.
const NOT_EMPTY: &str = "not empty: it holds entries the listing did not show";

impl Client {
    /// Removes the plan's deletions from the destination with `remove` (relative path, how),
    /// and reports them and the plan's kept directories. `filtered`: a filter is in effect,
    /// so every entry goes by itself (see the module doc). Entries of one level are removed
    /// concurrently, [`LISTS_IN_FLIGHT`] at a time.
    pub(crate) async fn delete_planned<F, Fut>(
        &self,
        summary: &mut TreeSummary,
        plan: &Plan,
        dst: &BTreeMap<String, Node>,
        filtered: bool,
        shown: &dyn Fn(&str) -> String,
        remove: F,
    ) where
        F: Fn(String, How) -> Fut,
        Fut: Future<Output = Result<Removal>>,
    {
        let tops: HashSet<&str> = plan.delete.iter().map(String::as_str).collect();
        let how = if filtered { How::Alone } else { How::Whole };
        // Directories beneath which something stayed: they stay too, without an event of
        // their own (what stayed has one).
        let mut stuck = HashSet::new();
        for level in removal_levels(&plan.delete, dst, how) {
            let (skip, todo): (Vec<&str>, Vec<&str>) =
                level.into_iter().partition(|rel| stuck.contains(*rel));
            for rel in skip {
                stick(&mut stuck, rel);
            }
            let done = futures::stream::iter(todo)
                .map(|rel| {
                    let removed = remove(rel.to_string(), how);
                    async move { (rel, removed.await) }
                })
                .buffer_unordered(LISTS_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await;
            for (rel, r) in done {
                match r {
                    Ok(Removal::Gone) => {
                        // A directory counts once, as the plan lists it.
                        if tops.contains(rel) {
                            summary.deleted += 1;
                            self.emit(Event::Deleted { path: shown(rel) });
                        }
                    }
                    Ok(Removal::NotEmpty) => {
                        summary.kept += 1;
                        self.emit(Event::Kept {
                            path: shown(rel),
                            reason: NOT_EMPTY.into(),
                        });
                        stick(&mut stuck, rel);
                    }
                    Err(e) => {
                        summary.fail(self, shown(rel), e);
                        stick(&mut stuck, rel);
                    }
                }
            }
        }
        for rel in &plan.kept {
            summary.kept += 1;
            self.emit(Event::Kept {
                path: shown(rel),
                reason: HOLDS_EXCLUDED.into(),
            });
        }
    }
}

/// Marks every directory above `rel` as one that stays. Stops at the first one already marked
/// (those above it are too), so a tree costs one insert per directory, however many entries
/// beneath them stay.
fn stick(stuck: &mut HashSet<String>, mut rel: &str) {
    while let Some((parent, _)) = rel.rsplit_once('/') {
        if !stuck.insert(parent.to_string()) {
            break;
        }
        rel = parent;
    }
}

/// What to remove, deepest level first: the plan's deletions (`delete`) and, removed
/// [`How::Alone`], every entry of the destination's walk (`dst`) beneath them.
fn removal_levels<'a>(
    delete: &'a [String],
    dst: &'a BTreeMap<String, Node>,
    how: How,
) -> Vec<Vec<&'a str>> {
    if how == How::Whole {
        return vec![delete.iter().map(String::as_str).collect()];
    }
    let mut by_depth: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for top in delete {
        // Exactly the keys that begin with "top/": '0' follows '/'.
        let beneath = dst
            .range(format!("{top}/")..format!("{top}0"))
            .map(|(rel, _)| rel.as_str());
        for rel in std::iter::once(top.as_str()).chain(beneath) {
            by_depth
                .entry(rel.matches('/').count())
                .or_default()
                .push(rel);
        }
    }
    by_depth.into_values().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_every_listed_entry_goes_deepest_first_and_nothing_else() {
        let file = Node::File {
            size: 1,
            mtime_ns: 1,
            mode: 0o644,
        };
        let dir = Node::Dir {
            mode: 0o755,
            mtime_ns: 1,
        };
        let dst: BTreeMap<String, Node> = [
            ("a", dir),
            ("a/b", dir),
            ("a/b/c", file),
            ("a/f", file),
            ("a-x", file),
            ("a0", file),
            ("k", dir),
            ("k/z", file),
            ("s", file),
        ]
        .into_iter()
        .map(|(r, n)| (r.to_string(), n))
        .collect();
        let delete = ["a".to_string(), "s".to_string()];
        let levels = removal_levels(&delete, &dst, How::Alone);
        assert_eq!(levels, [vec!["a/b/c"], vec!["a/b", "a/f"], vec!["a", "s"]]);
        let levels = removal_levels(&delete, &dst, How::Whole);
        assert_eq!(levels, [vec!["a", "s"]]);
    }

    #[test]
    fn what_stays_holds_up_every_directory_above_it() {
        let mut stuck = HashSet::new();
        stick(&mut stuck, "a/b/c/d");
        stick(&mut stuck, "a/b/e");
        stick(&mut stuck, "top");
        let mut v: Vec<_> = stuck.into_iter().collect();
        v.sort();
        assert_eq!(v, ["a", "a/b", "a/b/c"]);
    }
}
