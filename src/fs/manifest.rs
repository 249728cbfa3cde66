//! Chunk manifests: the CRC32 and BLAKE3 chaining value of every chunk and the whole-file
//! BLAKE3 of one file version, computed in a single pass the first time a version is opened,
//! then served from memory or from the state directory. A cached manifest is what lets DATA
//! frames go out by sendfile with their checksum already known; its chaining values let a
//! client keep the chunks of an old local version that are still equal (chunk delta).

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use prost::Message;

use super::identity::{RootId, Version};
use super::lru_dir::LruDir;
use blake3::hazmat::ChainingValue;

use crate::integrity::{chunk_cv_parallel, root_hash};
use crate::protocol::{chunk_count, chunk_len};
use crate::state::ManifestRecord;

/// Bytes of cached manifests kept in memory (36 per chunk); beyond this the cache is cleared
/// (cheap to reload from disk). A file's chunk count is bounded (MAX_CHUNKS_PER_FILE), so one
/// manifest is at most 36 MiB.
const MEMORY_BYTES: usize = 64 << 20;

/// Bytes of manifests kept in the state directory, in whole blocks (super::lru_dir): about
/// 260,000 files' worth (one block each below ~110,000 chunks), or a manifest of every chunk of
/// ~30 TiB in 1 MiB chunks. Without a bound, files deleted or replaced under new inode numbers
/// (never reused on some shared file systems) would leave their manifests for good; one
/// evicted is recomputed, by reading its file, the next time it is opened.
pub const DISK_BYTES: u64 = 1 << 30;

/// CRC32s, chaining values and BLAKE3 of one version of one file.
#[derive(Debug)]
pub struct Manifest {
    pub size: u64,
    pub mtime_ns: i64,
    pub chunk_size: u32,
    pub crcs: Vec<u32>,
    /// Each chunk's BLAKE3 chaining value (crate::integrity::chunk_cv).
    pub cvs: Vec<ChainingValue>,
    pub blake3: [u8; 32],
    /// Opaque version id sent to clients: changes whenever the content may have changed.
    pub identity: String,
    /// Computed for a version that changed too recently to be known by its timestamps
    /// ([`Version::is_racy`]): not cached, and nothing learned from it may be either.
    pub racy: bool,
}

/// The cache file of a version's manifest: one per file and chunk size, whichever node
/// computed it (no st_dev in it: crate::fs::identity).
fn file_name(v: &Version) -> String {
    format!("{}-{:x}-{}", v.volume.tag(), v.ino, v.chunk_size)
}

/// Counters a test or /metrics can read.
#[derive(Debug, Default)]
pub struct ManifestStats {
    pub computed: AtomicU64,
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
}

/// A version one [`ManifestCache::get`] is fetching; the others wait until this is dropped
/// (also on an error or a panic).
struct Fetching<'a> {
    cache: &'a ManifestCache,
    v: Version,
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.cache.pending.lock().unwrap().remove(&self.v);
        self.cache.done.notify_all();
    }
}

/// The manifest cache: memory first, then `dir` (one small file per file version, at most
/// `disk_bytes` of them).
pub struct ManifestCache {
    mem: Mutex<Memory>,
    /// Versions being read from disk or computed: a second get of one waits for the first
    /// instead of reading the whole file again (several OPENs of a big file not seen before).
    /// Each with the number of its fetch.
    pending: Mutex<HashMap<Version, u64>>,
    done: Condvar,
    /// Numbers fetches.
    fetches: AtomicU64,
    /// The manifests of racy versions ([`Manifest::racy`]) just fetched, with the fetch's
    /// number, for the gets that waited for that fetch only: they asked while it ran, so its
    /// result is as fresh as their request. Never a cache (a later get computes again); dead
    /// entries go at each insert.
    racy: Mutex<HashMap<Version, (u64, Weak<Manifest>)>>,
    disk: LruDir,
    ids: RootId,
    pub stats: ManifestStats,
}

