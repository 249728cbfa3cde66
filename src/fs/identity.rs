//! File identity: the opaque string fsd sends in OPEN READ and COMMIT, which a client compares
//! to tell "the same version of this file" (resume, `-j N`) from "it changed". It must be the
//! same through every fsd node serving one shared root, so it cannot contain `st_dev`: that
//! differs per mount and per remount of a shared file system. The root's own file system is
//! named by a random root id kept in the state directory (shared by the nodes); a file system
//! mounted beneath the root, which only this node may see, by its st_dev.

use std::fs::Metadata;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Name of the root-id file in the state directory.
const ROOT_ID_FILE: &str = "root-id";

/// Which file system a file is on, in terms every node agrees on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Volume {
    /// The root's file system.
    Root([u8; 16]),
    /// Another file system mounted beneath the root (this node's st_dev).
    Mount(u64),
}

impl Volume {
    /// Text form, as used in identities and manifest cache names.
    pub fn tag(&self) -> String {
        match self {
            Volume::Root(id) => hex::encode(id),
            Volume::Mount(dev) => format!("dev{dev:x}"),
        }
    }
}

/// The root id and the root's st_dev on this node: what turns a file's st_dev into a
/// [`Volume`].
#[derive(Debug, Clone, Copy)]
pub struct RootId {
    id: [u8; 16],
    dev: u64,
}

impl RootId {
    /// The root id kept in `state_dir`, created there (atomically: the first of several
    /// starting nodes wins) if there is none; `root_dev` is the root's st_dev here.
    pub fn load_or_create(state_dir: &Path, root_dev: u64) -> io::Result<RootId> {
        let path = state_dir.join(ROOT_ID_FILE);
        if !path.exists() {
            let mut id = [0u8; 16];
            rand::fill(&mut id);
            let tmp = state_dir.join(format!("{ROOT_ID_FILE}.{}.tmp", super::private_suffix()));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(format!("{}\n", hex::encode(id)).as_bytes())?;
            f.sync_all()?;
            drop(f);
            // link never replaces: another node's id, if it got there first, stays.
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    if let Ok(dir) = std::fs::File::open(state_dir) {
                        let _ = dir.sync_all();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let text = std::fs::read_to_string(&path)?;
        let id = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a root id (32 hex digits); remove it to make a new one (clients \
                         then see every file as changed)",
                        path.display()
                    ),
                )
            })?;
        Ok(RootId { id, dev: root_dev })
    }

    /// A root id for tests and for a root served by a single process.
    pub fn new(id: [u8; 16], root_dev: u64) -> RootId {
        RootId { id, dev: root_dev }
    }

    pub fn volume(&self, dev: u64) -> Volume {
        if dev == self.dev {
            Volume::Root(self.id)
        } else {
            Volume::Mount(dev)
        }
    }

    /// The identity of the file version `meta` describes.
    pub fn identity(&self, meta: &Metadata) -> String {
        Version::of(self, meta, 0).identity()
    }
}

/// What identifies a file version: if any of these changed, the content may have. ino, size,
/// mtime and ctime are the same through every mount of the shared file systems tried
/// (GlusterFS, JuiceFS, MooseFS; MooseFS keeps whole seconds only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub volume: Volume,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub chunk_size: u32,
}

/// How long after a change a file's or directory's timestamps may still not show the next
/// one: they have 1 s granularity on some file systems (ext4 with 128-byte inodes, ext3,
/// NFSv3), 2 s on FAT, and a change within the same tick leaves them as they were.
pub const RACY: std::time::Duration = std::time::Duration::from_secs(2);

impl Version {
    /// Whether this version changed so recently, by the clock at `now`, that a further change
    /// might not show in its timestamps: what was learned of its content then (a manifest)
    /// must not be kept under it. Review D (stop 30): on ext4 with 1 s timestamps a file
    /// rewritten within the second of its first download kept its manifest; every later
    /// download failed, and `download -c` and delta downloads exited 0 with the old bytes.
    pub fn is_racy(&self, now: std::time::SystemTime) -> bool {
        let Ok(now) = now.duration_since(std::time::UNIX_EPOCH) else {
            return true;
        };
        let changed = i128::from(self.mtime_ns.max(self.ctime_ns));
        let now = i128::try_from(now.as_nanos()).unwrap_or(i128::MAX);
        changed.saturating_add(i128::try_from(RACY.as_nanos()).unwrap_or(i128::MAX)) > now
    }

    pub fn of(ids: &RootId, meta: &Metadata, chunk_size: u32) -> Version {
        Version {
            volume: ids.volume(meta.dev()),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            chunk_size,
        }
    }

    pub fn identity(&self) -> String {
        format!(
            "{}-{:x}-{}-{}-{}",
            self.volume.tag(),
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns
        )
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test files in a temp dir, not client paths
mod tests {
    use super::*;

    #[test]
    fn the_root_id_is_made_once_and_shared_and_dev_is_not_in_the_identity() {
        let state = tempfile::tempdir().unwrap();
        let a = RootId::load_or_create(state.path(), 1).unwrap();
        // A second node: another mount, another st_dev for the same root.
        let b = RootId::load_or_create(state.path(), 2).unwrap();
        assert_eq!(a.id, b.id);
        // The same file seen through each node's mount (each its own st_dev): one volume.
        assert_eq!(a.volume(1), b.volume(2));
        assert_eq!(a.volume(1), Volume::Root(a.id));
        // A file system mounted beneath the root on one node keeps its st_dev.
        assert_eq!(a.volume(7), Volume::Mount(7));
        let f = state.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let here = RootId::new(a.id, meta.dev());
        assert!(here.identity(&meta).starts_with(&hex::encode(a.id)));
        assert_ne!(
            here.identity(&meta),
            RootId::new(a.id, meta.dev() + 1).identity(&meta)
        );
    }

    #[test]
    fn a_damaged_root_id_is_refused() {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join(ROOT_ID_FILE), "nothex\n").unwrap();
        let e = RootId::load_or_create(state.path(), 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
