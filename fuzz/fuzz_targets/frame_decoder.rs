//! Fuzzes `fsd::protocol::FrameCodec` as the server uses it: bytes arrive from an untrusted peer
//! in arbitrary pieces and are decoded until the codec wants more (`Ok(None)`) or gives up
//! (`Err`, after which the connection is closed).
//!
//! Input layout: byte 0 picks the piece size (0 = everything at once), byte 1 picks the DATA
//! limit `max_data`, the rest is the byte stream.
//!
//! Oracles, beyond "never panics":
//! * every decoded frame (good or bad checksum) has a valid version and flags, and a payload of
//!   exactly `header.payload_len` bytes within the limit for its kind;
//! * a good frame's CRC32 matches, a `BadChecksum`'s `actual` is the real CRC32 and differs;
//! * the bytes the codec consumed for a frame are exactly what the Encoder writes for it, and
//!   that encoding decodes back to the same frame with nothing left over;
//! * the receive buffer's capacity never exceeds input + one header + the largest payload the
//!   codec may legitimately wait for (`MAX_CONTROL_PAYLOAD` + `max_data`), i.e. a header alone
//!   cannot make the server reserve memory beyond its limits. (BytesMut may double a buffer when
//!   it grows, so the bound assumes inputs below ~256 KiB: libFuzzer's default -max_len is 4096.)
#![no_main]

use bytes::BytesMut;
use fsd::protocol::{flags, FrameCodec, HEADER_LEN, MAX_CONTROL_PAYLOAD, VERSION};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

/// DATA limits to try: degenerate ones, small ones a short input can fill, and real chunk sizes
/// (64 KiB to 16 MiB: `MIN_CHUNK_SIZE`..`MAX_CHUNK_SIZE`).
const MAX_DATA: [u32; 8] = [0, 1, 20, 4096, 64 << 10, 1 << 20, 16 << 20, 100];

/// `Result<Frame, BadChecksum>`: `BadChecksum` is not re-exported by `fsd::protocol`, so it is
/// named through the Decoder's associated type.
type Item = <FrameCodec as Decoder>::Item;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = match data[0] {
        0 => usize::MAX,
        n => n as usize,
    };
    let max_data = MAX_DATA[data[1] as usize % MAX_DATA.len()];
    let wire = &data[2..];
    let cap_limit = wire.len() + HEADER_LEN + MAX_CONTROL_PAYLOAD as usize + max_data as usize;

    let mut codec = FrameCodec::new(max_data);
    let mut buf = BytesMut::new();
    // Bytes appended to `buf` so far; `fed - buf.len()` is how many the codec has consumed.
    let mut fed = 0usize;
    let mut failed = false;

    'stream: for piece in wire.chunks(split.min(wire.len().max(1))) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let res = codec.decode(&mut buf);
            assert!(
                buf.capacity() <= cap_limit,
                "capacity {} > limit {cap_limit} (max_data {max_data}, input {})",
                buf.capacity(),
                wire.len()
            );
            match res {
                Ok(Some(item)) => check_item(item, wire, fed - buf.len(), max_data),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'stream;
                }
            }
        }
    }

    // End of stream: what a `FramedRead` does when the peer closes the connection.
    if !failed {
        loop {
            let res = codec.decode_eof(&mut buf);
            assert!(buf.capacity() <= cap_limit);
            match res {
                Ok(Some(item)) => check_item(item, wire, fed - buf.len(), max_data),
                Ok(None) | Err(_) => break,
            }
        }
    }
});

/// Checks one decoded item; `end` is the stream offset just past its payload.
fn check_item(item: Item, wire: &[u8], end: usize, max_data: u32) {
    let header = match &item {
        Ok(f) => f.header,
        Err(bad) => bad.header,
    };
    assert_eq!(header.version, VERSION);
    assert_eq!(header.flags & !flags::KNOWN, 0, "unknown flags accepted");
    let limit = if header.is_data() {
        max_data
    } else {
        MAX_CONTROL_PAYLOAD
    };
    assert!(
        header.payload_len <= limit,
        "payload {} > limit {limit}",
        header.payload_len
    );
    let len = header.payload_len as usize;
    let start = end
        .checked_sub(HEADER_LEN + len)
        .expect("frame longer than the bytes consumed");
    let on_wire = &wire[start..end];
    let crc = crc32fast::hash(&on_wire[HEADER_LEN..]);

    match item {
        Err(bad) => {
            assert_eq!(
                bad.actual, crc,
                "BadChecksum.actual is not the payload's CRC32"
            );
            assert_ne!(
                bad.actual, bad.header.checksum,
                "BadChecksum for a matching CRC"
            );
            assert_eq!(&header.to_bytes()[..], &on_wire[..HEADER_LEN]);
        }
        Ok(frame) => {
            assert_eq!(
                frame.payload.len(),
                len,
                "payload length != header.payload_len"
            );
            assert_eq!(
                frame.header.checksum, crc,
                "frame accepted with a wrong CRC32"
            );
            assert_eq!(&frame.payload[..], &on_wire[HEADER_LEN..]);

            // Re-encode: must reproduce the consumed bytes exactly...
            let mut enc = BytesMut::new();
            FrameCodec::new(max_data)
                .encode(frame.clone(), &mut enc)
                .expect("encode failed");
            assert_eq!(&enc[..], on_wire, "re-encoding differs from the wire bytes");
            // ...and decode back to the same frame with nothing left over.
            let back = FrameCodec::new(max_data)
                .decode(&mut enc)
                .expect("re-encoded frame refused")
                .expect("re-encoded frame incomplete")
                .expect("re-encoded frame has a bad checksum");
            assert_eq!(back, frame);
            assert!(
                enc.is_empty(),
                "bytes left after decoding a re-encoded frame"
            );
        }
    }
}
