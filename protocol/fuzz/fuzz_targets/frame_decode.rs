//! Untrusted bytes into every unauthenticated decoder: the frame view and header, the stream
//! length check, every message body, batch records and values, and the Hello peek.
//! Nothing may panic, and anything that decodes re-encodes to a canonical form that decodes
//! and re-encodes to itself (decoders accept overlong varints, SPEC.md §3).
#![no_main]

use cairn_protocol::*;
use libfuzzer_sys::fuzz_target;

const KINDS: [Kind; 8] = [
    Kind::Hello,
    Kind::Welcome,
    Kind::Batch,
    Kind::Ack,
    Kind::Redirect,
    Kind::Error,
    Kind::Ping,
    Kind::Pong,
];

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::new_checked(data) {
        if let Ok(header) = FrameHeader::parse(&frame) {
            assert!(header.body_len() + TAG_LEN + HEADER_LEN <= data.len());
        }
    }
    if let Some(header) = data.get(..HEADER_LEN) {
        if let Ok(len) = read_frame_len(header.try_into().unwrap()) {
            assert!((HEADER_LEN + TAG_LEN..=MAX_FRAME).contains(&len));
        }
    }
    let _ = GatewaySession::peek_hello(data);
    for kind in KINDS {
        if let Ok(msg) = Message::decode_body(kind, data) {
            let mut once = [0u8; 2048];
            let n = msg
                .encode_body(&mut once)
                .expect("a decoded body re-encodes");
            assert!(n <= data.len(), "{kind}: canonical form is never longer");
            let again = Message::decode_body(kind, &once[..n]).expect("canonical form decodes");
            let mut twice = [0u8; 2048];
            let m = again.encode_body(&mut twice).unwrap();
            assert_eq!(&once[..n], &twice[..m], "{kind}");
            if let Message::Batch(batch) = msg {
                for record in batch.records() {
                    let record = record.expect("parse validated every record");
                    assert_eq!(record.values().count(), record.value_count());
                }
            }
        }
    }
});
