//! Compressed chunks kept for the next download of the same file version (crate::compress,
//! PROTOCOL.md §8.3). Compressing a chunk costs far more CPU than reading a cached one, and a
//! file served once is often served again; the cache also remembers chunks that did not shrink,
//! so they go by sendfile without another try.
//!
//! One file per (file version, chunk size, level, chunk) in the state directory, checked by a
//! CRC32 when read (a damaged entry is dropped, never served), in a directory bounded in bytes
//! (super::lru_dir: the entries used least recently go first).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::lru_dir::LruDir;
use crate::protocol::MAX_CHUNK_SIZE;

/// What the cache knows of one chunk at one level.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// The COMPRESSED payload to send.
    Packed(Bytes),
    /// It did not shrink: send it as it is.
    Raw,
}

/// Which chunk of which file version, compressed at which level.
#[derive(Debug, Clone, Copy)]
pub struct ChunkKey<'a> {
    /// The file version's identity (crate::fs::identity): a changed file is a new key.
    pub identity: &'a str,
    pub chunk_size: u32,
    pub level: u32,
    pub index: u32,
}

impl ChunkKey<'_> {
    fn file_name(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.identity.as_bytes());
        h.update(&self.chunk_size.to_le_bytes());
        h.update(&self.level.to_le_bytes());
        let version = h.finalize().to_hex();
        format!("{}-{}", &version[..32], self.index)
    }
}

/// Counters a test or /metrics can read (evictions: [`ChunkCache::evicted`]).
#[derive(Debug, Default)]
pub struct ChunkCacheStats {
    pub hits: AtomicU64,
    pub stored: AtomicU64,
}

pub struct ChunkCache {
    /// None: no cache (a cap of 0).
    dir: Option<LruDir>,
    pub stats: ChunkCacheStats,
}

/// Bytes before an entry's payload: the CRC32 of the payload.
const CHECK: usize = 4;

impl ChunkCache {
    /// The cache in `dir` (created), holding at most `cap` bytes (0: none, nothing created).
    pub fn new(dir: PathBuf, cap: u64) -> io::Result<ChunkCache> {
        Ok(ChunkCache {
            dir: match cap {
                0 => None,
                _ => Some(LruDir::open(dir, cap)?),
            },
            stats: ChunkCacheStats::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// Entries removed to keep the cap.
    pub fn evicted(&self) -> u64 {
        self.dir
            .as_ref()
            .map_or(0, |d| d.evicted.load(Ordering::Relaxed))
    }

    /// The cached chunk, if any (and intact). Blocking.
    pub fn get(&self, key: &ChunkKey) -> Option<Cached> {
        let dir = self.dir.as_ref()?;
        let path = dir.path(&key.file_name());
        let f = std::fs::File::open(&path).ok()?;
        let len = f.metadata().ok()?.len();
        // Never more than a chunk and its check: anything else is not an entry of ours.
        if len < CHECK as u64 || len > u64::from(MAX_CHUNK_SIZE) + CHECK as u64 {
            dir.remove(&path);
            return None;
        }
        let mut data = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut data, 0).ok()?;
        let (check, payload) = data.split_at(CHECK);
        if crc32fast::hash(payload) != u32::from_le_bytes(check.try_into().unwrap()) {
            tracing::warn!(entry = %path.display(), "damaged compressed-chunk cache entry dropped");
            dir.remove(&path);
            return None;
        }
        LruDir::touch(&f);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(match payload.is_empty() {
            true => Cached::Raw,
            false => Cached::Packed(Bytes::copy_from_slice(payload)),
        })
    }

    /// Remembers what compressing the chunk gave (`None`: it did not shrink). Failures only
    /// cost a later compression. Blocking.
    pub fn put(&self, key: &ChunkKey, packed: Option<&[u8]>) {
        let Some(dir) = &self.dir else { return };
        let payload = packed.unwrap_or_default();
        let check = crc32fast::hash(payload).to_le_bytes();
        match dir.put(&key.file_name(), &[&check, payload]) {
            Ok(()) => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("compressed-chunk cache: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: &str, index: u32) -> ChunkKey<'_> {
        ChunkKey {
            identity,
            chunk_size: 1 << 20,
            level: 3,
            index,
        }
    }

    #[test]
    fn entries_round_trip_and_damaged_ones_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(tmp.path().join("z"), 1 << 20).unwrap();
        assert_eq!(c.get(&key("v1", 0)), None);
        c.put(&key("v1", 0), Some(b"packed bytes"));
        c.put(&key("v1", 1), None);
        assert_eq!(
            c.get(&key("v1", 0)),
            Some(Cached::Packed(Bytes::from_static(b"packed bytes")))
        );
        assert_eq!(c.get(&key("v1", 1)), Some(Cached::Raw));
        // Another version, level or chunk size is another entry.
        assert_eq!(c.get(&key("v2", 0)), None);
        assert_eq!(
            c.get(&ChunkKey {
                level: 1,
                ..key("v1", 0)
            }),
            None
        );
        // A flipped bit: dropped, not served.
        let p = tmp.path().join("z").join(key("v1", 0).file_name());
        let mut d = std::fs::read(&p).unwrap();
        d[6] ^= 1;
        std::fs::write(&p, d).unwrap();
        assert_eq!(c.get(&key("v1", 0)), None);
        assert!(!p.exists());
        // Disabled: nothing kept, nothing created.
        let off = ChunkCache::new(tmp.path().join("off"), 0).unwrap();
        off.put(&key("v1", 0), Some(b"x"));
        assert_eq!(off.get(&key("v1", 0)), None);
        assert!(!tmp.path().join("off").exists());
    }

    #[test]
    fn the_cap_holds_and_the_least_recently_used_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("z");
        let block = super::super::lru_dir::footprint(1);
        let c = ChunkCache::new(dir.clone(), 10 * block).unwrap();
        let blob = vec![7u8; usize::try_from(block).unwrap() - CHECK]; // one block with its check
        for i in 0..9 {
            c.put(&key("v", i), Some(&blob));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Entry 0 used again: younger than 1..8.
        assert!(c.get(&key("v", 0)).is_some());
        for i in 9..12 {
            c.put(&key("v", i), Some(&blob));
        }
        let on_disk: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 10 * block, "{on_disk} bytes on disk");
        assert!(
            c.get(&key("v", 0)).is_some(),
            "the recently used entry was evicted"
        );
        assert!(c.get(&key("v", 1)).is_none(), "the oldest entry was kept");
        assert!(c.evicted() >= 2);
    }
}
