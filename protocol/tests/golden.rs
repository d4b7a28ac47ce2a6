//! Golden bytes: every vector in SPEC.md, asserted byte for byte and round-tripped.
//!
//! SPEC.md marks each vector as a fenced `hex` block; a table whose last column holds
//! backticked bytes must concatenate to the hex block that follows it. `spec_blocks_match`
//! checks that SPEC.md holds exactly the vectors below, so the spec and the code cannot drift.

use cairn_protocol::*;

const SPEC: &str = include_str!("../SPEC.md");

const KEY: [u8; KEY_LEN] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];
const BOOT: u32 = 7;
const BOOT_NONCE: [u8; BOOT_NONCE_LEN] = [
    0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb,
];
const OTHER_BOOT_NONCE: [u8; BOOT_NONCE_LEN] = [
    0xd0, 0xd1, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xdb,
];
/// The device's connection number in the examples.
const CONNECTION: u64 = 5;
const CHALLENGE: [u8; CHALLENGE_LEN] = [
    0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb,
];

// §4 frame header (of the Ping frame in §10.3)
const HEADER: &[u8] = &[
    0x43, 0x52, 0x02, 0x07, 0x15, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
];
// §5.3 keys: root, conn, hello, d2g, g2d; conn of another boot with the same boot number
const ROOT: &[u8] = &[
    0xe3, 0xea, 0x7b, 0xe2, 0x74, 0x49, 0x1e, 0x35, 0xe4, 0x31, 0x11, 0x87, 0x57, 0x50, 0xa1, 0x88,
    0xab, 0xec, 0xda, 0xa9, 0x4f, 0x6d, 0x7b, 0xc7, 0x54, 0x32, 0x34, 0x42, 0xf6, 0xf5, 0x2d, 0x10,
];
const CONN: &[u8] = &[
    0x8f, 0x91, 0xc5, 0x18, 0x98, 0x75, 0xf2, 0xdf, 0x4b, 0x85, 0x8b, 0x6d, 0x22, 0x2c, 0x9d, 0x48,
    0xa8, 0xe9, 0xd5, 0x97, 0xcc, 0x6f, 0x01, 0x67, 0x8f, 0x78, 0x43, 0x9b, 0xe4, 0x22, 0x86, 0xb4,
];
const HELLO_KEY: &[u8] = &[
    0x16, 0x3f, 0x17, 0xe0, 0xd0, 0x6a, 0x9f, 0x02, 0x0d, 0x06, 0x64, 0xa2, 0x22, 0x30, 0x0c, 0x02,
    0xdd, 0x76, 0x20, 0x75, 0xd1, 0xa6, 0x03, 0x72, 0x5f, 0x5b, 0x32, 0x6f, 0x8e, 0xba, 0x90, 0xd6,
];
const D2G: &[u8] = &[
    0x53, 0xd4, 0xba, 0x9c, 0xc1, 0xa8, 0xbe, 0x3b, 0xbe, 0x10, 0x56, 0x96, 0xb0, 0x0c, 0xd6, 0x3c,
    0x7c, 0xcd, 0x02, 0x9b, 0x82, 0xf3, 0xa3, 0x91, 0xbb, 0x31, 0x62, 0x2f, 0xd4, 0x5c, 0x9e, 0x2f,
];
const G2D: &[u8] = &[
    0x88, 0xdf, 0x28, 0x3a, 0x6e, 0x33, 0x3f, 0x7f, 0xcc, 0x48, 0xb9, 0xb8, 0x1a, 0xbf, 0x91, 0xbd,
    0xd4, 0x13, 0x2c, 0x7e, 0x02, 0x2e, 0xd7, 0x10, 0x2e, 0xd1, 0x2b, 0xeb, 0xfa, 0xa2, 0x37, 0x72,
];
const OTHER_CONN: &[u8] = &[
    0xa5, 0x0a, 0x05, 0x3f, 0x6b, 0xf7, 0x9c, 0x5c, 0x91, 0x1a, 0x08, 0x0d, 0x01, 0x4a, 0x21, 0x80,
    0x99, 0x7a, 0xb9, 0x1a, 0x5a, 0x19, 0x8d, 0xa2, 0x2f, 0xa7, 0x59, 0xd1, 0x3a, 0x56, 0xdf, 0x3c,
];
const NONCE_1: &[u8] = &[
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
// §7.1
const HELLO: &[u8] = &[
    0x82, 0x02, 0x07, 0x82, 0x80, 0x04, 0x02, 0x32, 0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7,
    0xb8, 0xb9, 0xba, 0xbb, 0x05, 0x00, 0x00, 0x00,
];
// §7.2
const WELCOME: &[u8] = &[0xac, 0x02, 0x01, 0x0a, 0x00, 0x02, 0x02, 0xa3, 0x1f, 0x40];
const WELCOME_NO_LEADER: &[u8] = &[0x00, 0x00, 0x40];
// §7.3
const BATCH: &[u8] = &[
    0x01, 0x02, 0x90, 0x4e, // header
    0x01, 0xe8, 0x07, 0x03, 0x03, 0x00, 0x00, 0xac, 0x41, 0x03, 0x00, 0x00, 0x21, 0x42, 0x03, 0x00,
    0x40, 0x7d, 0x44, // record seq 1
    0x02, 0xf4, 0x03, 0x06, 0x00, 0x01, 0x01, 0x05, 0x02, 0xac, 0x02, 0x04, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0xf0, 0x3f, 0x05, 0x02, 0xde, 0xad, 0x06, 0x02, 0x6f, 0x6b, // seq 2
];
const VALUES: &[u8] = &[
    0x00, 0x01, 0x01, 0x05, 0x02, 0xac, 0x02, 0x03, 0x00, 0x00, 0xac, 0x41, 0x04, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0xf0, 0x3f, 0x05, 0x02, 0xde, 0xad, 0x06, 0x02, 0x6f, 0x6b,
];
// §7.4
const ACK: &[u8] = &[0x02, 0x40, 0x00];
const ACK_LEADER: &[u8] = &[0x02, 0x40, 0x01, 0xc0, 0xa8, 0x01, 0x0a, 0xa3, 0x1f];
// §7.5
const REDIRECT: &[u8] = &[0xc0, 0xa8, 0x01, 0x0a, 0xa3, 0x1f];
// §7.6: the bodies of Error{code} for codes 1..=11 and an unknown code 200, concatenated
const ERROR_CODES: &[u8] = &[
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xc8,
];
// §7.7 / §7.8
const PING: &[u8] = &[0xef, 0xfd, 0xb6, 0xf5, 0x0d];
// §10 complete frames
const HELLO_FRAME: &[u8] = &[
    0x43, 0x52, 0x02, 0x01, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x82, 0x02, 0x07, 0x82,
    0x80, 0x04, 0x02, 0x32, 0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xbb,
    0x05, 0x00, 0x00, 0x00, 0x3c, 0xf1, 0xb0, 0x29, 0xfb, 0xb1, 0xd4, 0xef, 0xd0, 0x21, 0x6c, 0x84,
    0xe4, 0xb4, 0x55, 0x5a,
];
const WELCOME_FRAME: &[u8] = &[
    0x43, 0x52, 0x02, 0x02, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xc1, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0x87, 0xce, 0xaf, 0x36, 0xd7, 0x8e, 0x08, 0x9b,
    0x85, 0x2e, 0x86, 0x06, 0x95, 0xc7, 0x17, 0x18, 0x97, 0x4e, 0xc3, 0x33,
];
const PING_FRAME: &[u8] = &[
    0x43, 0x52, 0x02, 0x07, 0x15, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x46, 0xf8, 0xe3, 0xef,
    0x31, 0x56, 0x70, 0x60, 0xf6, 0x15, 0x5d, 0x06, 0x29, 0x47, 0x32, 0x50, 0x97, 0x5a, 0xd3, 0x31,
    0xf6,
];
const ACK_FRAME: &[u8] = &[
    0x43, 0x52, 0x02, 0x04, 0x13, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1a, 0x4d, 0x70, 0x26,
    0x1f, 0xee, 0x91, 0xbf, 0xde, 0x60, 0x74, 0x07, 0xae, 0x6d, 0xd6, 0x0d, 0xf2, 0x90, 0x9a,
];
const UNSEALED_ERROR_FRAME: &[u8] = &[
    0x43, 0x52, 0x02, 0x06, 0x11, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
// Appendix A (protocol 1)
const V1_HELLO_COUNTER: u32 = 5;
const V1_SALT: [u8; v1::SALT_LEN] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
const V1_NONCE_DEVICE: &[u8] = &[
    0x07, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
const V1_NONCE_GATEWAY: &[u8] = &[
    0x07, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
];
const V1_NONCE_SALTED: &[u8] = &[
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0x07, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
    0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
const V1_HELLO_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x01, 0x18, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x82, 0x02, 0x07, 0x82,
    0x80, 0x04, 0x01, 0x32, 0x31, 0x7b, 0x4d, 0x77, 0x73, 0x7c, 0x8d, 0x4e, 0xd4, 0x85, 0xd8, 0xd0,
    0xf1, 0x18, 0x71, 0xf4,
];
const V1_PING_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x07, 0x15, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x2e, 0x1d, 0x73, 0x16,
    0x14, 0xb4, 0x4b, 0xe5, 0xe1, 0xda, 0xeb, 0x45, 0x80, 0x15, 0x3f, 0x9f, 0xc0, 0x63, 0x02, 0xb9,
    0x0c,
];
const V1_ACK_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x04, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4e, 0x0b, 0xdf, 0xb3,
    0xf4, 0x62, 0x71, 0x61, 0x82, 0x0a, 0xff, 0xd9, 0x4e, 0x64, 0x9f, 0x11, 0x9a, 0x41, 0xad,
];
const V1_SALTED_WELCOME_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x02, 0x1c, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0xa1, 0xa2, 0xa3,
    0xa4, 0xa5, 0xa6, 0xa7, 0x94, 0x5c, 0xba, 0x83, 0x06, 0x0f, 0xb2, 0xf3, 0xde, 0xed, 0x30, 0xe5,
    0x22, 0x84, 0x51, 0x4f, 0x54, 0x2b, 0xde, 0x06,
];
const V1_SALTED_ACK_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x04, 0x13, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xba, 0xaa, 0xd8, 0xe3,
    0xf4, 0xca, 0x59, 0x54, 0x64, 0x9f, 0x99, 0x12, 0x9c, 0x94, 0xa2, 0xe6, 0xed, 0x45, 0xbc,
];
const V1_UNSEALED_ERROR_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x06, 0x11, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

