//! Listing cursors: paging through a directory costs O(page) per LIST, not O(directory).
//!
//! LIST paging is stateless on the wire (the client sends the last name it got as `after`) and
//! readdir order is not name order, so a page served from scratch reads the whole directory:
//! paging through N names with limit 1 read it N times. Instead one scan ([`Scan`]) keeps,
//! sorted, as many of the names after `after` as fit in [`CURSOR_BYTES`], and later pages are
//! served from that [`Cursor`] by binary search. Paging through N names then costs about
//! N / (names per cursor) scans of N names whatever the page size, and memory stays within
//! [`MAX_CURSORS`] × [`CURSOR_BYTES`] per connection whatever the client sends.
//!
//! A cursor is used only while the directory's [`Stamp`] (device, inode, mtime and ctime in ns,
//! from one fstat taken before the scan) is unchanged, so a name created or removed between pages
//! makes the next page read the directory afresh, exactly as without cursors. A directory changed
//! less than [`RACY`] before its scan gets no cursor: on file systems with coarse timestamps a
//! second change within the same tick would leave the stamp as it was (git's "racy clean" case).
//! No I/O here: [`crate::fs::root::Root::list`] reads the directory and stats the entries.

use std::collections::{BinaryHeap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::stat::FileStat;

/// Most bytes one scan or cursor keeps: its names (with their `String` headers), directory path
/// and `after`. Typical 20-byte names: about 6,000 names per scan.
pub const CURSOR_BYTES: usize = 256 * 1024;
/// Cursors kept per connection, one per directory: fsc's tree walk pages several at once.
pub const MAX_CURSORS: usize = 4;
/// A directory changed this recently is not trusted to show its next change in its stamp.
pub use super::identity::RACY;

/// What a kept name costs in memory.
fn cost(name: &str) -> usize {
    name.len() + size_of::<String>()
}

/// A directory's identity and version, from fstat (O(1), unlike reading it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    pub fn of(st: &FileStat) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// Whether the directory changed so recently (by the clock at `now`) that a further change
    /// might not show in its timestamps.
    fn is_racy(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(UNIX_EPOCH) else {
            return true;
        };
        self.mtime_ns.max(self.ctime_ns) + RACY.as_nanos() as i128 > now.as_nanos() as i128
    }
}

/// One read of a directory: keeps the smallest names after `after` in a heap, as many as fit in
/// its budget but never fewer than one page (`min`), so it costs O(N log kept) and its memory
/// does not follow the directory's size.
pub struct Scan {
    dir: String,
    stamp: Stamp,
    after: String,
    min: usize,
    /// [`CURSOR_BYTES`], or 0 when no cursor will be kept (then only the page is).
    budget: usize,
    heap: BinaryHeap<String>,
    bytes: usize,
    /// Some name after `after` was left out: the directory holds more than the kept names.
    truncated: bool,
    /// Names the caller could not offer (not UTF-8).
    unlisted: u32,
}

impl Scan {
    /// Counts a name that cannot be listed (the caller leaves it out).
    pub fn unlisted(&mut self) {
        self.unlisted = self.unlisted.saturating_add(1);
    }

    /// Offers one name read from the directory (the caller has left out names never listed).
    pub fn offer(&mut self, name: String) {
        if name <= self.after {
            return;
        }
        let full = self.bytes + cost(&name) > self.budget && self.heap.len() >= self.min;
        if full && self.heap.peek().is_some_and(|max| *max < name) {
            self.truncated = true;
            return;
        }
        self.bytes += cost(&name);
        self.heap.push(name);
        while self.bytes > self.budget && self.heap.len() > self.min {
            let max = self.heap.pop().expect("the heap holds more than min names");
            self.bytes -= cost(&max);
            self.truncated = true;
        }
    }

    /// The cursor of the finished scan.
    pub fn into_cursor(self) -> Cursor {
        Cursor {
            keep: self.budget > 0 && self.bytes <= self.budget,
            dir: self.dir,
            stamp: self.stamp,
            after: self.after,
            names: self.heap.into_sorted_vec(),
            truncated: self.truncated,
            unlisted: self.unlisted,
        }
    }
}

