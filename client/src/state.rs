//! Resume state of a partial download: `NAME.fsc-state` beside `NAME.fsc-part`.
//!
//! JSON, replaced atomically (temp file + rename). It records what the part file was downloaded
//! from (identity, size, chunk size, whole-file BLAKE3, per-chunk CRC32s) and which chunks it
//! holds. Neither the state nor the part is synced while downloading: a claim only says where to
//! look, and on resume every chunk on disk (claimed or not) is verified by its CRC32, so a chunk
//! lost or torn by a crash is simply fetched again. Only the finished file is fsynced.

use serde::{Deserialize, Serialize};

use crate::tree::LocalDir;

/// Bump when the format changes; other versions are ignored (the download starts over).
const VERSION: u32 = 1;

/// Suffix of the partial file.
pub(crate) const PART_SUFFIX: &str = ".fsc-part";
/// Suffix of the state file.
pub(crate) const STATE_SUFFIX: &str = ".fsc-state";

/// One bit per chunk: chunk i present <=> bits[i/8] & (1 << (i%8)), as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bitmap {
    bits: Vec<u8>,
    len: u32,
}

impl Bitmap {
    pub fn new(len: u32) -> Bitmap {
        Bitmap {
            bits: vec![0; (len as usize).div_ceil(8)],
            len,
        }
    }

    /// From wire bytes; missing trailing bytes mean absent chunks, bits past `len` are ignored.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Bitmap {
        let mut b = Bitmap::new(len);
        let n = b.bits.len().min(bytes.len());
        b.bits[..n].copy_from_slice(&bytes[..n]);
        if !len.is_multiple_of(8) {
            if let Some(last) = b.bits.last_mut() {
                *last &= (1u8 << (len % 8)) - 1;
            }
        }
        b
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32) {
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }
}

/// The contents of a `.fsc-state` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PartState {
    pub version: u32,
    /// Remote path, for people reading the file.
    pub remote: String,
    pub identity: String,
    pub size: u64,
    pub chunk_size: u32,
    /// Whole-file BLAKE3 (hex).
    pub blake3: String,
    /// CRC32 of every chunk: 8 hex digits each.
    pub crcs: String,
    /// Chunks written to the part file (hex of the bitmap bytes).
    pub bitmap: String,
}

impl PartState {
    pub fn new(
        remote: &str,
        identity: &str,
        size: u64,
        chunk_size: u32,
        blake3: &[u8; 32],
        crcs: &[u32],
        have: &Bitmap,
    ) -> PartState {
        let crcs: String = crcs.iter().map(|c| format!("{c:08x}")).collect();
        PartState {
            version: VERSION,
            remote: remote.to_string(),
            identity: identity.to_string(),
            size,
            chunk_size,
            blake3: hex::encode(blake3),
            crcs,
            bitmap: hex::encode(have.as_bytes()),
        }
    }

    /// Reads `NAME.fsc-state`; a missing, unreadable or foreign file is `None` (start over).
    pub fn load(dir: &LocalDir, name: &str) -> Option<PartState> {
        let bytes = dir.read(&format!("{name}{STATE_SUFFIX}")).ok()??;
        match serde_json::from_slice::<PartState>(&bytes) {
            Ok(s) if s.version == VERSION => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("ignoring unreadable state for {name}: {e}");
                None
            }
        }
    }

    /// Replaces `NAME.fsc-state` atomically.
    pub fn save(&self, dir: &LocalDir, name: &str) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).expect("state serializes");
        dir.write_atomic(&format!("{name}{STATE_SUFFIX}"), &json)
    }

    /// Whether this state describes the same remote content version.
    pub fn matches(&self, identity: &str, size: u64, chunk_size: u32, blake3: &[u8; 32]) -> bool {
        self.identity == identity
            && self.size == size
            && self.chunk_size == chunk_size
            && self.blake3 == hex::encode(blake3)
    }

    /// The stored CRC32s, if well-formed and `count` of them.
    pub fn crcs(&self, count: u32) -> Option<Vec<u32>> {
        if self.crcs.len() != count as usize * 8 || !self.crcs.is_ascii() {
            return None;
        }
        (0..count as usize)
            .map(|i| u32::from_str_radix(&self.crcs[i * 8..i * 8 + 8], 16).ok())
            .collect()
    }

    /// The stored bitmap (empty if malformed: every chunk is then checked as unclaimed).
    pub fn bitmap(&self, count: u32) -> Bitmap {
        let bytes = hex::decode(&self.bitmap).unwrap_or_default();
        Bitmap::from_bytes(&bytes, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_matches_the_wire_layout() {
        let mut b = Bitmap::new(10);
        b.set(0);
        b.set(9);
        assert_eq!(b.as_bytes(), &[0x01, 0x02]);
        assert!(b.get(9) && !b.get(8) && !b.get(10));
        assert_eq!(b.count(), 2);
        // Stray bits beyond the length are dropped, short input is padded.
        let w = Bitmap::from_bytes(&[0xff, 0xff], 10);
        assert_eq!(w.count(), 10);
        assert!(w.is_full());
        assert_eq!(Bitmap::from_bytes(&[], 10).count(), 0);
    }

    #[test]
    fn state_round_trips_through_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::open(tmp.path()).unwrap();
        let mut have = Bitmap::new(3);
        have.set(1);
        let s = PartState::new(
            "r/f",
            "id1",
            2500,
            1024,
            &[7; 32],
            &[1, 0xdeadbeef, 3],
            &have,
        );
        s.save(&dir, "f").unwrap();
        let back = PartState::load(&dir, "f").unwrap();
        assert_eq!(back, s);
        assert_eq!(back.crcs(3).unwrap(), vec![1, 0xdeadbeef, 3]);
        assert_eq!(back.crcs(4), None);
        assert_eq!(back.bitmap(3), have);
        assert!(back.matches("id1", 2500, 1024, &[7; 32]));
        assert!(!back.matches("id2", 2500, 1024, &[7; 32]));
        assert!(PartState::load(&dir, "g").is_none());
    }
}