const ALL: &[&[u8]] = &[
    HEADER,
    ROOT,
    CONN,
    HELLO_KEY,
    D2G,
    G2D,
    OTHER_CONN,
    NONCE_1,
    HELLO,
    WELCOME,
    WELCOME_NO_LEADER,
    BATCH,
    VALUES,
    ACK,
    ACK_LEADER,
    REDIRECT,
    ERROR_CODES,
    PING,
    HELLO_FRAME,
    WELCOME_FRAME,
    PING_FRAME,
    ACK_FRAME,
    UNSEALED_ERROR_FRAME,
    V1_NONCE_DEVICE,
    V1_NONCE_GATEWAY,
    V1_NONCE_SALTED,
    V1_HELLO_FRAME,
    V1_PING_FRAME,
    V1_ACK_FRAME,
    V1_SALTED_WELCOME_FRAME,
    V1_SALTED_ACK_FRAME,
    V1_UNSEALED_ERROR_FRAME,
];

fn device_nonce() -> [u8; DEVICE_NONCE_LEN] {
    let mut n = [0u8; DEVICE_NONCE_LEN];
    n[..BOOT_NONCE_LEN].copy_from_slice(&BOOT_NONCE);
    n[BOOT_NONCE_LEN..].copy_from_slice(&(CONNECTION as u32).to_le_bytes());
    n
}

