//! Per-chunk zstd on the wire (docs/PROTOCOL.md §8.3). A DATA frame with the COMPRESSED flag
//! carries the CRC32 of the uncompressed chunk (u32, little-endian) followed by one zstd frame
//! of the chunk. CRC32, manifests, resume and BLAKE3 stay defined over the uncompressed chunk,
//! so nothing but the wire changes; the frame header's checksum covers the bytes on the wire.
//!
//! Both sides use the same rules: a chunk goes compressed only when that saves at least an
//! eighth of it, and a [`Probe`] stops compressing data that does not shrink (already
//! compressed media, encrypted archives) after one try, re-trying at growing intervals.

use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

/// Highest zstd level either side uses or accepts; above it zstd gets many times slower for a
/// few percent of size, which never pays on a network.
pub const MAX_LEVEL: u32 = 19;
/// Level of `auto` mode: zstd's fastest regular level (several hundred MB/s per core), so that
/// compressing costs less time than sending the bytes it saves on links below ~1 Gbit/s.
pub const AUTO_LEVEL: u32 = 1;
/// Level of a plain `--compress`: zstd's own default.
pub const DEFAULT_LEVEL: u32 = 3;
/// Bytes before the zstd frame: the CRC32 of the uncompressed chunk.
const PREFIX: usize = 4;

/// What a thread that compresses keeps between chunks: a zstd context (with its level) and
/// an output buffer. A fresh context per chunk, and a chunk-sized buffer zeroed for each, cost
/// ~5 % of fsd's CPU serving a compressible file (perf, 1 GiB log at level 1). Compression runs
/// on blocking threads, so this is held once per such thread (fsd bounds them:
/// --max-blocking-threads) and freed when the thread ends (idle ones do after 10 s).
#[derive(Default)]
struct Scratch {
    cctx: Option<(i32, zstd::bulk::Compressor<'static>)>,
    out: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The payload of a COMPRESSED DATA frame for `chunk`, or None when compressing it at `level`
/// does not save at least an eighth (the chunk then goes as it is).
pub fn compress(chunk: &[u8], crc: u32, level: u32) -> Option<Bytes> {
    let level = level.clamp(1, MAX_LEVEL) as i32;
    let limit = chunk.len() - chunk.len() / 8;
    if limit <= PREFIX {
        return None;
    }
    SCRATCH.with_borrow_mut(|s| {
        if s.cctx.as_ref().is_none_or(|(l, _)| *l != level) {
            s.cctx = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let room = limit - PREFIX;
        if s.out.len() < room {
            s.out.resize(room, 0);
        }
        let (_, cctx) = s.cctx.as_mut()?;
        // A destination smaller than the bound makes zstd fail fast instead of finishing a
        // frame that would not be sent anyway.
        let n = cctx.compress_to_buffer(chunk, &mut s.out[..room]).ok()?;
        let mut out = Vec::with_capacity(PREFIX + n);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&s.out[..n]);
        Some(Bytes::from(out))
    })
}

/// Why a COMPRESSED payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadCompressed {
    #[error("compressed payload of {0} bytes is too short")]
    Short(usize),
    #[error("compressed chunk does not decompress to {expected} bytes: {detail}")]
    Corrupt { expected: usize, detail: String },
    #[error("decompressed chunk is {got} bytes, {expected} expected")]
    Length { got: usize, expected: usize },
    #[error("decompressed chunk fails its CRC32")]
    Crc,
}

/// The chunk a COMPRESSED payload holds, and its CRC32 (checked). `expected` is the chunk's
/// length from the chunk math, never the sender's word: at most that much is ever allocated,
/// whatever the zstd frame claims.
pub fn decompress(payload: &[u8], expected: usize) -> Result<(Bytes, u32), BadCompressed> {
    if payload.len() <= PREFIX {
        return Err(BadCompressed::Short(payload.len()));
    }
    let crc = u32::from_le_bytes(payload[..PREFIX].try_into().unwrap());
    let mut out = Vec::with_capacity(expected);
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| BadCompressed::Corrupt {
        expected,
        detail: e.to_string(),
    })?;
    let n = d
        .decompress_to_buffer(&payload[PREFIX..], &mut out)
        .map_err(|e| BadCompressed::Corrupt {
            expected,
            detail: e.to_string(),
        })?;
    if n != expected {
        return Err(BadCompressed::Length { got: n, expected });
    }
    if crc32fast::hash(&out) != crc {
        return Err(BadCompressed::Crc);
    }
    Ok((Bytes::from(out), crc))
}

/// Whether the next chunk of a file is worth trying to compress. After a chunk that did not
/// shrink, the next 1, 2, 4, … 64 chunks go uncompressed without trying (zero-copy where the
/// sender has it); a chunk that shrinks resets the interval. So incompressible data costs one
/// compression per 64 chunks once the probe has settled, and a file that becomes compressible
/// part-way is noticed within 64 chunks.
#[derive(Debug, Default)]
pub struct Probe {
    /// Chunks still to send without trying.
    skip: AtomicU32,
    /// The interval after the next failure.
    backoff: AtomicU32,
    /// The last try did not pay.
    failing: std::sync::atomic::AtomicBool,
}

