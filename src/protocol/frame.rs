//! The fixed 20-byte frame header and the frame itself.

use bytes::{Buf, BufMut, Bytes};

/// "FSD1" in ASCII.
pub const MAGIC: u32 = 0x4653_4431;
/// The only protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 20;

/// Header flag bits.
pub mod flags {
    /// Last frame the sender will send on this stream.
    pub const END: u8 = 0x01;
    /// Payload is raw file bytes, not a protobuf message.
    pub const DATA: u8 = 0x02;
    /// Payload is an `Error` message; implies END.
    pub const ERROR: u8 = 0x04;
    /// With DATA only, and only on a connection whose Hello agreed on a compression level:
    /// the payload is a compressed chunk (crate::compress, PROTOCOL.md §8.3).
    pub const COMPRESSED: u8 = 0x08;
    /// All bits defined in version 1; a frame with any other bit set is rejected.
    pub const KNOWN: u8 = END | DATA | ERROR | COMPRESSED;
}

/// A command id. Unknown ids decode fine so the receiver can answer `UnknownCommand`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cmd(pub u16);

impl Cmd {
    pub const HELLO: Cmd = Cmd(0x0001);
    pub const AUTH: Cmd = Cmd(0x0002);
    pub const PING: Cmd = Cmd(0x0003);
    pub const LIST: Cmd = Cmd(0x0010);
    pub const STAT: Cmd = Cmd(0x0011);
    pub const OPEN: Cmd = Cmd(0x0012);
    pub const MANIFEST: Cmd = Cmd(0x0013);
    pub const READ: Cmd = Cmd(0x0014);
    pub const WRITE: Cmd = Cmd(0x0015);
    pub const COMMIT: Cmd = Cmd(0x0016);
    pub const CLOSE: Cmd = Cmd(0x0017);
    pub const CANCEL: Cmd = Cmd(0x0018);
    pub const PUT: Cmd = Cmd(0x0019);
    pub const SEED: Cmd = Cmd(0x001A);
    pub const SYMLINK: Cmd = Cmd(0x0025);
    pub const MKDIR: Cmd = Cmd(0x0020);
    pub const REMOVE: Cmd = Cmd(0x0021);
    pub const RENAME: Cmd = Cmd(0x0022);
    pub const TREE_READ: Cmd = Cmd(0x0023);
    pub const TREE_WRITE: Cmd = Cmd(0x0024);

    /// Name for logs; `None` for ids this version does not define.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Cmd::HELLO => "hello",
            Cmd::AUTH => "auth",
            Cmd::PING => "ping",
            Cmd::LIST => "list",
            Cmd::STAT => "stat",
            Cmd::OPEN => "open",
            Cmd::MANIFEST => "manifest",
            Cmd::READ => "read",
            Cmd::WRITE => "write",
            Cmd::COMMIT => "commit",
            Cmd::CLOSE => "close",
            Cmd::CANCEL => "cancel",
            Cmd::PUT => "put",
            Cmd::SEED => "seed",
            Cmd::SYMLINK => "symlink",
            Cmd::MKDIR => "mkdir",
            Cmd::REMOVE => "remove",
            Cmd::RENAME => "rename",
            Cmd::TREE_READ => "tree_read",
            Cmd::TREE_WRITE => "tree_write",
            _ => return None,
        })
    }
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "cmd#{:#06x}", self.0),
        }
    }
}

/// The frame header. On the wire: magic u32, version u8, flags u8, cmd u16, stream_id u32,
/// payload_len u32, checksum u32, all big-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub flags: u8,
    pub cmd: Cmd,
    pub stream_id: u32,
    pub payload_len: u32,
    /// CRC32 (IEEE, as computed by crc32fast) of the payload.
    pub checksum: u32,
}

impl Header {
    /// Appends the 20 header bytes to `dst`. Used alone for sendfile frames, whose payload
    /// follows straight from a file.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u32(MAGIC);
        dst.put_u8(self.version);
        dst.put_u8(self.flags);
        dst.put_u16(self.cmd.0);
        dst.put_u32(self.stream_id);
        dst.put_u32(self.payload_len);
        dst.put_u32(self.checksum);
    }

    /// The header as an array, for writing before a sendfile payload.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.encode(&mut &mut out[..]);
        out
    }

    /// Parses 20 bytes without validating anything but their count; returns the magic too.
    pub(crate) fn parse(mut src: &[u8]) -> (u32, Header) {
        debug_assert!(src.len() >= HEADER_LEN);
        let magic = src.get_u32();
        let header = Header {
            version: src.get_u8(),
            flags: src.get_u8(),
            cmd: Cmd(src.get_u16()),
            stream_id: src.get_u32(),
            payload_len: src.get_u32(),
            checksum: src.get_u32(),
        };
        (magic, header)
    }

    /// Header of a DATA frame whose payload (of `len` bytes, CRC32 `crc`) is sent separately.
    pub fn data(cmd: Cmd, stream_id: u32, len: u32, crc: u32, end: bool) -> Header {
        Header {
            version: VERSION,
            flags: flags::DATA | if end { flags::END } else { 0 },
            cmd,
            stream_id,
            payload_len: len,
            checksum: crc,
        }
    }

    pub fn is_end(&self) -> bool {
        self.flags & (flags::END | flags::ERROR) != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.flags & flags::COMPRESSED != 0
    }

    pub fn is_data(&self) -> bool {
        self.flags & flags::DATA != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & flags::ERROR != 0
    }
}

/// A whole frame: header plus payload. The header's `payload_len` and `checksum` always describe
/// `payload`; constructors keep them in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Bytes,
}

impl Frame {
    /// A frame with `payload`, computing its length and checksum.
    pub fn new(cmd: Cmd, stream_id: u32, flags: u8, payload: Bytes) -> Frame {
        Frame {
            header: Header {
                version: VERSION,
                flags,
                cmd,
                stream_id,
                payload_len: payload.len() as u32,
                checksum: crc32fast::hash(&payload),
            },
            payload,
        }
    }

    /// A protobuf message frame.
    pub fn message(cmd: Cmd, stream_id: u32, flags: u8, m: &impl prost::Message) -> Frame {
        Frame::new(cmd, stream_id, flags, Bytes::from(m.encode_to_vec()))
    }

    /// An error reply on `stream_id` for `cmd`.
    pub fn error(cmd: Cmd, stream_id: u32, e: &super::msg::Error) -> Frame {
        Frame::message(cmd, stream_id, flags::ERROR | flags::END, e)
    }

    /// Decodes the payload as message `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.payload.clone())
    }

    pub fn cmd(&self) -> Cmd {
        self.header.cmd
    }
    pub fn stream_id(&self) -> u32 {
        self.header.stream_id
    }
}