impl ManifestCache {
    pub fn new(dir: PathBuf, ids: RootId, disk_bytes: u64) -> io::Result<ManifestCache> {
        Ok(ManifestCache {
            mem: Mutex::new(Memory::default()),
            pending: Mutex::default(),
            done: Condvar::new(),
            fetches: AtomicU64::new(0),
            racy: Mutex::default(),
            disk: LruDir::open(dir, disk_bytes)?,
            ids,
            stats: ManifestStats::default(),
        })
    }

    /// Manifests removed from the state directory to keep its bound.
    pub fn evicted(&self) -> u64 {
        self.disk.evicted.load(Ordering::Relaxed)
    }

    /// The manifest of `file` as it is now. Blocking: call from a blocking thread. `turn` is
    /// called, and what it returns held, before a manifest not in memory is fetched (loaded
    /// or computed): the caller's place among its credential's fetches. It is taken before
    /// this caller claims the version, so that others waiting for the same version wait only
    /// for a fetch that runs, never for this caller's queue.
    pub fn get<T>(
        &self,
        file: &File,
        meta: &Metadata,
        chunk_size: u32,
        turn: impl FnOnce() -> T,
    ) -> io::Result<Arc<Manifest>> {
        let v = Version::of(&self.ids, meta, chunk_size);
        if let Some(m) = self.mem.lock().unwrap().get(&v) {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(m);
        }
        let _turn = turn();
        let mut pending = self.pending.lock().unwrap();
        // The fetch this get waited for, if any.
        let mut waited: Option<u64> = None;
        let fetch = loop {
            if let Some(m) = self.mem.lock().unwrap().get(&v) {
                self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(m);
            }
            let running = pending.get(&v).copied();
            if let Some(w) = waited.filter(|&w| running != Some(w)) {
                // That fetch ended: its result, if it was racy (else it is in memory above).
                let racy = self.racy.lock().unwrap();
                if let Some(m) = racy
                    .get(&v)
                    .filter(|(n, _)| *n == w)
                    .and_then(|e| e.1.upgrade())
                {
                    return Ok(m);
                }
            }
            match running {
                Some(n) => {
                    waited = Some(n);
                    pending = self.done.wait(pending).unwrap();
                }
                None => {
                    let n = self.fetches.fetch_add(1, Ordering::Relaxed);
                    pending.insert(v, n);
                    break n;
                }
            }
        };
        drop(pending);
        let fetching = Fetching { cache: self, v };
        let m = self.load_or_compute(file, &v)?;
        if m.racy {
            let mut racy = self.racy.lock().unwrap();
            racy.retain(|_, (_, m)| m.strong_count() > 0);
            racy.insert(v, (fetch, Arc::downgrade(&m)));
        }
        drop(fetching);
        Ok(m)
    }

    /// [`ManifestCache::get`] of a version not in memory, which this caller alone fetches.
    fn load_or_compute(&self, file: &File, v: &Version) -> io::Result<Arc<Manifest>> {
        let (v, chunk_size) = (*v, v.chunk_size);
        let m = match self.load(&v) {
            Some(m) => {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                m
            }
            None => {
                let started = std::time::SystemTime::now();
                let mut m = compute(file, &v)?;
                self.stats.computed.fetch_add(1, Ordering::Relaxed);
                // Only cache if the file did not change while we read it, and would show its
                // next change in its timestamps.
                if v.is_racy(started) || Version::of(&self.ids, &file.metadata()?, chunk_size) != v
                {
                    m.racy = true;
                    return Ok(Arc::new(m));
                }
                self.store(&v, &m);
                m
            }
        };
        Ok(self.mem.lock().unwrap().insert(v, Arc::new(m)))
    }

    /// The identity of the file version `meta` describes (crate::fs::identity).
    pub fn identity(&self, meta: &Metadata) -> String {
        self.ids.identity(meta)
    }