fn hello() -> Hello {
    Hello {
        device_id: 258,
        boot: BOOT,
        firmware_version: 0x0001_0002,
        protocol_version: 2,
        max_batch: 50,
        nonce: device_nonce(),
    }
}

fn v1_hello() -> v1::Hello {
    v1::Hello {
        device_id: 258,
        boot: BOOT,
        firmware_version: 0x0001_0002,
        protocol_version: 1,
        max_batch: 50,
    }
}

fn welcome() -> Welcome {
    Welcome {
        high_water: 300,
        leader: Some(GatewayAddr::new([10, 0, 2, 2], 4003)),
        credit: 64,
    }
}

fn ack() -> Ack {
    Ack {
        through_seq: 2,
        credit: 64,
        leader: None,
    }
}

const RECORD_1: [Value<'static>; 3] = [Value::F32(21.5), Value::F32(40.25), Value::F32(1013.0)];
const RECORD_2: [Value<'static>; 6] = [
    Value::Bool(true),
    Value::I64(-3),
    Value::U64(300),
    Value::F64(1.0),
    Value::Bytes(&[0xde, 0xad]),
    Value::Str("ok"),
];

/// Encodes the body and checks the bytes, then decodes them back.
fn assert_body(msg: Message<'_>, expected: &[u8]) {
    let mut buf = [0u8; MAX_BODY];
    let n = msg.encode_body(&mut buf).unwrap();
    assert_eq!(&buf[..n], expected, "{msg}");
    assert_eq!(Message::decode_body(msg.kind(), expected), Ok(msg));
}

#[test]
fn spec_4_frame_header() {
    let mut buf = [0u8; HEADER_LEN];
    let header = FrameHeader {
        kind: Kind::Ping,
        length: 21,
        flags: 0,
        counter: 1,
    };
    header.emit(&mut Frame::new_unchecked(&mut buf[..]));
    assert_eq!(&buf[..], HEADER);
    assert_eq!(
        FrameHeader::parse(&Frame::new_checked(PING_FRAME).unwrap()),
        Ok(header)
    );
    assert_eq!(read_frame_len(HEADER.try_into().unwrap()), Ok(33));
}

#[test]
fn spec_5_keys() {
    let root = root_key(&KEY);
    assert_eq!(root, ROOT);
    let conn = connection_key(&root, &device_nonce());
    assert_eq!(conn, CONN);
    assert_eq!(hello_key(&conn), HELLO_KEY);
    let keys = traffic_keys(&conn, &CHALLENGE);
    assert_eq!(keys.device_to_gateway, D2G);
    assert_eq!(keys.gateway_to_device, G2D);
    assert_eq!(nonce(1), NONCE_1);
    // Same boot number, another boot nonce: another connection key.
    let mut other = device_nonce();
    other[..BOOT_NONCE_LEN].copy_from_slice(&OTHER_BOOT_NONCE);
    assert_eq!(connection_key(&root, &other), OTHER_CONN);
    assert_ne!(OTHER_CONN, CONN);
}

/// A device session on its connection number [`CONNECTION`].
fn device(boot_nonce: [u8; BOOT_NONCE_LEN]) -> DeviceSession {
    let mut dev = DeviceSession::new(&KEY, BOOT, boot_nonce);
    let mut buf = [0u8; MAX_FRAME];
    for _ in 0..CONNECTION {
        dev.encode(&Message::Hello(dev.hello(258, 0x0001_0002, 50)), &mut buf)
            .unwrap();
    }
    dev
}

#[test]
fn spec_7_1_hello() {
    assert_body(Message::Hello(hello()), HELLO);
}

#[test]
fn spec_7_2_welcome() {
    assert_body(Message::Welcome(welcome()), WELCOME);
    assert_body(
        Message::Welcome(Welcome {
            high_water: 0,
            leader: None,
            credit: 64,
        }),
        WELCOME_NO_LEADER,
    );
}

#[test]
fn spec_7_3_batch() {
    let mut buf = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut buf, 1, 10_000);
    enc.push(&Record {
        stream: 1,
        uptime_ms: 9_000,
        values: &RECORD_1,
    })
    .unwrap();
    enc.push(&Record {
        stream: 2,
        uptime_ms: 9_500,
        values: &RECORD_2,
    })
    .unwrap();
    let batch = enc.finish().unwrap();
    assert_eq!(batch.as_bytes(), BATCH);

    let view = BatchView::parse(BATCH).unwrap();
    assert_eq!(
        view.header(),
        BatchHeader {
            first_seq: 1,
            count: 2,
            sent_uptime_ms: 10_000
        }
    );
    let records: Vec<_> = view.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0].seq, records[0].stream, records[0].uptime_ms),
        (1, 1, 9_000)
    );
    assert_eq!(
        (records[1].seq, records[1].stream, records[1].uptime_ms),
        (2, 2, 9_500)
    );
    assert!(records[0].values().eq(RECORD_1));
    assert!(records[1].values().eq(RECORD_2));
    assert_body(Message::Batch(view), BATCH);
}

