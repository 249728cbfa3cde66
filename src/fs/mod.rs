//! All file-system access of the server: confined path resolution beneath --root, chunk
//! manifests (CRC32 cache) and upload state. Nothing outside this module opens a path.

pub mod root;
