//! Records of a tree stream (docs/PROTOCOL.md §6.8): many small files in one DATA frame, each
//! as `u32 LE length | TreeEntry | contents`. A TREE_READ reply and a TREE_WRITE request carry
//! them; both sides encode and decode them here, so the bounds are checked in one place.
//!
//! A record never spans frames: a frame is complete in itself, so a receiver can hand each one
//! to a blocking thread whole, and the frame's CRC32 (checked by the codec) covers every byte
//! of it. Every length is checked against what is left of the frame before it is used.

use bytes::{Buf, Bytes};
use prost::Message;

use super::msg::TreeEntry;
use super::MAX_INLINE;

/// Hello `features` bit: the sender speaks TREE_READ and TREE_WRITE.
pub const FEATURE_TREE: u32 = 1;
/// Most files one TREE_READ may name, and most records one TREE_WRITE may carry.
pub const MAX_TREE_FILES: usize = 1024;
/// Bytes of records a sender puts in one DATA frame (fewer if the peer's `max_frame` is
/// smaller): large enough that per-frame costs vanish, small enough to be a modest buffer.
pub const TREE_FRAME: u32 = 1024 * 1024;
/// Longest encoded TreeEntry: a [`MAX_PATH_LEN`](super::MAX_PATH_LEN) path, a hash, an error message of at most
/// [`MAX_ENTRY_MESSAGE`] bytes and the numbers (`the_longest_entry_fits` checks the sum).
pub const MAX_ENTRY_LEN: u32 = 8 * 1024;
/// Error messages in TREE_READ entries are cut to this many bytes, so that an entry with an
/// error stays within [`MAX_ENTRY_LEN`] whatever the message quotes.
pub const MAX_ENTRY_MESSAGE: usize = 512;
/// Error messages in a TreeWriteResponse are cut to this many bytes, so that 1024 failures
/// fit one control frame.
pub const MAX_FAILURE_MESSAGE: usize = 160;

/// A malformed record: the whole frame is refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated: {need} bytes needed, {left} left in the frame")]
    Truncated { need: u64, left: usize },
    #[error("record entry of {0} bytes (at most {MAX_ENTRY_LEN})")]
    EntryTooLong(u32),
    #[error("record entry malformed: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("record contents of {0} bytes (at most {MAX_INLINE})")]
    TooBig(u64),
}

/// Bytes `entry` with `data_len` bytes of contents takes in a frame.
pub fn record_len(entry: &TreeEntry, data_len: usize) -> usize {
    4 + entry.encoded_len() + data_len
}

/// Appends one record. `data` must be empty unless `entry.data`.
pub fn push(buf: &mut Vec<u8>, entry: &TreeEntry, data: &[u8]) {
    debug_assert!(entry.data || data.is_empty());
    let len = u32::try_from(entry.encoded_len()).expect("entries are small");
    buf.extend_from_slice(&len.to_le_bytes());
    entry.encode(buf).expect("a Vec grows to fit the message");
    buf.extend_from_slice(data);
}

/// The records of one frame, in order: each entry with its contents (empty unless
/// `entry.data`). Contents share the frame's buffer (no copy).
pub struct Records {
    buf: Bytes,
}

impl Records {
    pub fn new(frame: Bytes) -> Records {
        Records { buf: frame }
    }

    fn take(&mut self, n: u64) -> Result<Bytes, RecordError> {
        let left = self.buf.len();
        match usize::try_from(n) {
            Ok(n) if n <= left => Ok(self.buf.split_to(n)),
            _ => Err(RecordError::Truncated { need: n, left }),
        }
    }
}

impl Iterator for Records {
    type Item = Result<(TreeEntry, Bytes), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let record = (|| {
            let mut len = self.take(4)?;
            let len = len.get_u32_le();
            if len > MAX_ENTRY_LEN {
                return Err(RecordError::EntryTooLong(len));
            }
            let entry = TreeEntry::decode(self.take(u64::from(len))?)?;
            if !entry.data {
                return Ok((entry, Bytes::new()));
            }
            if entry.size > u64::from(MAX_INLINE) {
                return Err(RecordError::TooBig(entry.size));
            }
            let data = self.take(entry.size)?;
            Ok((entry, data))
        })();
        if record.is_err() {
            // One bad record spoils the rest of the frame: stop after reporting it.
            self.buf.clear();
        }
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{msg, MAX_PATH_LEN};

    fn entry(path: &str, data: &[u8]) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            size: data.len() as u64,
            data: true,
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        push(&mut buf, &entry("a", b"hello"), b"hello");
        push(&mut buf, &TreeEntry::default(), b"");
        push(&mut buf, &entry("d/b", b""), b"");
        assert_eq!(
            buf.len(),
            record_len(&entry("a", b"hello"), 5)
                + record_len(&TreeEntry::default(), 0)
                + record_len(&entry("d/b", b""), 0)
        );
        let got: Vec<_> = Records::new(buf.into()).map(Result::unwrap).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0.path, "a");
        assert_eq!(&got[0].1[..], b"hello");
        assert!(got[1].1.is_empty());
        assert_eq!(got[2].0.path, "d/b");
    }

    #[test]
    fn the_longest_entry_fits() {
        // Every field at its largest: 4-byte UTF-8 characters and 10-byte varints.
        let e = TreeEntry {
            path: "\u{10FFFF}".repeat(MAX_PATH_LEN / 4),
            size: u64::MAX,
            mtime_ns: i64::MIN,
            mode: u32::MAX,
            blake3: vec![0xff; 32],
            data: true,
            error: Some(msg::Error {
                code: u32::MAX,
                message: "\u{10FFFF}".repeat(MAX_ENTRY_MESSAGE / 4),
                retryable: true,
            }),
        };
        assert!(
            e.encoded_len() <= MAX_ENTRY_LEN as usize,
            "{}",
            e.encoded_len()
        );
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        // An entry length far beyond the frame, one beyond the cap, contents beyond the frame,
        // contents beyond MAX_INLINE, and random bytes: an error, never a panic.
        let mut cases: Vec<Vec<u8>> = vec![
            u32::MAX.to_le_bytes().to_vec(),
            (MAX_ENTRY_LEN + 1).to_le_bytes().to_vec(),
            vec![1, 2],
        ];
        let mut short = Vec::new();
        push(&mut short, &entry("a", b"0123456789"), b"0123456789");
        short.truncate(short.len() - 3);
        cases.push(short);
        let mut huge = Vec::new();
        let e = TreeEntry {
            size: u64::MAX,
            data: true,
            ..Default::default()
        };
        push(&mut huge, &e, b"");
        cases.push(huge);
        for case in cases {
            let mut r = Records::new(case.into());
            assert!(r.next().unwrap().is_err());
            assert!(r.next().is_none());
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for r in Records::new(bytes.into()).take(64) {
                let _ = r;
            }
        }
    }
}