const MAX_BACKOFF: u32 = 64;

impl Probe {
    /// True if the caller should try to compress this chunk (and then call
    /// [`Probe::record`]); false means send it uncompressed.
    pub fn should_try(&self) -> bool {
        self.skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1))
            .is_err()
    }

    /// False once the last try did not pay (true before any try): whether this file is being
    /// sent compressed.
    pub fn paying(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    /// What the last try gave: `paid` when the chunk went compressed.
    pub fn record(&self, paid: bool) {
        self.failing.store(!paid, Ordering::Relaxed);
        if paid {
            self.backoff.store(0, Ordering::Relaxed);
            return;
        }
        let b = self.backoff.load(Ordering::Relaxed).max(1);
        self.skip.store(b, Ordering::Relaxed);
        self.backoff
            .store((b * 2).min(MAX_BACKOFF), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        let line = b"2026-12-01T23:19:39Z INFO fsd: read path=projects/big.iso chunk=17\n";
        line.iter().cycle().take(n).copied().collect()
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_thread_reuses_its_context_across_levels_sizes_and_failures() {
        // The per-thread context and buffer (Scratch) must not carry anything from one chunk
        // to the next: a level change, a bigger chunk after a smaller one, and a chunk that
        // did not shrink in between.
        let small = text(10_000);
        let big = text(1 << 20);
        let incompressible = noise(1 << 20);
        for (data, level) in [(&small, 1), (&big, 3), (&small, 3), (&big, 1)] {
            let z = compress(data, crc32fast::hash(data), level).expect("text shrinks");
            let (back, crc) = decompress(&z, data.len()).unwrap();
            assert_eq!((&back[..], crc), (&data[..], crc32fast::hash(data)));
            assert_eq!(compress(&incompressible, 0, level), None);
        }
    }

    #[test]
    fn compressible_chunks_round_trip_and_keep_their_crc() {
        let data = text(1 << 20);
        let crc = crc32fast::hash(&data);
        let z = compress(&data, crc, AUTO_LEVEL).expect("text compresses");
        assert!(z.len() < data.len() / 8, "{} bytes", z.len());
        let (back, got) = decompress(&z, data.len()).unwrap();
        assert_eq!(got, crc);
        assert_eq!(&back[..], &data[..]);
    }

    #[test]
    fn incompressible_and_tiny_chunks_go_as_they_are() {
        let data = noise(1 << 20);
        assert!(compress(&data, crc32fast::hash(&data), MAX_LEVEL).is_none());
        assert!(compress(b"abc", 0, 3).is_none());
        assert!(compress(b"", 0, 3).is_none());
    }

    #[test]
    fn hostile_payloads_are_refused_without_allocating_what_they_claim() {
        let data = text(64 * 1024);
        let crc = crc32fast::hash(&data);
        let z = compress(&data, crc, 3).unwrap();
        // Claims more than the chunk: refused, at most `expected` bytes allocated.
        assert!(matches!(
            decompress(&z, 1000),
            Err(BadCompressed::Corrupt { .. })
        ));
        // Shorter than the chunk math says.
        assert_eq!(
            decompress(&z, data.len() + 1),
            Err(BadCompressed::Length {
                got: data.len(),
                expected: data.len() + 1
            })
        );
        // Wrong CRC prefix.
        let mut bad = z.to_vec();
        bad[0] ^= 1;
        assert_eq!(decompress(&bad, data.len()), Err(BadCompressed::Crc));
        // Garbage and truncation.
        assert!(decompress(&z[..z.len() / 2], data.len()).is_err());
        assert!(decompress(&noise(5000), data.len()).is_err());
        assert_eq!(decompress(&[1, 2], 10), Err(BadCompressed::Short(2)));
        // A bomb: 256 MiB of zeros claimed in a few KiB, expected 1 MiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 28], 1).unwrap();
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&bomb);
        assert!(decompress(&p, 1 << 20).is_err());
    }

    #[test]
    fn the_probe_backs_off_on_incompressible_data_and_resets_when_it_pays() {
        let p = Probe::default();
        let mut tries = 0;
        for _ in 0..1000 {
            if p.should_try() {
                tries += 1;
                p.record(false);
            }
        }
        // 1 + 1 + 2 + 4 + … + 64, then one per 65 chunks.
        assert!((18..=25).contains(&tries), "{tries} tries");
        assert!(!p.paying());
        // A chunk that pays resets the interval.
        while !p.should_try() {}
        p.record(true);
        assert!(p.paying());
        assert!(p.should_try());
    }
}
