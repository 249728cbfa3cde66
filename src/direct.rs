//! Direct I/O for the chunks of big files, on both sides (fsc writing a download, fsd writing an
//! upload).
//!
//! A buffered write of a received chunk copies it into freshly allocated page-cache pages, and on
//! this kind of machine touching fresh memory runs at 0.35–1.1 GB/s: it was 64% of fsc's CPU on a
//! 1 GiB download to a file and 65% of fsd's on a 1 GiB upload (docs/BENCHMARKS.md). With
//! O_DIRECT the chunk goes from an aligned buffer we reuse straight to the device; the only copy
//! left is a warm memcpy into that buffer. The file is still fsynced before it is published (that
//! flushes the device cache and the extent metadata), so durability is unchanged, and a big
//! transfer no longer evicts the rest of the page cache.
//!
//! Only whole 4 KiB-aligned blocks go direct; a chunk that is not (the tail of a file) is written
//! by the caller through its ordinary descriptor. A file system that refuses O_DIRECT (EINVAL at
//! open or at the first write) turns it off for that file.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::OFlag;

/// Offsets, lengths and buffers of direct writes are multiples of this (the largest logical
/// block size in common use).
pub const ALIGN: usize = 4096;

/// A second, O_DIRECT descriptor on an open file.
pub struct DirectFile {
    file: File,
    /// Set when the file system refused a direct write: the caller writes buffered from then on.
    refused: AtomicBool,
}

impl DirectFile {
    /// Reopens `file` (through /proc/self/fd, so it is the same inode whatever its name is now)
    /// for direct writes. None where O_DIRECT is not supported.
    pub fn reopen(file: impl AsFd) -> Option<DirectFile> {
        let path = format!("/proc/self/fd/{}", file.as_fd().as_raw_fd());
        let flags = OFlag::O_WRONLY | OFlag::O_DIRECT | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path.as_str(), flags, nix::sys::stat::Mode::empty()).ok()?;
        Some(DirectFile {
            file: File::from(fd),
            refused: AtomicBool::new(false),
        })
    }

    /// Writes `data` at `offset` directly if both are block-aligned. Ok(false): not written
    /// (unaligned, or direct I/O refused), the caller writes it buffered. Blocking.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<bool> {
        if data.is_empty()
            || !data.len().is_multiple_of(ALIGN)
            || !offset.is_multiple_of(ALIGN as u64)
            || self.refused.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let write = |block_aligned: &[u8]| match self.file.write_all_at(block_aligned, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
            r => r.map(|()| true),
        };
        // Data already in aligned memory (an AlignedBuf) goes as it is, without staging.
        if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
            return write(data);
        }
        BUF.with_borrow_mut(|buf| write(buf.fill(data)))
    }
}

thread_local! {
    /// One staging buffer per writing thread, kept for reuse (writes of a download or upload
    /// run on a few blocking threads).
    static BUF: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf(Vec::new())) };
}

/// A 4 KiB block, so that a `Vec` of them is 4 KiB-aligned.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; ALIGN]);

/// Memory whose start is 4 KiB-aligned: data read into it is written direct without a copy.
#[derive(Default)]
pub struct AlignedBuf(Vec<Block>);

impl AlignedBuf {
    /// The first `len` bytes (growing the buffer if needed; contents unspecified).
    pub fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        let blocks = len.div_ceil(ALIGN);
        if self.0.len() < blocks {
            self.0.resize(blocks, Block([0; ALIGN]));
        }
        // SAFETY: as in `fill`: `blocks * ALIGN >= len` initialised, contiguous bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }

    /// Copies `data` (a multiple of ALIGN long) into the buffer, growing it if needed.
    fn fill(&mut self, data: &[u8]) -> &[u8] {
        let blocks = data.len() / ALIGN;
        if self.0.len() < blocks {
            self.0.resize(blocks, Block([0; ALIGN]));
        }
        // SAFETY: `Block` is plain bytes with no padding (size ALIGN, align ALIGN), so the first
        // `blocks` elements are `blocks * ALIGN` initialised, contiguous bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), blocks * ALIGN)
        };
        bytes.copy_from_slice(data);
        bytes
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test files in a temp dir, not client paths
mod tests {
    use super::*;

    #[test]
    fn aligned_chunks_go_direct_and_the_rest_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let Some(d) = DirectFile::reopen(&file) else {
            eprintln!("SKIPPED: no O_DIRECT on this file system");
            return;
        };
        let chunk: Vec<u8> = (0..2 * ALIGN).map(|i| (i % 251) as u8).collect();
        if !d.write_at(&chunk, ALIGN as u64).unwrap() {
            eprintln!("SKIPPED: the file system refused a direct write");
            return;
        }
        assert!(!d.write_at(&chunk[..100], 0).unwrap(), "unaligned length");
        assert!(!d.write_at(&chunk, 100).unwrap(), "unaligned offset");
        let mut back = vec![0u8; 2 * ALIGN];
        file.read_exact_at(&mut back, ALIGN as u64).unwrap();
        assert_eq!(back, chunk);
        assert_eq!(file.metadata().unwrap().len(), 3 * ALIGN as u64);

        // Data already in an AlignedBuf goes without staging, and lands the same.
        let mut aligned = AlignedBuf::default();
        let bytes = aligned.bytes_mut(ALIGN);
        bytes.fill(0xA5);
        assert!((bytes.as_ptr() as usize).is_multiple_of(ALIGN));
        assert!(d.write_at(bytes, 0).unwrap());
        file.read_exact_at(&mut back[..ALIGN], 0).unwrap();
        assert!(back[..ALIGN].iter().all(|&b| b == 0xA5));
    }
}
