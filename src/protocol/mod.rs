//! Wire protocol v1: the frame header, the codec, command ids, error codes and the generated
//! protobuf messages. Pure data and parsing: no sockets, no policy. The contract is
//! docs/PROTOCOL.md; change both together.

mod codec;
mod frame;
pub mod tree;

pub use codec::{BadChecksum, CodecError, FrameCodec};
pub use frame::{flags, Cmd, Frame, Header, HEADER_LEN, MAGIC, VERSION};

/// Generated from proto/fsd.proto.
#[allow(missing_docs, clippy::all)]
pub mod msg {
    include!(concat!(env!("OUT_DIR"), "/fsd.v1.rs"));
}

/// Largest control (protobuf) payload either side accepts: control messages stay small.
pub const MAX_CONTROL_PAYLOAD: u32 = 256 * 1024;
/// Default chunk size: the unit of DATA frames, CRC32s, bitmaps and resume.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Smallest and largest chunk sizes a peer may negotiate (powers of two).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Files never have more chunks than this: the chunk size doubles for bigger files, which keeps
/// a bitmap (128 KiB) inside one control frame.
pub const MAX_CHUNKS_PER_FILE: u64 = 1 << 20;
/// Entries per Manifest page.
pub const MANIFEST_PAGE: u32 = 16384;
/// Entries per Manifest page that carries chaining values: as many as fit
/// [`MAX_CONTROL_PAYLOAD`] at 36 bytes each with room to spare (7253; 16384 of them would be
/// 576 KiB). Clients that ask for more pages of up to 16384 get what they asked for whenever
/// that fits, as before this limit.
pub const MANIFEST_CVS_PAGE: u32 = (MAX_CONTROL_PAYLOAD - 1024) / 36;
/// Largest file a server sends inline with its OpenResponse (OpenRequest.inline_max).
pub const MAX_INLINE: u32 = 256 * 1024;
/// Multi-chunk uploads one connection may hold open at once: each pins per-chunk state sized by
/// the size the client declared, so a peer cannot multiply that by the handle limit. Uploads of
/// one chunk count only as handles.
pub const MAX_UPLOADS_PER_CONNECTION: usize = 16;

/// Longest client path in bytes (PATH_MAX): fsd refuses longer ones, whatever the command.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest symlink target fsd creates or fsc copies (PATH_MAX less the NUL).
pub const MAX_LINK_TARGET: usize = 4095;

/// Whether the symlink at `link` (a path relative to some top directory, `/`-separated, every
/// directory on it a real one) with the link text `target` resolves beneath that top, whatever
/// the other links in the tree are: `target` is relative, not empty, at most
/// [`MAX_LINK_TARGET`] bytes, without NUL, and of the form `(../)*name(/name)*`, with no more
/// `..` than the link has directories above it. A `..` after a name is refused: that name may
/// itself be a link (`l -> .`, then `m -> l/..` is the top's parent), so a by-name walk cannot
/// tell where it lands; climbing first from the link's own (real) directory and then only
/// descending can never leave the top, since every link it passes through obeys the same rule.
/// Neither fsd nor fsc ever follows a link; this keeps the links they create from pointing out
/// of a tree for whatever does (rsync's `--safe-links` had this hole: CVE-2024-12088).
pub fn link_stays_within(link: &str, target: &str) -> bool {
    if target.is_empty()
        || target.len() > MAX_LINK_TARGET
        || target.starts_with('/')
        || target.contains('\0')
    {
        return false;
    }
    if link.split('/').any(|c| c == "..") {
        return false;
    }
    let depth = link
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .count();
    // Resolution starts in the link's directory.
    let Some(mut room) = depth.checked_sub(1) else {
        return false;
    };
    let mut named = false;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." if named || room == 0 => return false,
            ".." => room -= 1,
            _ => named = true,
        }
    }
    true
}

