//! tokio-util codec for frames. The decoder has two states, header then payload, and checks
//! magic, version, flags and the payload length against its limits *before* reserving memory.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::frame::{flags, Cmd, Frame, Header, HEADER_LEN, MAGIC, VERSION};
use super::MAX_CONTROL_PAYLOAD;

/// Capacity of the fresh read buffer that follows a DATA payload read into its own.
const READ_BUFFER: usize = 64 * 1024;

/// Fatal decoding errors: after one of these the byte stream cannot be trusted, and the
/// connection is answered (where a stream id is known) and closed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic {0:#010x}: not an fsd peer")]
    BadMagic(u32),
    #[error("unsupported protocol version {version} (this build speaks {VERSION})")]
    UnsupportedVersion {
        version: u8,
        cmd: Cmd,
        stream_id: u32,
    },
    #[error("unknown flag bits {flags:#04x} on stream {stream_id}")]
    UnknownFlags { flags: u8, cmd: Cmd, stream_id: u32 },
    #[error("payload of {len} bytes on stream {stream_id} exceeds the limit of {max}")]
    TooLarge {
        len: u32,
        max: u32,
        cmd: Cmd,
        stream_id: u32,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// Stream and command the error can be reported on, if the header was readable.
    pub fn reply_to(&self) -> Option<(Cmd, u32)> {
        match *self {
            CodecError::UnsupportedVersion { cmd, stream_id, .. }
            | CodecError::UnknownFlags { cmd, stream_id, .. }
            | CodecError::TooLarge { cmd, stream_id, .. } => Some((cmd, stream_id)),
            _ => None,
        }
    }
}

/// A frame that was delimited correctly but whose payload failed its CRC32. Framing is intact,
/// so the connection survives; the receiver drops the payload and reports or re-requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChecksum {
    pub header: Header,
    pub actual: u32,
}

/// Frame codec with per-connection limits.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    /// Largest DATA payload accepted (the negotiated max frame, normally one chunk).
    max_data: u32,
    /// Largest control payload accepted.
    max_control: u32,
    /// Header of the frame whose payload is being awaited.
    pending: Option<Header>,
    /// DATA payloads are passed on unchecked; the consumer verifies them (see
    /// [`FrameCodec::defer_data_checksums`]).
    defer_data: bool,
    /// The source buffer was replaced by one holding only the pending DATA payload. No payload
    /// is a slice of a buffer other frames were read into: a small request kept alive while it
    /// waits must not keep a 16 MiB allocation with it (docs/SECURITY.md §6, "read buffer").
    own_buffer: bool,
    /// See [`FrameCodec::reader_allocates`].
    reader_allocates: bool,
}

impl FrameCodec {
    /// Bytes still missing, beyond the `buffered` ones, to complete the frame being decoded
    /// (its header when none is pending). A receiver can ask the kernel to wake it only then.
    pub fn wanted(&self, buffered: usize) -> usize {
        let need = match self.pending {
            Some(h) => usize::try_from(h.payload_len).expect("a u32 fits usize"),
            None => HEADER_LEN,
        };
        need.saturating_sub(buffered)
    }

    /// Leaves [`FrameCodec::own_payload_buffer`] to the reader, which calls it once it is ready
    /// to read the payload (e.g. after waiting for room in a budget): no allocation is made for
    /// a payload that is not being read yet.
    pub fn reader_allocates(&mut self) {
        self.reader_allocates = true;
    }

    /// Moves the pending DATA payload's bytes read so far out of the shared buffer `src` into an
    /// allocation of its own, exactly the payload's size, so that it never shares one with other
    /// frames (see `own_buffer`); the reader then reads the rest there. The part moved is the
    /// copy that growing the shared buffer made before. No-op without such a payload.
    pub fn own_payload_buffer(&mut self, src: &mut BytesMut) {
        self.own_payload_buffer_from(src, BytesMut::with_capacity);
    }

    /// [`FrameCodec::own_payload_buffer`], with the allocation from `alloc(len)`: an empty
    /// buffer of capacity exactly `len` (e.g. one used before, from a
    /// [`crate::payload_pool::PayloadPool`]).
    pub fn own_payload_buffer_from(
        &mut self,
        src: &mut BytesMut,
        alloc: impl FnOnce(usize) -> BytesMut,
    ) {
        let Some(h) = self.pending_data() else {
            return;
        };
        let len = usize::try_from(h.payload_len).expect("a u32 fits usize");
        if self.own_buffer || src.len() >= len {
            return;
        }
        let mut own = alloc(len);
        debug_assert!(own.is_empty() && own.capacity() == len);
        own.extend_from_slice(src);
        *src = own;
        self.own_buffer = true;
    }

    /// The header of the DATA frame whose payload is being awaited, if any.
    pub fn pending_data(&self) -> Option<Header> {
        self.pending.filter(|h| h.is_data())
    }