    fn load(&self, v: &Version) -> Option<Manifest> {
        let mut f = File::open(self.disk.path(&file_name(v))).ok()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        let r = ManifestRecord::decode(&bytes[..]).ok()?;
        let count = chunk_count(v.size, v.chunk_size) as usize;
        let matches = r.volume == v.volume.tag()
            && r.ino == v.ino
            && r.size == v.size
            && r.mtime_ns == v.mtime_ns
            && r.ctime_ns == v.ctime_ns
            && r.chunk_size == v.chunk_size
            && r.crc32.len() == count
            && r.cvs.len() == count * 32
            && r.blake3.len() == 32;
        if matches {
            LruDir::touch(&f);
        }
        matches.then(|| Manifest {
            size: v.size,
            mtime_ns: v.mtime_ns,
            chunk_size: v.chunk_size,
            crcs: r.crc32,
            cvs: r
                .cvs
                .chunks_exact(32)
                .map(|c| c.try_into().unwrap())
                .collect(),
            blake3: r.blake3.try_into().unwrap(),
            identity: v.identity(),
            racy: false,
        })
    }

    /// Best effort: a manifest that fails to persist is recomputed next time.
    fn store(&self, v: &Version, m: &Manifest) {
        let r = ManifestRecord {
            volume: v.volume.tag(),
            ino: v.ino,
            size: v.size,
            mtime_ns: v.mtime_ns,
            ctime_ns: v.ctime_ns,
            chunk_size: v.chunk_size,
            crc32: m.crcs.clone(),
            cvs: m.cvs.concat(),
            blake3: m.blake3.to_vec(),
        };
        if let Err(e) = self.disk.put(&file_name(v), &[&r.encode_to_vec()]) {
            tracing::warn!(error = %e, "could not persist manifest");
        }
    }
}

/// Manifests in memory and the bytes they hold.
#[derive(Default)]
struct Memory {
    entries: HashMap<Version, Arc<Manifest>>,
    bytes: usize,
    /// Manifests a clear dropped from `entries` while something (a read handle) still held
    /// them. They are found here again, so every handle on a version shares one copy: without
    /// this, each OPEN after a clear loaded a copy of its own (up to 36 MiB each, as many as
    /// the handle quota). Bounded by what was held at the last clear, when dead ones go.
    held: HashMap<Version, Weak<Manifest>>,
}

impl Memory {
    fn get(&self, v: &Version) -> Option<Arc<Manifest>> {
        match self.entries.get(v) {
            Some(m) => Some(m.clone()),
            None => self.held.get(v)?.upgrade(),
        }
    }

    /// Keeps `m` unless a copy of the same version is already in memory (two OPENs loaded it
    /// at once, or it is still held), and returns the one kept.
    fn insert(&mut self, v: Version, m: Arc<Manifest>) -> Arc<Manifest> {
        if let Some(kept) = self.get(&v) {
            return kept;
        }
        let size = m.crcs.len() * 36;
        if self.bytes + size > MEMORY_BYTES {
            self.held.retain(|_, w| w.strong_count() > 0);
            for (v, m) in self.entries.drain() {
                if Arc::strong_count(&m) > 1 {
                    self.held.insert(v, Arc::downgrade(&m));
                }
            }
            self.bytes = 0;
        }
        self.held.remove(&v);
        self.entries.insert(v, m.clone());
        self.bytes += size;
        m
    }
}

