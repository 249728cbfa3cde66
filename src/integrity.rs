//! Integrity: per-chunk CRC32 (transport errors) and the whole-file BLAKE3 (end-to-end), built
//! from per-chunk subtree chaining values so that chunks can be hashed as they arrive, in any
//! order, on any connection, and never in a second pass over the file.
//!
//! Chunk sizes are powers of two of at least 1 KiB, so every chunk is a complete BLAKE3 subtree.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::protocol::chunk_count;

/// The BLAKE3 contribution of chunk `index` of a file of `file_size` bytes. For a file of at
/// most one chunk this is already the file's root hash.
pub fn chunk_cv(data: &[u8], index: u32, chunk_size: u32, file_size: u64) -> ChainingValue {
    cv_with(data, index, chunk_size, file_size, |h, d| {
        h.update(d);
    })
}

/// [`chunk_cv`] on rayon's threads: for hashing one big chunk after another (a manifest's
/// first computation), where a chunk is the only work in hand.
pub fn chunk_cv_parallel(
    data: &[u8],
    index: u32,
    chunk_size: u32,
    file_size: u64,
) -> ChainingValue {
    cv_with(data, index, chunk_size, file_size, |h, d| {
        h.update_rayon(d);
    })
}

fn cv_with(
    data: &[u8],
    index: u32,
    chunk_size: u32,
    file_size: u64,
    update: impl FnOnce(&mut blake3::Hasher, &[u8]),
) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    if chunk_count(file_size, chunk_size) <= 1 {
        update(&mut h, data);
        return *h.finalize().as_bytes();
    }
    h.set_input_offset(u64::from(index) * u64::from(chunk_size));
    update(&mut h, data);
    h.finalize_non_root()
}

/// The whole-file BLAKE3 from the chunks' [`chunk_cv`]s fed in chunk order, holding only a
/// stack of O(log n) subtree values (an upload of 2^20 chunks is verified without its 32 MiB of
/// chaining values in memory). It builds the same left-balanced tree as BLAKE3's incremental
/// hasher, one level up: every chunk but the last is a complete subtree.
#[derive(Default)]
pub struct RootHasher {
    /// Complete subtrees not yet merged, largest first.
    stack: Vec<ChainingValue>,
    /// The latest chunk: it may be the last, whose merges are done at the end.
    latest: Option<ChainingValue>,
    /// Chunks folded into `stack`.
    folded: u64,
}

impl RootHasher {
    pub fn push(&mut self, cv: ChainingValue) {
        let Some(mut done) = self.latest.replace(cv) else {
            return;
        };
        // A chunk followed by another is final: merge the subtrees it completes.
        self.folded += 1;
        let mut total = self.folded;
        while total & 1 == 0 {
            let left = self.stack.pop().expect("a completed pair has a left half");
            done = merge_subtrees_non_root(&left, &done, Mode::Hash);
            total >>= 1;
        }
        self.stack.push(done);
    }

    pub fn finish(mut self) -> [u8; 32] {
        let Some(mut out) = self.latest.take() else {
            return *blake3::hash(b"").as_bytes();
        };
        // A single chunk's value is already the root hash (chunk_cv).
        while let Some(left) = self.stack.pop() {
            out = if self.stack.is_empty() {
                *merge_subtrees_root(&left, &out, Mode::Hash).as_bytes()
            } else {
                merge_subtrees_non_root(&left, &out, Mode::Hash)
            };
        }
        out
    }
}

/// The whole-file BLAKE3 from every chunk's [`chunk_cv`], in chunk order.
pub fn root_hash(cvs: &[ChainingValue], chunk_size: u32, file_size: u64) -> [u8; 32] {
    debug_assert_eq!(cvs.len(), chunk_count(file_size, chunk_size) as usize);
    match cvs.len() {
        0 => *blake3::hash(b"").as_bytes(),
        1 => cvs[0],
        _ => {
            let (l, r) = split(cvs, chunk_size, file_size);
            *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
        }
    }
}

/// Chaining values of the left and right subtrees of `cvs` covering `len` bytes (>= 2 chunks).
fn split(cvs: &[ChainingValue], chunk_size: u32, len: u64) -> (ChainingValue, ChainingValue) {
    let left_len = left_subtree_len(len);
    let n = (left_len / chunk_size as u64) as usize;
    (
        subtree(&cvs[..n], chunk_size, left_len),
        subtree(&cvs[n..], chunk_size, len - left_len),
    )
}

fn subtree(cvs: &[ChainingValue], chunk_size: u32, len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs, chunk_size, len);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// CRC32 and BLAKE3 chaining value of one chunk, computed in one place so that server and
/// client agree.
pub fn hash_chunk(
    data: &[u8],
    index: u32,
    chunk_size: u32,
    file_size: u64,
) -> (u32, ChainingValue) {
    (
        crc32fast::hash(data),
        chunk_cv(data, index, chunk_size, file_size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk_len;

    fn check(size: usize, chunk_size: u32) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 1000) as u8).collect();
        let n = chunk_count(size as u64, chunk_size);
        // Hash the chunks in reverse order to show order does not matter.
        let mut cvs = vec![[0u8; 32]; n as usize];
        for i in (0..n).rev() {
            let start = i as usize * chunk_size as usize;
            let len = chunk_len(size as u64, chunk_size, i) as usize;
            cvs[i as usize] = chunk_cv(&data[start..start + len], i, chunk_size, size as u64);
        }
        assert_eq!(
            root_hash(&cvs, chunk_size, size as u64),
            *blake3::hash(&data).as_bytes(),
            "size {size} chunk {chunk_size}"
        );
        let mut streamed = RootHasher::default();
        for cv in &cvs {
            streamed.push(*cv);
        }
        assert_eq!(
            streamed.finish(),
            *blake3::hash(&data).as_bytes(),
            "streamed: size {size} chunk {chunk_size}"
        );
    }

    #[test]
    fn root_matches_plain_blake3() {
        for &cs in &[1024u32, 4096, 65536] {
            for &size in &[
                0usize,
                1,
                1023,
                1024,
                1025,
                2048,
                3 * 1024 + 5,
                5 * 4096,
                7 * 4096 - 1,
                300_000,
                1 << 20,
                (1 << 20) + 3 * 65536 + 17,
                13 * 65536,
            ] {
                check(size, cs);
            }
        }
    }
}