    /// Whether the pending payload has a buffer of its own, sized for it: the reader must then
    /// read into it no more than [`FrameCodec::wanted`] bytes, so nothing else lands there.
    pub fn reading_own_payload(&self) -> bool {
        self.own_buffer
    }

    /// A codec accepting DATA payloads up to `max_data` bytes and control payloads up to
    /// [`MAX_CONTROL_PAYLOAD`].
    pub fn new(max_data: u32) -> FrameCodec {
        FrameCodec {
            max_data,
            max_control: MAX_CONTROL_PAYLOAD,
            pending: None,
            defer_data: false,
            own_buffer: false,
            reader_allocates: false,
        }
    }

    /// Passes DATA frames on without checking their checksum: the consumer must compare
    /// `crc32(payload)` with `header.checksum` itself before using the payload. A receiver that
    /// hashes each chunk on another thread anyway does it there, while the bytes are hot in that
    /// core's cache, instead of in series with every socket read. Control frames are still
    /// checked here.
    pub fn defer_data_checksums(&mut self) {
        self.defer_data = true;
    }

    /// Changes the DATA limit (e.g. once the peer has authenticated).
    pub fn set_max_data(&mut self, max_data: u32) {
        self.max_data = max_data;
    }

    /// Changes the control-payload limit (never above [`MAX_CONTROL_PAYLOAD`] on the wire).
    pub fn set_max_control(&mut self, max_control: u32) {
        self.max_control = max_control;
    }