/// The chunk size used for a file of `size` bytes when the connection's base chunk size is
/// `base`: the smallest power-of-two multiple of `base` that keeps the chunk count within
/// [`MAX_CHUNKS_PER_FILE`].
pub fn chunk_size_for(size: u64, base: u32) -> u32 {
    let mut chunk = base as u64;
    while size.div_ceil(chunk) > MAX_CHUNKS_PER_FILE {
        chunk *= 2;
    }
    chunk.min(u32::MAX as u64 / 2 + 1) as u32
}

/// Number of chunks of a file (0 for an empty file). Saturates at `u32::MAX` rather than wrap
/// (a wrapped count once turned a 4 TiB file into 0 chunks); for sizes and chunk sizes that
/// came off the wire use [`checked_chunk_count`], which also enforces [`MAX_CHUNKS_PER_FILE`].
pub fn chunk_count(size: u64, chunk_size: u32) -> u32 {
    u32::try_from(size.div_ceil(u64::from(chunk_size.max(1)))).unwrap_or(u32::MAX)
}

/// Number of chunks of a file, or `None` if the chunk size is 0 or the count exceeds
/// [`MAX_CHUNKS_PER_FILE`] (docs/PROTOCOL.md §8.1).
pub fn checked_chunk_count(size: u64, chunk_size: u32) -> Option<u32> {
    if chunk_size == 0 {
        return None;
    }
    let n = size.div_ceil(u64::from(chunk_size));
    if n > MAX_CHUNKS_PER_FILE {
        return None;
    }
    u32::try_from(n).ok()
}

/// Byte length of chunk `index` of a file of `size` bytes.
pub fn chunk_len(size: u64, chunk_size: u32, index: u32) -> u32 {
    let start = index as u64 * chunk_size as u64;
    size.saturating_sub(start).min(chunk_size as u64) as u32
}

/// Error codes carried in [`msg::Error::code`]. Numbers are part of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// Malformed frame or message.
    BadRequest = 1,
    /// Unsupported protocol version.
    UnsupportedVersion = 2,
    /// Command id unknown to the receiver.
    UnknownCommand = 3,
    /// Command sent before a successful Auth.
    NotAuthenticated = 4,
    /// Wrong token or certificate.
    AuthFailed = 5,
    /// Credential lacks the right (read-only token writing, path outside its prefix).
    PermissionDenied = 6,
    /// Path refused: escapes the root, absolute, `..`, NUL, reserved name, too long.
    InvalidPath = 7,
    NotFound = 8,
    AlreadyExists = 9,
    NotADirectory = 10,
    IsADirectory = 11,
    /// Not a regular file (FIFO, device, socket) where one is required.
    NotAFile = 12,
    DirectoryNotEmpty = 13,
    /// Handle unknown on this connection.
    BadHandle = 14,
    /// Stream id already in use, or frame on a stream in the wrong state.
    BadStream = 15,
    /// A connection limit (streams, handles, frame size, connections) was hit.
    LimitExceeded = 16,
    /// Payload checksum did not match.
    ChecksumMismatch = 17,
    /// Commit: chunks missing.
    Incomplete = 18,
    /// Commit: whole-file BLAKE3 differs from the client's.
    HashMismatch = 19,
    /// The file changed while it was open.
    Changed = 20,
    /// ENOSPC / EDQUOT.
    NoSpace = 21,
    /// Another process holds the upload.
    Busy = 22,
    /// Server shutting down.
    ShuttingDown = 23,
    /// Idle or auth timeout.
    Timeout = 24,
    /// Any other I/O error.
    Io = 25,
    /// A bug or an unexpected state.
    Internal = 26,
    /// The stream was reset by CANCEL.
    Cancelled = 27,
    /// The server's file system cannot do this (e.g. a no-clobber directory rename where the
    /// file system lacks RENAME_NOREPLACE).
    Unsupported = 28,
}