/// One pass over the file: CRC32 and chaining value per chunk (each chunk hashed on several
/// threads), and the whole-file BLAKE3 from those.
fn compute(file: &File, v: &Version) -> io::Result<Manifest> {
    let n = chunk_count(v.size, v.chunk_size);
    let mut crcs = Vec::with_capacity(n as usize);
    let mut cvs = Vec::with_capacity(n as usize);
    let mut buf = vec![0u8; v.chunk_size as usize];
    for i in 0..n {
        let len = chunk_len(v.size, v.chunk_size, i) as usize;
        file.read_exact_at(&mut buf[..len], u64::from(i) * u64::from(v.chunk_size))?;
        crcs.push(crc32fast::hash(&buf[..len]));
        cvs.push(chunk_cv_parallel(&buf[..len], i, v.chunk_size, v.size));
    }
    Ok(Manifest {
        size: v.size,
        mtime_ns: v.mtime_ns,
        chunk_size: v.chunk_size,
        crcs,
        blake3: root_hash(&cvs, v.chunk_size, v.size),
        cvs,
        identity: v.identity(),
        racy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::identity::RACY;
    use crate::integrity::chunk_cv;
    use std::time::Duration;

    #[test]
    fn the_memory_cache_is_bounded_by_bytes() {
        // Each manifest a little over half the budget: the second insert starts over.
        let chunks = MEMORY_BYTES / 36 / 2 + 1;
        let manifest = || {
            Arc::new(Manifest {
                size: 0,
                mtime_ns: 0,
                chunk_size: 1,
                crcs: vec![0; chunks],
                cvs: Vec::new(),
                blake3: [0; 32],
                identity: String::new(),
                racy: false,
            })
        };
        let version = |ino| Version {
            volume: crate::fs::identity::Volume::Mount(1),
            ino,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            chunk_size: 1,
        };
        let mut mem = Memory::default();
        mem.insert(version(1), manifest());
        mem.insert(version(1), manifest()); // the same version again: counted once
        assert_eq!((mem.entries.len(), mem.bytes), (1, chunks * 36));
        mem.insert(version(2), manifest());
        assert_eq!((mem.entries.len(), mem.bytes), (1, chunks * 36));
        assert!(mem.entries.contains_key(&version(2)));
    }

    /// Every handle on a file version shares one copy of its manifest, even after the memory
    /// cache was cleared under it. Before, each OPEN after a clear loaded a copy of its own (up
    /// to 36 MiB), as many as the handle quota allowed.
    #[test]
    fn a_manifest_still_held_is_shared_after_the_cache_clears() {
        let dir = tempfile::tempdir().unwrap();
        // Each manifest a little over half the memory budget: the second one clears it.
        let chunk_size = 1024u32;
        let chunks = u64::try_from(MEMORY_BYTES / 36 / 2 + 1).unwrap();
        let open = |name: &str| {
            let path = dir.path().join(name);
            let f = File::create(&path).unwrap();
            f.set_len(chunks * u64::from(chunk_size)).unwrap(); // sparse
            let f = File::open(&path).unwrap();
            let meta = f.metadata().unwrap();
            (f, meta)
        };
        let (x, x_meta) = open("x");
        let (y, y_meta) = open("y");
        let ids = RootId::new([7; 16], std::os::unix::fs::MetadataExt::dev(&x_meta));
        let cache = ManifestCache::new(dir.path().join("m"), ids, DISK_BYTES).unwrap();
        // Their manifests are in the state directory already (computing them would read ~1 GB
        // each), so every get below that misses memory loads a copy from there.
        for meta in [&x_meta, &y_meta] {
            let v = Version::of(&ids, meta, chunk_size);
            let n = usize::try_from(chunks).unwrap();
            let m = Manifest {
                size: v.size,
                mtime_ns: v.mtime_ns,
                chunk_size,
                crcs: vec![0; n],
                cvs: vec![[0; 32]; n],
                blake3: [0; 32],
                identity: v.identity(),
                racy: false,
            };
            cache.store(&v, &m);
        }
        let first = cache.get(&x, &x_meta, chunk_size, || ()).unwrap();
        let other = cache.get(&y, &y_meta, chunk_size, || ()).unwrap();
        assert_eq!(cache.mem.lock().unwrap().entries.len(), 1, "not cleared");
        let again = cache.get(&x, &x_meta, chunk_size, || ()).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "a second copy of x's manifest");
        assert!(Arc::ptr_eq(
            &other,
            &cache.get(&y, &y_meta, chunk_size, || ()).unwrap()
        ));
        // Once nothing holds x's manifest, it is gone from memory (then reloaded from disk).
        drop((first, again));
        let (y_weak, loaded) = (
            Arc::downgrade(&other),
            cache.stats.disk_hits.load(Ordering::Relaxed),
        );
        drop(other);
        let x_again = cache.get(&x, &x_meta, chunk_size, || ()).unwrap();
        assert_eq!(cache.stats.disk_hits.load(Ordering::Relaxed), loaded + 1);
        assert_eq!(x_again.crcs.len(), usize::try_from(chunks).unwrap());
        assert_eq!(cache.stats.computed.load(Ordering::Relaxed), 0);
        assert!(
            y_weak.upgrade().is_none(),
            "y's manifest outlived its holders"
        );
    }

    /// Several OPENs of a file not seen before at once read and hash it once: the others wait
    /// for that manifest instead of each reading the whole file again.
    #[test]
    fn concurrent_gets_of_one_version_compute_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        let ids = RootId::new([7; 16], std::os::unix::fs::MetadataExt::dev(&meta));
        let cache = ManifestCache::new(dir.path().join("m"), ids, DISK_BYTES).unwrap();
        let got: Vec<Arc<Manifest>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.get(&f, &meta, 65536, || ()).unwrap()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(cache.stats.computed.load(Ordering::Relaxed), 1);
        assert!(got.iter().all(|m| Arc::ptr_eq(m, &got[0])));
    }

    /// A version that changed less than RACY ago may change again without its timestamps
    /// showing it (1 s granularity): its manifest is not kept, in memory or on disk; once it
    /// is older, it is. Before, it was kept at once (review D, stop 30: on ext4 with 1 s
    /// timestamps a file rewritten in the second of its first download kept its manifest).
    #[test]
    fn a_racy_version_s_manifest_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 200_000]).unwrap();
        let f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        let ids = RootId::new([7; 16], std::os::unix::fs::MetadataExt::dev(&meta));
        let cache = ManifestCache::new(dir.path().join("m"), ids, DISK_BYTES).unwrap();
        let first = cache.get(&f, &meta, 65536, || ()).unwrap();
        assert!(first.racy);
        cache.get(&f, &meta, 65536, || ()).unwrap();
        assert_eq!(
            cache.stats.computed.load(Ordering::Relaxed),
            2,
            "kept while racy"
        );
        assert_eq!(std::fs::read_dir(dir.path().join("m")).unwrap().count(), 0);
        std::thread::sleep(RACY + Duration::from_millis(100));
        assert!(!cache.get(&f, &meta, 65536, || ()).unwrap().racy);
        cache.get(&f, &meta, 65536, || ()).unwrap();
        assert_eq!(
            cache.stats.computed.load(Ordering::Relaxed),
            3,
            "not kept once settled"
        );
    }

    /// A file written more than RACY ago, so that its manifest is kept.
    fn settled(path: &std::path::Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
        std::thread::sleep(RACY + Duration::from_millis(100));
    }

    #[test]
    fn computes_once_then_hits_memory_then_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        settled(&path, &data);
        let f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        let ids = RootId::new([7; 16], std::os::unix::fs::MetadataExt::dev(&meta));
        let cache = ManifestCache::new(dir.path().join("m"), ids, DISK_BYTES).unwrap();
        let m = cache.get(&f, &meta, 65536, || ()).unwrap();
        assert_eq!(m.crcs.len(), 5);
        assert_eq!(m.crcs[4], crc32fast::hash(&data[4 * 65536..]));
        assert_eq!(m.blake3, *blake3::hash(&data).as_bytes());
        assert_eq!(
            m.cvs[4],
            chunk_cv(&data[4 * 65536..], 4, 65536, data.len() as u64)
        );
        cache.get(&f, &meta, 65536, || ()).unwrap();
        assert_eq!(cache.stats.computed.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.memory_hits.load(Ordering::Relaxed), 1);
        let cache2 = ManifestCache::new(dir.path().join("m"), ids, DISK_BYTES).unwrap();
        let m2 = cache2.get(&f, &meta, 65536, || ()).unwrap();
        assert_eq!(m2.crcs, m.crcs);
        assert_eq!(m2.cvs, m.cvs);
        assert_eq!(cache2.stats.disk_hits.load(Ordering::Relaxed), 1);
        assert_eq!(cache2.stats.computed.load(Ordering::Relaxed), 0);
    }
}
