//! fsd: a file-transfer server with resumable, verified, zero-copy transfers.
//!
//! - [`protocol`]: the wire format (frame header, codec, messages, error codes); docs/PROTOCOL.md.
//! - [`integrity`]: chunk CRC32s and the whole-file BLAKE3 built from per-chunk subtrees.

pub mod fs;
pub mod integrity;
pub mod protocol;
