//! All file-system access of the server: confined path resolution beneath --root, listing
//! cursors, chunk manifests (CRC32 cache) and upload state. Nothing outside this module opens a
//! path; the state directory is the server's own, so the manifest and upload stores use std::fs
//! on it directly.
#![allow(clippy::disallowed_methods)]

pub mod identity;
pub mod lease;
pub mod listing;
pub mod manifest;
pub mod root;
pub mod upload;
