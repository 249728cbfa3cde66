//! All file-system access of the server: confined path resolution beneath --root, listing
//! cursors, chunk manifests (CRC32 cache) and upload state. Nothing outside this module opens a
//! path; the state directory is the server's own, so the manifest and upload stores use std::fs
//! on it directly.
#![allow(clippy::disallowed_methods)]

pub mod identity;
pub mod lease;
pub mod listing;
pub mod lru_dir;
pub mod manifest;
pub mod root;
pub mod upload;
pub mod zcache;

/// A suffix for a private file name in the state directory that no other process, on this or
/// any other node sharing the directory, uses: a random per-process nonce (pids repeat across
/// nodes) and a counter.
pub fn private_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static NONCE: OnceLock<u64> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nonce = NONCE.get_or_init(rand::random::<u64>);
    format!("{nonce:016x}.{}", COUNT.fetch_add(1, Ordering::Relaxed))
}