/// The names of a directory after some name, sorted, as they were at one scan: every name in
/// (`after`, last kept name] if truncated, every name after `after` if not.
#[derive(Debug)]
pub struct Cursor {
    dir: String,
    stamp: Stamp,
    after: String,
    names: Vec<String>,
    truncated: bool,
    /// Names of the directory that cannot be listed (not UTF-8), at the scan.
    unlisted: u32,
    /// Worth keeping: small enough, and the stamp will show the directory's next change.
    keep: bool,
}

impl Cursor {
    /// Whether this cursor holds a full page after `after` in directory `dir` as it is now.
    fn serves(&self, dir: &str, stamp: &Stamp, after: &str, limit: usize) -> bool {
        self.dir == dir
            && self.stamp == *stamp
            && self.after.as_str() <= after
            && (!self.truncated || self.names.len() - self.start(after) >= limit)
    }

    fn start(&self, after: &str) -> usize {
        self.names.partition_point(|n| n.as_str() <= after)
    }

    /// Names of the directory that cannot be listed (not UTF-8), at the scan.
    pub fn unlisted(&self) -> u32 {
        self.unlisted
    }

    /// The (at most `limit`) names after `after`, and whether the directory holds more after
    /// them. `after` must not be before the scan's.
    pub fn page(&self, after: &str, limit: usize) -> (&[String], bool) {
        debug_assert!(self.after.as_str() <= after);
        let start = self.start(after);
        let end = start.saturating_add(limit).min(self.names.len());
        (
            &self.names[start..end],
            end < self.names.len() || self.truncated,
        )
    }
}

/// One connection's listing cursors, most recently used last.
#[derive(Debug, Default)]
pub struct ListCursors {
    cursors: VecDeque<Cursor>,
    scans: u64,
}

impl ListCursors {
    /// Directory scans done so far (each reads a whole directory; pages from a cursor do not).
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// Takes out the cursor that serves a `limit`-name page after `after` in `dir` (a path
    /// relative to the session's root) whose stamp is now `stamp`. Any other cursor of `dir` is
    /// dropped: it is stale, or the caller's scan is about to replace it.
    pub fn take(&mut self, dir: &str, stamp: &Stamp, after: &str, limit: usize) -> Option<Cursor> {
        let i = self.cursors.iter().position(|c| c.dir == dir)?;
        let cursor = self.cursors.remove(i)?;
        cursor.serves(dir, stamp, after, limit).then_some(cursor)
    }

    /// Starts a scan of directory `dir` for a `limit`-name page after `after`; `stamp` is the
    /// directory's, taken before the scan. A directory changed too recently to be trusted
    /// gets a scan that keeps only the page, as no cursor of it will be kept.
    pub fn scan(&mut self, dir: &str, stamp: Stamp, after: &str, limit: usize) -> Scan {
        self.scans += 1;
        let budget = if stamp.is_racy(SystemTime::now()) {
            0
        } else {
            CURSOR_BYTES
        };
        Scan {
            dir: dir.to_owned(),
            stamp,
            after: after.to_owned(),
            min: limit,
            budget,
            heap: BinaryHeap::new(),
            bytes: dir.len() + after.len(),
            truncated: false,
            unlisted: 0,
        }
    }

    /// Keeps `cursor` for the next page if it is worth keeping, dropping the least recently
    /// used cursor beyond [`MAX_CURSORS`].
    pub fn put(&mut self, cursor: Cursor) {
        if !cursor.keep {
            return;
        }
        if self.cursors.len() >= MAX_CURSORS {
            self.cursors.pop_front();
        }
        self.cursors.push_back(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stamp of directory 1:2 last changed at `ns` (0: long ago).
    fn stamp(ns: i128) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            mtime_ns: ns,
            ctime_ns: ns,
        }
    }

