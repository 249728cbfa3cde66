//! Fuzzes the prost decoders of every message the server decodes from a client's control frame
//! (`fsd::protocol::msg`). Each input is decoded as every request type; a message that decodes
//! must re-encode to `encoded_len()` bytes and decode back to an equal message.
//! Oracle: never panics (prost must turn any malformed input into a `DecodeError`).
#![no_main]

use fsd::protocol::msg;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq>(data: &[u8]) {
    let Ok(m) = M::decode(data) else { return };
    let enc = m.encode_to_vec();
    assert_eq!(
        enc.len(),
        m.encoded_len(),
        "encoded_len disagrees with encode"
    );
    let back = M::decode(&enc[..]).expect("a re-encoded message must decode");
    assert!(back == m, "re-encoded message decodes differently");
    // Length-delimited form, as used when messages are streamed.
    let delimited = m.encode_length_delimited_to_vec();
    let back = M::decode_length_delimited(&delimited[..]).expect("length-delimited decode");
    assert!(back == m);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<msg::Hello>(data);
    round_trip::<msg::Auth>(data);
    round_trip::<msg::Ping>(data);
    round_trip::<msg::ListRequest>(data);
    round_trip::<msg::StatRequest>(data);
    round_trip::<msg::OpenRequest>(data);
    round_trip::<msg::ManifestRequest>(data);
    round_trip::<msg::ReadRequest>(data);
    round_trip::<msg::WriteRequest>(data);
    round_trip::<msg::CommitRequest>(data);
    round_trip::<msg::CloseRequest>(data);
    round_trip::<msg::Cancel>(data);
    round_trip::<msg::MkdirRequest>(data);
    round_trip::<msg::RemoveRequest>(data);
    round_trip::<msg::RenameRequest>(data);
});
