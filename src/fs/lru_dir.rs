//! A directory of cache entries bounded in bytes on disk: past the cap the entries used least
//! recently go, down to nine tenths of it. An entry counts as the whole 4 KiB blocks a file
//! system stores it in, so many small entries cannot hold more than the cap says. "Used" is
//! the entry's mtime: set when it is written, refreshed by [`LruDir::touch`] on a hit.
//!
//! Entries are written whole and renamed into place (a crash leaves the entry or nothing).
//! Several nodes may share the directory: each counts what it sees, and any of them may evict.
//! Everything here blocks.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

/// What the entries are counted in.
const BLOCK: u64 = 4096;

/// The bytes an entry of `len` bytes takes on disk, as counted against the cap.
pub fn footprint(len: u64) -> u64 {
    len.div_ceil(BLOCK).max(1) * BLOCK
}

pub struct LruDir {
    dir: PathBuf,
    cap: u64,
    used: AtomicU64,
    evicting: AtomicBool,
    /// Entries removed to keep the cap.
    pub evicted: AtomicU64,
}

impl LruDir {
    /// `dir` (created) holding at most `cap` bytes: what is there already is counted, and
    /// trimmed to the cap.
    pub fn open(dir: PathBuf, cap: u64) -> io::Result<LruDir> {
        std::fs::create_dir_all(&dir)?;
        let mut used = 0;
        for e in std::fs::read_dir(&dir)? {
            used += e?.metadata().map_or(0, |m| footprint(m.len()));
        }
        let d = LruDir {
            dir,
            cap,
            used: AtomicU64::new(used),
            evicting: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
        };
        d.trim();
        Ok(d)
    }

    /// Where entry `name` is (or would be).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Bytes the entries take, as counted against the cap.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Marks an entry just read through `f` as used now: the last to be evicted.
    pub fn touch(f: &File) {
        let _ = f.set_modified(SystemTime::now());
    }

    /// Writes entry `name` as the concatenation of `parts`, replacing an older one, then trims.
    pub fn put(&self, name: &str, parts: &[&[u8]]) -> io::Result<()> {
        let path = self.path(name);
        let tmp = self
            .dir
            .join(format!("{name}.{}.tmp", super::private_suffix()));
        let written = (|| -> io::Result<u64> {
            let mut f = File::create(&tmp)?;
            for p in parts {
                f.write_all(p)?;
            }
            let replaced = std::fs::symlink_metadata(&path).map_or(0, |m| footprint(m.len()));
            std::fs::rename(&tmp, &path)?;
            Ok(replaced)
        })();
        let replaced = written.inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        let len = u64::try_from(parts.iter().map(|p| p.len()).sum::<usize>()).unwrap_or(u64::MAX);
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(replaced).saturating_add(footprint(len)))
            });
        self.trim();
        Ok(())
    }

    /// Removes an entry found unusable (damaged, not ours).
    pub fn remove(&self, path: &Path) {
        let len = std::fs::symlink_metadata(path).map_or(0, |m| footprint(m.len()));
        if std::fs::remove_file(path).is_ok() {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(len))
                });
        }
    }

    /// Over the cap: removes the least recently used entries down to nine tenths of it (one
    /// caller at a time; the others go on).
    fn trim(&self) {
        if self.used.load(Ordering::Relaxed) <= self.cap
            || self.evicting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let mut entries: Vec<(i64, u64, PathBuf)> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((
                        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                        footprint(m.len()),
                        e.path(),
                    ))
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_unstable_by_key(|e| e.0);
        let goal = self.cap / 10 * 9;
        for (_, len, path) in entries {
            if total <= goal {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.used.store(total, Ordering::Relaxed);
        self.evicting.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| footprint(e.unwrap().metadata().unwrap().len()))
            .sum()
    }

    #[test]
    fn entries_count_in_whole_blocks() {
        assert_eq!(footprint(0), BLOCK);
        assert_eq!(footprint(1), BLOCK);
        assert_eq!(footprint(BLOCK), BLOCK);
        assert_eq!(footprint(BLOCK + 1), 2 * BLOCK);
    }

    #[test]
    fn the_cap_holds_and_the_least_recently_used_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let d = LruDir::open(dir.clone(), 10 * BLOCK).unwrap();
        for i in 0..9 {
            d.put(&format!("e{i}"), &[b"tiny"]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Entry 0 used again: younger than 1..8.
        LruDir::touch(&File::open(d.path("e0")).unwrap());
        for i in 9..12 {
            d.put(&format!("e{i}"), &[b"tiny"]).unwrap();
        }
        // Twelve 4-byte entries are twelve blocks: over a cap of ten.
        assert!(on_disk(&dir) <= 10 * BLOCK, "{} bytes", on_disk(&dir));
        assert!(d.path("e0").exists(), "the recently used entry was evicted");
        assert!(!d.path("e1").exists(), "the oldest entry was kept");
        assert!(d.evicted.load(Ordering::Relaxed) >= 2);
        assert_eq!(d.used(), on_disk(&dir));
        // A restart counts what is there.
        let again = LruDir::open(dir.clone(), 10 * BLOCK).unwrap();
        assert_eq!(again.used(), on_disk(&dir));
    }

    #[test]
    fn a_replaced_or_removed_entry_is_not_counted_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let d = LruDir::open(tmp.path().join("c"), 100 * BLOCK).unwrap();
        d.put("a", &[&[1u8; 5000]]).unwrap();
        d.put("a", &[b"short", b" now"]).unwrap();
        assert_eq!(std::fs::read(d.path("a")).unwrap(), b"short now");
        assert_eq!(d.used(), BLOCK);
        d.remove(&d.path("a"));
        assert_eq!(d.used(), 0);
        assert!(!d.path("a").exists());
    }
}
