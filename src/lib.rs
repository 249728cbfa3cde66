//! fsd: a file-transfer server with resumable, verified, zero-copy transfers.
//!
//! - [`protocol`]: the wire format (frame header, codec, messages, error codes); docs/PROTOCOL.md.
//! - [`integrity`]: chunk CRC32s and the whole-file BLAKE3 built from per-chunk subtrees.
//! - [`durable`]: group commit (one syncfs for many files), used by server and client.
//! - [`fskind`]: local or shared file system, and so which mechanisms are safe on it.
//! - [`direct`]: O_DIRECT writes of big files' chunks, used by server and client.
//! - [`frame_reader`]: reading frames off a connection, used by server and client.
//! - [`payload_pool`]: buffers of large DATA payloads used again, for the frame reader.
//! - [`nofile`]: the open-file limit, raised at start and read, by server and client.
//! - [`net`]: TCP settings for long paths (congestion control, send buffer, pacing) and rate
//!   limits, used by server and client.
//! - [`ledbat`]: background transfers that yield to other traffic (a LEDBAT-like pacing
//!   controller on the sending socket), used by server and client.

pub mod compress;
pub mod direct;
pub mod durable;
pub mod frame_reader;
pub mod fs;
pub mod fskind;
pub mod integrity;
pub mod ledbat;
pub mod net;
pub mod nofile;
pub mod payload_pool;
pub mod protocol;
pub mod server;

/// Server-private records persisted in the state directory (proto/state.proto).
#[allow(missing_docs, clippy::all)]
pub(crate) mod state {
    include!(concat!(env!("OUT_DIR"), "/fsd.state.rs"));
}
