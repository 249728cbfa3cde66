//! SEED: a delta upload takes from the file it will replace the chunks that file already holds,
//! so the client sends only the chunks that changed (docs/PROTOCOL.md §10.3).
//!
//! The client names each chunk of the new file by its BLAKE3 chaining value; fsd reads the
//! destination's bytes at the same offset, hashes them as that chunk of the new file, and stores
//! them into the upload where the values agree, exactly as a WRITE would (CRC32 and chaining
//! value recorded, logged when durable). Equality is decided by BLAKE3, never by CRC32, and the
//! upload is still published only after its whole-file BLAKE3 matches at COMMIT, so a seeded
//! chunk can never make a wrong file look right. The destination is only read, through the
//! session's confined root, as an OPEN READ of it would be; the published file is replaced by
//! rename at COMMIT as for any upload. Each chunk of an upload is read from the destination at
//! most once, however many SEEDs name it, so the work a client can ask for is bounded by one
//! read of the file it replaces (whose size its upload quota already counts).

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::connection::{Failure, Session};
use super::files::blocking;
use super::transfer::{self, Handle};
use crate::direct::AlignedBuf;
use crate::integrity::hash_chunk;
use crate::protocol::{chunk_len, msg, ErrorCode};

/// Most chunks one SEED may name: each is read and hashed on one blocking thread, so this
/// bounds the work of one request (64 MiB with 1 MiB chunks).
pub const MAX_SEED_CHUNKS: usize = 64;

const CV_LEN: usize = 32;

pub async fn seed(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::SeedRequest::decode(payload)?;
    let Handle::Write(upload) = transfer::get(session, req.handle)? else {
        return Err(Failure::new(ErrorCode::BadHandle, "SEED on a read handle"));
    };
    let bad = |why: String| Failure::new(ErrorCode::BadRequest, why);
    if upload.count <= 1 {
        return Err(bad("SEED needs a multi-chunk upload".into()));
    }
    if req.cvs.len() % CV_LEN != 0 || req.cvs.len() / CV_LEN > MAX_SEED_CHUNKS {
        return Err(bad(format!(
            "cvs must be whole 32-byte values, at most {MAX_SEED_CHUNKS} of them"
        )));
    }
    let n = req.cvs.len() / CV_LEN;
    let end = u64::from(req.first_chunk) + n as u64;
    if end > u64::from(upload.count) {
        return Err(bad(format!(
            "chunks {}..{end} beyond the upload's {}",
            req.first_chunk, upload.count
        )));
    }
    let first = req.first_chunk;
    let seeded = blocking(session, move |s| {
        let mut seeded = vec![0u8; n.div_ceil(8)];
        let (old, meta) = match s.root().open_read(&upload.params.path) {
            Ok(x) => x,
            // Nothing there to take chunks from (no file, a directory, a symlink — never
            // followed —, a device): the client sends them all.
            Err(e) => {
                tracing::debug!(error = %e, "SEED: nothing to take chunks from");
                return Ok(seeded);
            }
        };
        let (size, cs) = (upload.params.size, upload.chunk_size);
        // Where this SEED's chunks end, in the new file and in the old one.
        let seed_end = (end * u64::from(cs)).min(size).min(meta.len());
        // Blocks reserved ahead of the writes (Upload::reserve), and the bytes matched in a
        // row just before the current chunk.
        let (mut reserved, mut run) = (0..0, 0);
        // Aligned: a direct write of the data file takes it without a copy.
        let mut buf = AlignedBuf::default();
        for (k, want) in req.cvs.chunks_exact(CV_LEN).enumerate() {
            let i = first + u32::try_from(k).expect("k < MAX_SEED_CHUNKS");
            let len = chunk_len(size, cs, i);
            let offset = u64::from(i) * u64::from(cs);
            // Back to 0 unless this chunk matches too.
            let run_before = std::mem::take(&mut run);
            // Held already, past the old file's end, or tried before: nothing to read.
            if offset + u64::from(len) > meta.len() || !upload.first_seed_of(i) {
                continue;
            }
            let data = buf.bytes_mut(usize::try_from(len).expect("a chunk fits in memory"));
            if old.read_exact_at(data, offset).is_err() {
                // Shrunk or unreadable since it was opened: the client sends this chunk.
                continue;
            }
            let (crc, cv) = hash_chunk(data, i, cs, size);
            if cv[..] != want[..] {
                continue;
            }
            if !reserved.contains(&offset) {
                // Only after a match, and ahead only as far as the run of matches so far
                // (doubling while it lasts): only a run's last reservation may go unused, by
                // at most what the run took, so the disk an upload holds follows what matched
                // and never its declared size (a client declaring the free space and naming
                // chunks that match nothing used to reserve all of it, for the upload TTL).
                let to = (offset + run_before.max(u64::from(len))).min(seed_end);
                upload.reserve(offset, to - offset);
                reserved = offset..to;
            }
            let written = upload.write_hashed_chunk(upload.begin_write()?, i, data, crc, cv)?;
            if written.start_sync {
                upload.background_sync();
            }
            seeded[k / 8] |= 1 << (k % 8);
            run = run_before + u64::from(len);
        }
        Ok(seeded)
    })
    .await?;
    Ok(Bytes::from(
        msg::SeedResponse {
            first_chunk: first,
            seeded,
        }
        .encode_to_vec(),
    ))
}
