//! What kind of file system a directory is on, and so which durability and naming mechanisms
//! can be trusted there.
//!
//! Two mechanisms that make small files cheap on a local disk are wrong on shared (network,
//! FUSE, distributed) file systems, and wrong silently (docs/ARCHITECTURE.md, "Running several
//! nodes"):
//! - `O_TMPFILE` + `linkat`: EOPNOTSUPP on GlusterFS and MooseFS; on JuiceFS it *succeeds*, and
//!   the linked file is destroyed when its descriptor closes. Failing over on an error is
//!   therefore not enough: it is used only where the file system is known to keep it.
//! - `syncfs`: returns 0 on FUSE without reaching any server, so a group commit there makes
//!   nothing durable. Shared file systems get an `fsync` per file instead.
//!
//! Known local disk file systems (by `statfs` magic) get the fast mechanisms; everything else,
//! known shared or unknown, gets the portable ones: named temporary files, renamed or linked
//! into place, and per-file fsync. Both sides use this: fsd for its root, fsc for a download's
//! destination.

use std::io;
use std::os::fd::AsFd;

/// How a file system is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// A local disk file system: O_TMPFILE and syncfs do what they promise.
    Local,
    /// Shared or unknown: named temporary files and an fsync per file.
    Shared,
}

/// `statfs` magic numbers of local file systems whose O_TMPFILE and syncfs are known to work
/// (linux/magic.h).
const LOCAL: &[(i64, &str)] = &[
    (0xEF53, "ext4"), // also ext2 and ext3
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0xF2F5_2010, "f2fs"),
    (0x2FC1_2FC1, "zfs"),
    (0xCA45_1A4E, "bcachefs"),
];

/// Names for the shared ones seen most, for the log.
const SHARED: &[(i64, &str)] = &[
    (0x6573_5546, "fuse"),
    (0x6969, "nfs"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x00C3_6400, "ceph"),
    (0x0102_1997, "9p"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x7461_636F, "ocfs2"),
    (0x0116_1970, "gfs2"),
    (0x794C_7630, "overlayfs"),
];

/// The kind of the file system `fd` is on, and a name for it (for logs).
pub fn detect(fd: impl AsFd) -> io::Result<(FsKind, String)> {
    let st = nix::sys::statfs::fstatfs(fd)?;
    // The magic's C type differs between libcs and architectures; the values fit in 32 bits.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = i64::from(st.filesystem_type().0) & 0xFFFF_FFFF;
    Ok(classify(magic))
}

/// Bytes an unprivileged writer may still use on the file system of `fd`, or None where the
/// file system does not say: ramfs and some FUSE file systems report no blocks at all (0 total,
/// 0 free), which is "unknown", not "full" — a space check there would refuse every file.
pub fn free_bytes(fd: impl AsFd) -> io::Result<Option<u64>> {
    let vfs = nix::sys::statvfs::fstatvfs(fd).map_err(io::Error::from)?;
    if vfs.blocks() == 0 {
        return Ok(None);
    }
    // Blocks available to an unprivileged user, in fragment-size units.
    Ok(Some(
        vfs.blocks_available().saturating_mul(vfs.fragment_size()),
    ))
}

fn classify(magic: i64) -> (FsKind, String) {
    if let Some((_, name)) = LOCAL.iter().find(|(m, _)| *m == magic) {
        return (FsKind::Local, (*name).to_string());
    }
    let name = SHARED
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| (*name).to_string())
        .unwrap_or_else(|| format!("unknown file system 0x{magic:x}"));
    (FsKind::Shared, name)
}

impl FsKind {
    /// Whether an anonymous O_TMPFILE file can be written and then linked into place.
    pub fn keeps_anonymous_files(self) -> bool {
        self == FsKind::Local
    }

    /// Whether one syncfs makes every earlier write on the file system durable.
    pub fn syncfs_is_durable(self) -> bool {
        self == FsKind::Local
    }

    /// The kind named by `--fs-kind` (`local`, `shared`), or None for `auto`.
    pub fn parse_override(s: &str) -> Result<Option<FsKind>, String> {
        match s {
            "auto" => Ok(None),
            "local" => Ok(Some(FsKind::Local)),
            "shared" => Ok(Some(FsKind::Shared)),
            _ => Err(format!("{s:?}: expected auto, local or shared")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a temp dir, not a client path
mod tests {
    use super::*;

    #[test]
    fn local_disks_are_local_and_fuse_or_unknown_is_shared() {
        assert_eq!(classify(0xEF53).0, FsKind::Local);
        assert_eq!(classify(0x0102_1994), (FsKind::Local, "tmpfs".into()));
        assert_eq!(classify(0x6573_5546), (FsKind::Shared, "fuse".into()));
        assert_eq!(classify(0x1234).0, FsKind::Shared);
    }

    #[test]
    fn a_temp_dir_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (kind, name) = detect(std::fs::File::open(dir.path()).unwrap()).unwrap();
        // Whatever it is, it has a name; where it is ext4/tmpfs/xfs it must be Local.
        assert!(!name.is_empty());
        if ["ext4", "tmpfs", "xfs", "btrfs"].contains(&name.as_str()) {
            assert_eq!(kind, FsKind::Local);
        }
    }
}
