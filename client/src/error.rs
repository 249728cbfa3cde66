//! The client's error type, its retry classification and the CLI exit code each maps to.

use fsd::protocol::ErrorCode;

/// Longest server error message fsc keeps (fsd sends at most a few hundred bytes).
pub(crate) const MAX_REMOTE_MESSAGE: usize = 1024;

/// Anything that can go wrong in the client library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect (or name resolution) failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The TLS handshake failed: the server's certificate did not verify, the server refused
    /// ours, or the peer does not speak TLS. Not retried: retrying cannot fix it.
    #[error("TLS handshake with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    /// The connection broke (EOF, reset, codec failure) while something was outstanding.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// Nothing arrived for the stall timeout while requests were outstanding.
    #[error("connection stalled: no data for {0:?}")]
    Stalled(std::time::Duration),
    /// The server answered a request with an Error frame.
    #[error("server: {code}: {message}")]
    Remote {
        code: ErrorCode,
        message: String,
        retryable: bool,
    },
    /// The server broke the protocol (unexpected frame, bad sizes, malformed message).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A control frame arrived with a bad checksum; the request can be retried.
    #[error("corrupted {0} reply (checksum mismatch)")]
    Corrupt(fsd::protocol::Cmd),
    /// The server named a file we did not ask for, or an unsafe name (`..`, `/`, NUL).
    #[error("refused remote name {0:?}: not a plain file name")]
    UnsafeName(String),
    /// The data did not verify end to end (whole-file BLAKE3), even after a retry from scratch.
    #[error("{path}: integrity check failed: {detail}")]
    Integrity { path: String, detail: String },
    /// A local file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The destination's file system cannot hold the file (checked before anything is
    /// reserved; a download never fills the disk with space it has not received).
    #[error("{path}: not enough free space: {needed} more bytes needed, {free} free")]
    NoSpace {
        path: String,
        needed: u64,
        free: u64,
    },
    /// Bad arguments to a library call (e.g. a remote path that cannot be a local name).
    #[error("{0}")]
    Usage(String),
}

/// Result with the client [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying (after a reconnect and backoff) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::ConnectionLost(_)
            | Error::Stalled(_)
            | Error::Corrupt(_) => true,
            Error::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The `fsc` exit code for this error: 2 remote refusal, 3 integrity, 4 connection (a TLS
    /// handshake failure included), 1 other.
    pub fn exit_code(&self) -> i32 {
        match self {
            // A retryable remote error that outlasted the retries (the server's disk full,
            // an upload Busy) is still the server's answer, not a lost connection: it was 4
            // (review D, stop 30: a full server disk read as "connection failed").
            Error::Remote { .. } | Error::UnsafeName(_) => 2,
            Error::Integrity { .. } => 3,
            Error::Connect { .. }
            | Error::Tls { .. }
            | Error::ConnectionLost(_)
            | Error::Stalled(_)
            | Error::Corrupt(_) => 4,
            Error::Protocol(_) | Error::Io { .. } | Error::NoSpace { .. } | Error::Usage(_) => 1,
        }
    }

    /// The wire error code, for remote errors.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The message for a line that names `path` already ("PATH: MESSAGE"): the error without
    /// that path again when it carries the very same one (a local error about the entry it is
    /// reported for, an integrity failure of that file). Every place that prints or emits an
    /// error for a path uses this, so the path is said once.
    pub fn message_for(&self, path: &str) -> String {
        match self {
            Error::Io { path: p, source } if p == path => source.to_string(),
            Error::Integrity { path: p, detail } if p == path => {
                format!("integrity check failed: {detail}")
            }
            Error::NoSpace {
                path: p,
                needed,
                free,
            } if p == path => {
                format!("not enough free space: {needed} more bytes needed, {free} free")
            }
            e => e.to_string(),
        }
    }

    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }

    /// A server's ERROR, its message cut to [`MAX_REMOTE_MESSAGE`] bytes: a run keeps the
    /// message of every file that failed for its summary, and a control frame could carry
    /// 256 KiB of text each time.
    pub(crate) fn from_wire(e: fsd::protocol::msg::Error) -> Error {
        let code = ErrorCode::from_u32(e.code).unwrap_or(ErrorCode::Internal);
        let mut message = e.message;
        if message.len() > MAX_REMOTE_MESSAGE {
            let mut end = MAX_REMOTE_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Error::Remote {
            code,
            message,
            retryable: e.retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_said_once() {
        let e = Error::io("/x/d", std::io::ErrorKind::PermissionDenied.into());
        assert_eq!(e.message_for("/x/d"), "permission denied");
        assert_eq!(e.message_for("up/d"), "/x/d: permission denied");
        let e = Error::Integrity {
            path: "a".into(),
            detail: "hash".into(),
        };
        assert_eq!(e.message_for("a"), "integrity check failed: hash");
    }

    #[test]
    fn a_server_message_is_kept_short() {
        // Kept for the run's summary for every file that failed: a server must not make that
        // 256 KiB (a whole control frame) each.
        for long in ["x".repeat(250_000), "é".repeat(125_000)] {
            let e = Error::from_wire(fsd::protocol::msg::Error {
                code: ErrorCode::PermissionDenied as u32,
                message: long,
                retryable: false,
            });
            let Error::Remote { message, .. } = e else {
                panic!("not remote: {e:?}");
            };
            assert!(message.len() <= MAX_REMOTE_MESSAGE + '…'.len_utf8());
            assert!(message.ends_with('…'));
        }
    }
}
