//! Resume state of a partial download: `KEY.state` beside `KEY.part` in the destination's
//! working directory (`local::Work`).
//!
//! JSON, replaced atomically (temp file + rename). It records what the part file was downloaded
//! from (identity, size, chunk size, whole-file BLAKE3) and which chunks it holds: one bit per
//! chunk, so at most 128 KiB of bitmap (256 KiB as hex) for the protocol's 2^20 chunks. The
//! chunks' CRC32s are not kept: they come from the server's manifest on every run, so a state
//! written during a run that failed can never outvote the server. Neither the state nor the part is synced while downloading: a claim only says where to
//! look, and on resume every chunk on disk (claimed or not) is verified by its CRC32, so a chunk
//! lost or torn by a crash is simply fetched again. Only the finished file is fsynced.

use serde::{Deserialize, Serialize};

use super::LocalDir;

/// Bump when the format changes; other versions are ignored (the download starts over).
/// 2: no CRC32s (from the manifest instead), kept in the working directory.
const VERSION: u32 = 2;
/// Largest state file read: the bitmap of 2^20 chunks in hex, and the other fields.
const MAX_STATE_BYTES: u64 = 512 * 1024;

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

    pub fn clear(&mut self, i: u32) {
        self.bits[(i / 8) as usize] &= !(1 << (i % 8));
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
        have: &Bitmap,
    ) -> PartState {
        PartState {
            version: VERSION,
            remote: remote.to_string(),
            identity: identity.to_string(),
            size,
            chunk_size,
            blake3: hex::encode(blake3),
            bitmap: hex::encode(have.as_bytes()),
        }
    }

    /// Reads the state file `name`; a missing, unreadable, oversized or foreign file is `None`
    /// (start over).
    pub fn load(dir: &LocalDir, name: &str) -> Option<PartState> {
        let bytes = dir.read(name, MAX_STATE_BYTES).ok()??;
        match serde_json::from_slice::<PartState>(&bytes) {
            Ok(s) if s.version == VERSION => Some(s),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("ignoring unreadable state for {name}: {e}");
                None
            }
        }
    }

    /// Replaces the state file `name` atomically.
    pub fn save(&self, dir: &LocalDir, name: &str) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).expect("state serializes");
        dir.write_atomic(name, &json)
    }

    /// Whether this state describes the same remote content version.
    pub fn matches(&self, identity: &str, size: u64, chunk_size: u32, blake3: &[u8; 32]) -> bool {
        self.identity == identity
            && self.size == size
            && self.chunk_size == chunk_size
            && self.blake3 == hex::encode(blake3)
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
        let s = PartState::new("r/f", "id1", 2500, 1024, &[7; 32], &have);
        s.save(&dir, "f").unwrap();
        let back = PartState::load(&dir, "f").unwrap();
        assert_eq!(back, s);
        assert_eq!(back.bitmap(3), have);
        assert!(back.matches("id1", 2500, 1024, &[7; 32]));
        assert!(!back.matches("id2", 2500, 1024, &[7; 32]));
        assert!(PartState::load(&dir, "g").is_none());
    }
}