    /// A scan of `dir` (stamp 0) offered `names`, finished.
    fn scan(
        lists: &mut ListCursors,
        dir: &str,
        after: &str,
        min: usize,
        names: &[String],
    ) -> Cursor {
        let mut scan = lists.scan(dir, stamp(0), after, min);
        for name in names {
            scan.offer(name.clone());
        }
        scan.into_cursor()
    }

    #[test]
    fn a_scan_keeps_the_smallest_names_within_its_bytes_but_always_one_page() {
        // 200-byte names, offered in an order unlike the sorted one.
        let names: Vec<String> = (0..4000)
            .map(|i| format!("{:0200}", (i * 7919) % 4000))
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        let lists = &mut ListCursors::default();

        let c = scan(lists, "d", "", 1, &names);
        assert!(c.truncated && c.keep);
        assert!(c.names.len() > 1000 && c.names.len() < 4000);
        assert!(c.names.iter().map(|n| cost(n)).sum::<usize>() <= CURSOR_BYTES);
        assert_eq!(c.names, sorted[..c.names.len()]);

        // A page bigger than the budget is still read whole (and is then not worth keeping).
        let c = scan(lists, "d", &sorted[9], 3000, &names);
        assert!(c.truncated && !c.keep);
        assert_eq!(c.names, sorted[10..3010]);

        let c = scan(lists, "d", &sorted[3990], 5, &names);
        assert!(!c.truncated && c.keep);
        assert_eq!(c.names, sorted[3991..]);

        // A directory changed just now: only the page is read, and no cursor kept.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mut s = lists.scan("d", stamp(now.as_nanos() as i128), "", 5);
        for name in &names {
            s.offer(name.clone());
        }
        let c = s.into_cursor();
        assert!(c.truncated && !c.keep);
        assert_eq!(c.names, sorted[..5]);
        lists.put(c);
        assert!(lists.cursors.is_empty());
        assert_eq!(lists.scans(), 4);
    }

    #[test]
    fn a_cursor_serves_any_later_after_only_while_the_stamp_holds() {
        let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let lists = &mut ListCursors::default();
        let c = scan(lists, "d", "n2", 1, &names);
        assert!(c.keep && !c.truncated);
        assert_eq!(c.page("n2", 3), (&names[3..6], true));
        assert_eq!(c.page("n5", 100), (&names[6..], false));
        assert_eq!(c.page("n55", 2), (&names[6..8], true));
        assert!(c.serves("d", &stamp(0), "n9", 10));
        assert!(
            !c.serves("d", &stamp(0), "n1", 1),
            "before the scan's after"
        );
        assert!(!c.serves("e", &stamp(0), "n3", 1), "another directory");
        assert!(!c.serves("d", &stamp(1), "n3", 1), "the directory changed");
        lists.put(c);
        assert!(lists.take("d", &stamp(1), "n3", 1).is_none());
        assert!(
            lists.take("d", &stamp(0), "n3", 1).is_none(),
            "dropped as stale"
        );
    }

    #[test]
    fn a_truncated_cursor_serves_only_full_pages_and_cursors_are_bounded() {
        let names: Vec<String> = (0..4000).map(|i| format!("{i:0200}")).collect();
        let lists = &mut ListCursors::default();
        let c = scan(lists, "d", "", 1, &names);
        let kept = c.names.len();
        assert!(c.truncated && c.keep);
        assert!(c.serves("d", &stamp(0), &names[kept - 3], 2));
        assert!(!c.serves("d", &stamp(0), &names[kept - 2], 2));
        assert_eq!(c.page(&names[kept - 2], 1), (&names[kept - 1..kept], true));
        assert_eq!(c.page(&names[kept - 1], 1), (&[][..], true));

        for dir in ["a", "b", "c", "d", "e", "f"] {
            let c = scan(lists, dir, "", 1, &names[..10]);
            lists.put(c);
        }
        assert_eq!(lists.cursors.len(), MAX_CURSORS);
        assert!(
            lists.take("a", &stamp(0), "", 1).is_none(),
            "least recently used"
        );
        assert!(lists.take("f", &stamp(0), "", 1).is_some());
    }
}