#[test]
fn spec_7_3_values() {
    let all = [
        Value::Bool(true),
        Value::I64(-3),
        Value::U64(300),
        Value::F32(21.5),
        Value::F64(1.0),
        Value::Bytes(&[0xde, 0xad]),
        Value::Str("ok"),
    ];
    let mut out = Vec::new();
    for v in all {
        let mut buf = [0u8; 16];
        let n = postcard::to_slice(&v, &mut buf).unwrap().len();
        assert_eq!(postcard::from_bytes::<Value<'_>>(&buf[..n]).unwrap(), v);
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out, VALUES);
}

#[test]
fn spec_7_4_ack() {
    assert_body(Message::Ack(ack()), ACK);
    assert_body(
        Message::Ack(Ack {
            leader: Some(GatewayAddr::new([192, 168, 1, 10], 4003)),
            ..ack()
        }),
        ACK_LEADER,
    );
}

#[test]
fn spec_7_5_redirect() {
    assert_body(
        Message::Redirect(Redirect {
            addr: GatewayAddr::new([192, 168, 1, 10], 4003),
        }),
        REDIRECT,
    );
}

#[test]
fn spec_7_6_error_codes() {
    let codes = [
        ErrorCode::UnknownDevice,
        ErrorCode::BadAuth,
        ErrorCode::Replay,
        ErrorCode::TooLarge,
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotLeader,
        ErrorCode::Overloaded,
        ErrorCode::SchemaMismatch,
        ErrorCode::SeqGap,
        ErrorCode::Internal,
        ErrorCode::Unknown(200),
    ];
    for (code, byte) in codes.into_iter().zip(ERROR_CODES) {
        assert_body(Message::Error(Error { code }), &[*byte]);
    }
    assert_eq!(codes.len(), ERROR_CODES.len());
}

#[test]
fn spec_7_7_ping_7_8_pong() {
    assert_body(Message::Ping(Ping { nonce: 0xdead_beef }), PING);
    assert_body(Message::Pong(Pong { nonce: 0xdead_beef }), PING);
}

/// The §10 conversation: Hello, Welcome, Ping, Ack, an unsealed Error.
#[test]
fn spec_10_frames() {
    let mut dev = device(BOOT_NONCE);
    let mut buf = [0u8; MAX_FRAME];
    assert_eq!(dev.hello(258, 0x0001_0002, 50), hello());
    let n = dev.encode(&Message::Hello(hello()), &mut buf).unwrap();
    assert_eq!(&buf[..n], HELLO_FRAME);
    assert_eq!(GatewaySession::peek_hello(HELLO_FRAME), Ok(hello()));
    let mut gw = GatewaySession::accept(&KEY, HELLO_FRAME, CHALLENGE).unwrap();

    let welcome = Message::Welcome(Welcome {
        high_water: 300,
        leader: None,
        credit: 64,
    });
    let n = gw.encode(&welcome, &mut buf).unwrap();
    assert_eq!(&buf[..n], WELCOME_FRAME);
    assert_eq!(dev.decode(&mut buf[..n]), Ok(welcome));

    let ping = Message::Ping(Ping { nonce: 0xdead_beef });
    let n = dev.encode(&ping, &mut buf).unwrap();
    assert_eq!(&buf[..n], PING_FRAME);
    assert_eq!(gw.decode(&mut buf[..n]), Ok(ping));

    let n = gw.encode(&Message::Ack(ack()), &mut buf).unwrap();
    assert_eq!(&buf[..n], ACK_FRAME);
    assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Ack(ack())));

    let n = encode_unsealed_error(ErrorCode::UnknownDevice, &mut buf).unwrap();
    assert_eq!(&buf[..n], UNSEALED_ERROR_FRAME);
    assert_eq!(dev.decode(&mut buf[..n]), Err(FrameError::Unsealed));
    assert_eq!(
        unsealed_error_code(&buf[..n]),
        Some(ErrorCode::UnknownDevice)
    );
}