impl ErrorCode {
    /// Whether a client may retry the same request later and expect success.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NoSpace
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
                | ErrorCode::Timeout
                | ErrorCode::Io
                | ErrorCode::LimitExceeded
                | ErrorCode::ChecksumMismatch
        )
    }

    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        use ErrorCode::*;
        const ALL: [ErrorCode; 28] = [
            BadRequest,
            UnsupportedVersion,
            UnknownCommand,
            NotAuthenticated,
            AuthFailed,
            PermissionDenied,
            InvalidPath,
            NotFound,
            AlreadyExists,
            NotADirectory,
            IsADirectory,
            NotAFile,
            DirectoryNotEmpty,
            BadHandle,
            BadStream,
            LimitExceeded,
            ChecksumMismatch,
            Incomplete,
            HashMismatch,
            Changed,
            NoSpace,
            Busy,
            ShuttingDown,
            Timeout,
            Io,
            Internal,
            Cancelled,
            Unsupported,
        ];
        ALL.into_iter().find(|c| *c as u32 == code)
    }

    /// A wire Error message with this code.
    pub fn msg(self, message: impl Into<String>) -> msg::Error {
        msg::Error {
            code: self as u32,
            message: message.into(),
            retryable: self.retryable(),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn link_targets_stay_within_the_top_by_name() {
        for (link, target) in [
            ("l", "f"),
            ("a/l", "../b/f"),
            ("a/b/l", "../../c"),
            ("a/l", ".."),
            ("a/l", "./x/./y/z"),
            ("l", "."),
            ("l", "l2/x"),
        ] {
            assert!(link_stays_within(link, target), "{link} -> {target}");
        }
        for (link, target) in [
            ("l", ".."),
            ("a/l", "../../x"),
            ("a/l", "/etc/passwd"),
            ("l", ""),
            ("l", "a\0b"),
            ("a/l", "x/../../../y"),
            // A `..` after a name, which may be a link: `l -> .`, then `m -> l/..` is the
            // top's parent on disk, though "l/.." is the top by name.
            ("m", "l/.."),
            ("a/l", "./x/./y/../z"),
            ("a/b/up", "l/../../x"),
            ("../l", "f"),
            ("", "f"),
        ] {
            assert!(!link_stays_within(link, target), "{link} -> {target}");
        }
        assert!(!link_stays_within("l", &"a/".repeat(2048)));
    }

    use super::*;

    #[test]
    fn chunk_math() {
        assert_eq!(chunk_count(0, 1024), 0);
        assert_eq!(chunk_count(1, 1024), 1);
        assert_eq!(chunk_count(1024, 1024), 1);
        assert_eq!(chunk_count(1025, 1024), 2);
        assert_eq!(chunk_len(1025, 1024, 1), 1);
        assert_eq!(chunk_len(1025, 1024, 0), 1024);
        // 2^42 bytes in 1 KiB chunks is 2^32 chunks: never 0.
        assert_eq!(chunk_count(1 << 42, 1024), u32::MAX);
        assert_eq!(checked_chunk_count(1 << 42, 1024), None);
        assert_eq!(checked_chunk_count(1 << 30, 1024), Some(1 << 20));
        assert_eq!(checked_chunk_count((1 << 30) + 1, 1024), None);
        assert_eq!(checked_chunk_count(5, 0), None);
        assert_eq!(checked_chunk_count(0, 1024), Some(0));
        let huge = 5u64 << 40; // 5 TiB
        let cs = chunk_size_for(huge, DEFAULT_CHUNK_SIZE);
        assert!(chunk_count(huge, cs) as u64 <= MAX_CHUNKS_PER_FILE);
        assert!(cs.is_power_of_two());
        assert_eq!(
            chunk_size_for(1 << 30, DEFAULT_CHUNK_SIZE),
            DEFAULT_CHUNK_SIZE
        );
    }

    #[test]
    fn error_codes_round_trip() {
        for n in 0..40 {
            if let Some(c) = ErrorCode::from_u32(n) {
                assert_eq!(c as u32, n);
            }
        }
        assert_eq!(ErrorCode::from_u32(26), Some(ErrorCode::Internal));
        assert_eq!(ErrorCode::from_u32(0), None);
    }
}