    fn check_header(&self, magic: u32, h: &Header) -> Result<(), CodecError> {
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        if h.version != VERSION {
            return Err(CodecError::UnsupportedVersion {
                version: h.version,
                cmd: h.cmd,
                stream_id: h.stream_id,
            });
        }
        // COMPRESSED qualifies a DATA payload; on anything else it is as unknown as 0xF0.
        if h.flags & !flags::KNOWN != 0 || (h.is_compressed() && !h.is_data()) {
            return Err(CodecError::UnknownFlags {
                flags: h.flags,
                cmd: h.cmd,
                stream_id: h.stream_id,
            });
        }
        let max = if h.is_data() {
            self.max_data
        } else {
            self.max_control
        };
        if h.payload_len > max {
            return Err(CodecError::TooLarge {
                len: h.payload_len,
                max,
                cmd: h.cmd,
                stream_id: h.stream_id,
            });
        }
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, BadChecksum>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let (magic, h) = Header::parse(&src[..HEADER_LEN]);
                self.check_header(magic, &h)?;
                let _ = src.split_to(HEADER_LEN);
                self.pending = Some(h);
                h
            }
        };
        let len = usize::try_from(header.payload_len).expect("a u32 fits usize");
        if src.len() < len {
            // Safe: len was bounded by check_header.
            if header.is_data() && !self.own_buffer {
                if !self.reader_allocates {
                    self.own_payload_buffer(src);
                }
            } else {
                src.reserve(len - src.len());
            }
            return Ok(None);
        }
        self.pending = None;
        let payload = if std::mem::take(&mut self.own_buffer) {
            // The buffer holds this payload and nothing else: hand it over whole, and read on
            // into a fresh buffer, never into this allocation.
            // (A reader that appended beyond the payload, unlike FrameReader, gets those bytes
            // moved to the fresh buffer.)
            let mut next = BytesMut::with_capacity(READ_BUFFER.max(src.len() - len));
            next.extend_from_slice(&src[len..]);
            src.truncate(len);
            std::mem::replace(src, next).freeze()
        } else {
            // Cut from the shared read buffer: copied out, so that a payload kept for long (a
            // request waiting its turn) pins only its own bytes, not the buffer. Such payloads
            // are small: control payloads (<= MAX_CONTROL_PAYLOAD), and DATA payloads that
            // arrived whole within one read of the buffer.
            let p = bytes::Bytes::copy_from_slice(&src[..len]);
            src.advance(len);
            p
        };
        if self.defer_data && header.is_data() {
            return Ok(Some(Ok(Frame { header, payload })));
        }
        let actual = crc32fast::hash(&payload);
        if actual != header.checksum {
            return Ok(Some(Err(BadChecksum { header, actual })));
        }
        Ok(Some(Ok(Frame { header, payload })))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.reserve(HEADER_LEN + frame.payload.len());
        frame.header.encode(dst);
        dst.put_slice(&frame.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn encode(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        FrameCodec::new(1 << 20).encode(f.clone(), &mut b).unwrap();
        b
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            any::<u8>(),
            any::<u16>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..4096),
        )
            .prop_map(|(fl, cmd, sid, payload)| {
                // Valid flags only: COMPRESSED qualifies DATA and nothing else.
                let mut fl = fl & flags::KNOWN;
                if fl & flags::DATA == 0 {
                    fl &= !flags::COMPRESSED;
                }
                Frame::new(Cmd(cmd), sid, fl, Bytes::from(payload))
            })
    }

    #[test]
    fn compressed_without_data_is_an_unknown_flag() {
        for (fl, ok) in [
            (flags::COMPRESSED, false),
            (flags::COMPRESSED | flags::END, false),
            (flags::COMPRESSED | flags::ERROR | flags::END, false),
            (flags::COMPRESSED | flags::DATA, true),
            (flags::COMPRESSED | flags::DATA | flags::END, true),
            (0x10, false),
        ] {
            let f = Frame::new(Cmd::READ, 1, fl, Bytes::from_static(b"abc"));
            let mut b = encode(&f);
            let r = FrameCodec::new(1 << 20).decode(&mut b);
            assert_eq!(r.is_ok(), ok, "flags {fl:#04x}: {r:?}");
        }
    }

    proptest! {
        #[test]
        fn every_valid_frame_round_trips(frames in prop::collection::vec(arb_frame(), 1..8), split in 1usize..64) {
            let mut wire = BytesMut::new();
            for f in &frames { wire.extend_from_slice(&encode(f)); }
            // Feed the bytes in pieces of `split` to exercise the two-state decoder.
            let mut codec = FrameCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(item) = codec.decode(&mut buf).unwrap() {
                    out.push(item.unwrap());
                }
            }
            prop_assert_eq!(out, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_overallocate(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let max = 4096u32;
            let mut codec = FrameCodec::new(max);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            // Never reserves more than one header plus the largest permitted payload beyond input.
            prop_assert!(buf.capacity() <= bytes.len().max(HEADER_LEN) + MAX_CONTROL_PAYLOAD as usize + HEADER_LEN);
        }

        #[test]
        fn a_flipped_payload_bit_is_caught(f in arb_frame(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            prop_assume!(!f.payload.is_empty());
            let mut wire = encode(&f);
            let i = HEADER_LEN + pos.index(f.payload.len());
            wire[i] ^= 1 << bit;
            let item = FrameCodec::new(1 << 20).decode(&mut wire).unwrap().unwrap();
            prop_assert!(item.is_err());
        }

        #[test]
        fn oversized_lengths_are_refused_before_allocating(len in 4097u32.., data in any::<bool>()) {
            let h = Header { version: VERSION, flags: if data { flags::DATA } else { 0 }, cmd: Cmd::READ, stream_id: 1, payload_len: len.max(MAX_CONTROL_PAYLOAD + 1), checksum: 0 };
            let mut buf = BytesMut::new();
            h.encode(&mut buf);
            let cap = buf.capacity();
            let err = FrameCodec::new(4096).decode(&mut buf).unwrap_err();
            let too_large = matches!(err, CodecError::TooLarge { .. });
            prop_assert!(too_large);
            prop_assert_eq!(buf.capacity(), cap);
        }
    }

    #[test]
    fn bad_magic_and_version_are_refused() {
        let f = Frame::new(Cmd::PING, 7, 0, Bytes::from_static(b"x"));
        let mut wire = encode(&f);
        wire[0] ^= 0xff;
        assert!(matches!(
            FrameCodec::new(1024).decode(&mut wire),
            Err(CodecError::BadMagic(_))
        ));
        let mut wire = encode(&f);
        wire[4] = 9;
        let err = FrameCodec::new(1024).decode(&mut wire).unwrap_err();
        assert_eq!(err.reply_to(), Some((Cmd::PING, 7)));
    }

    #[test]
    fn header_only_encode_matches_full_encode() {
        let payload = Bytes::from_static(b"chunk bytes");
        let f = Frame::new(Cmd::READ, 3, flags::DATA | flags::END, payload.clone());
        let h = Header::data(
            Cmd::READ,
            3,
            payload.len() as u32,
            crc32fast::hash(&payload),
            true,
        );
        let mut wire = h.to_bytes().to_vec();
        wire.extend_from_slice(&payload);
        assert_eq!(&wire[..], &encode(&f)[..]);
    }

    #[test]
    fn wanted_counts_what_the_frame_in_progress_still_lacks() {
        let f = Frame::new(
            Cmd::READ,
            3,
            flags::DATA | flags::END,
            Bytes::from(vec![7u8; 1000]),
        );
        let mut bytes = encode(&f);
        let mut c = FrameCodec::new(1 << 20);
        assert_eq!(c.wanted(0), HEADER_LEN);
        assert_eq!(c.wanted(5), HEADER_LEN - 5);
        let mut head = bytes.split_to(HEADER_LEN + 100);
        assert!(c.decode(&mut head).unwrap().is_none());
        assert_eq!(c.wanted(head.len()), 900);
        head.unsplit(bytes);
        assert!(c.decode(&mut head).unwrap().is_some());
        assert_eq!(c.wanted(0), HEADER_LEN);
    }
}