/// A boot with the same boot number and another boot nonce: the recorded Welcome and Ack of
/// §10 do not open (SPEC §5.7), so a rebooted device drops nothing on them.
#[test]
fn spec_10_frames_replayed_to_another_boot() {
    let mut dev = device(OTHER_BOOT_NONCE);
    let mut buf = [0u8; MAX_FRAME];
    dev.encode(&Message::Hello(dev.hello(258, 0x0001_0002, 50)), &mut buf)
        .unwrap();
    assert_eq!(
        dev.decode(&mut WELCOME_FRAME.to_vec()),
        Err(FrameError::BadAuth)
    );
    assert_eq!(
        dev.decode(&mut ACK_FRAME.to_vec()),
        Err(FrameError::BadAuth)
    );
    // And the device's recorded Ping is refused by a gateway answering the recorded Hello.
    let mut gw = GatewaySession::accept(&KEY, HELLO_FRAME, [0x11; CHALLENGE_LEN]).unwrap();
    assert_eq!(
        gw.decode(&mut PING_FRAME.to_vec()),
        Err(FrameError::BadAuth)
    );
}

/// Appendix A: protocol 1, as a gateway in a migration period speaks it.
#[test]
fn spec_appendix_a_protocol_1() {
    use v1::Direction;
    assert_eq!(
        v1::nonce(BOOT, Direction::DeviceToGateway, 6),
        V1_NONCE_DEVICE
    );
    assert_eq!(
        v1::nonce(
            BOOT,
            Direction::GatewayToDevice,
            u64::from(V1_HELLO_COUNTER) << 24
        ),
        V1_NONCE_GATEWAY
    );
    assert_eq!(
        v1::salted_nonce(&V1_SALT, BOOT, V1_HELLO_COUNTER, 1),
        V1_NONCE_SALTED
    );
    let mut dev = v1::DeviceSession::new(&KEY, BOOT, V1_HELLO_COUNTER);
    let mut buf = [0u8; MAX_FRAME];
    assert_eq!(dev.hello(258, 0x0001_0002, 50), v1_hello());
    let n = dev.encode_hello(&v1_hello(), &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_HELLO_FRAME);
    assert_eq!(
        v1::GatewaySession::peek_hello(V1_HELLO_FRAME),
        Ok(v1_hello())
    );
    // A protocol 2 gateway session refuses it.
    assert_eq!(
        GatewaySession::peek_hello(V1_HELLO_FRAME),
        Err(FrameError::UnsupportedVersion)
    );
    let mut gw = v1::GatewaySession::accept(&KEY, V1_HELLO_FRAME).unwrap();
    let mut salted = v1::GatewaySession::accept_salted(&KEY, V1_HELLO_FRAME, V1_SALT).unwrap();

    let ping = Message::Ping(Ping { nonce: 0xdead_beef });
    let n = dev.encode(&ping, &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_PING_FRAME);
    assert_eq!(gw.decode(&mut buf[..n]), Ok(ping));

    let n = gw.encode(&Message::Ack(ack()), &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_ACK_FRAME);
    assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Ack(ack())));

    let welcome = Message::Welcome(Welcome {
        high_water: 300,
        leader: None,
        credit: 64,
    });
    let n = salted.encode(&welcome, &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_SALTED_WELCOME_FRAME);
    let n = salted.encode(&Message::Ack(ack()), &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_SALTED_ACK_FRAME);
    let mut dev = v1::DeviceSession::new(&KEY, BOOT, V1_HELLO_COUNTER);
    dev.encode_hello(&v1_hello(), &mut buf).unwrap();
    assert_eq!(
        dev.decode(&mut V1_SALTED_WELCOME_FRAME.to_vec()),
        Ok(welcome)
    );
    assert_eq!(
        dev.decode(&mut V1_SALTED_ACK_FRAME.to_vec()),
        Ok(Message::Ack(ack()))
    );

    let n = encode_unsealed_error_version(ErrorCode::UnknownDevice, v1::VERSION, &mut buf).unwrap();
    assert_eq!(&buf[..n], V1_UNSEALED_ERROR_FRAME);
    assert_eq!(
        dev.decode(&mut buf[..n]),
        Ok(Message::Error(Error {
            code: ErrorCode::UnknownDevice
        }))
    );
}

/// Splits SPEC.md into its `hex` blocks and the byte tables before them.
fn spec_blocks() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    fn parse_hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex {b:?}")))
            .collect()
    }
    let mut blocks = Vec::new();
    let mut table: Option<Vec<u8>> = None;
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line == "```hex" {
            let mut hex = String::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                hex.push_str(l);
                hex.push(' ');
            }
            blocks.push((parse_hex(&hex), table.take()));
        } else if line.starts_with('|') {
            // A table row whose last cell is `hex bytes` contributes them.
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if let Some(last) = cells.last()
                && last.len() > 2
                && last.starts_with('`')
                && last.ends_with('`')
                && last[1..last.len() - 1]
                    .split_whitespace()
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
            {
                table
                    .get_or_insert_with(Vec::new)
                    .extend(parse_hex(&last[1..last.len() - 1]));
            }
        }
    }
    assert!(
        table.is_none(),
        "a byte table at the end of SPEC.md has no hex block"
    );
    blocks
}

#[test]
fn spec_blocks_match() {
    let blocks = spec_blocks();
    for (i, (block, table)) in blocks.iter().enumerate() {
        assert!(
            ALL.contains(&block.as_slice()),
            "SPEC.md hex block #{i} is not a golden vector: {block:02x?}"
        );
        if let Some(table) = table {
            assert_eq!(table, block, "SPEC.md byte table before hex block #{i}");
        }
    }
    for v in ALL {
        assert!(
            blocks.iter().any(|(b, _)| b == v),
            "golden vector missing from SPEC.md: {v:02x?}"
        );
    }
}
