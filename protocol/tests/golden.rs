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
const HELLO_COUNTER: u32 = 5;
const SALT: [u8; SALT_LEN] = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];

// §4 frame header (of the Ping frame in §10.2)
const HEADER: &[u8] = &[
    0x43, 0x52, 0x01, 0x07, 0x15, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00,
];
// §5.2 nonces
const NONCE_DEVICE: &[u8] = &[
    0x07, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
const NONCE_GATEWAY: &[u8] = &[
    0x07, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
];
const NONCE_SALTED: &[u8] = &[
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0x07, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
    0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
// §7.1
const HELLO: &[u8] = &[0x82, 0x02, 0x07, 0x82, 0x80, 0x04, 0x01, 0x32];
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
    0x43, 0x52, 0x01, 0x01, 0x18, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x82, 0x02, 0x07, 0x82,
    0x80, 0x04, 0x01, 0x32, 0x31, 0x7b, 0x4d, 0x77, 0x73, 0x7c, 0x8d, 0x4e, 0xd4, 0x85, 0xd8, 0xd0,
    0xf1, 0x18, 0x71, 0xf4,
];
const PING_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x07, 0x15, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x2e, 0x1d, 0x73, 0x16,
    0x14, 0xb4, 0x4b, 0xe5, 0xe1, 0xda, 0xeb, 0x45, 0x80, 0x15, 0x3f, 0x9f, 0xc0, 0x63, 0x02, 0xb9,
    0x0c,
];
const ACK_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x04, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4e, 0x0b, 0xdf, 0xb3,
    0xf4, 0x62, 0x71, 0x61, 0x82, 0x0a, 0xff, 0xd9, 0x4e, 0x64, 0x9f, 0x11, 0x9a, 0x41, 0xad,
];
const SALTED_WELCOME_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x02, 0x1c, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0xa1, 0xa2, 0xa3,
    0xa4, 0xa5, 0xa6, 0xa7, 0x94, 0x5c, 0xba, 0x83, 0x06, 0x0f, 0xb2, 0xf3, 0xde, 0xed, 0x30, 0xe5,
    0x22, 0x84, 0x51, 0x4f, 0x54, 0x2b, 0xde, 0x06,
];
const SALTED_ACK_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x04, 0x13, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xba, 0xaa, 0xd8, 0xe3,
    0xf4, 0xca, 0x59, 0x54, 0x64, 0x9f, 0x99, 0x12, 0x9c, 0x94, 0xa2, 0xe6, 0xed, 0x45, 0xbc,
];
const UNSEALED_ERROR_FRAME: &[u8] = &[
    0x43, 0x52, 0x01, 0x06, 0x11, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

const ALL: &[&[u8]] = &[
    HEADER,
    NONCE_DEVICE,
    NONCE_GATEWAY,
    NONCE_SALTED,
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
    PING_FRAME,
    ACK_FRAME,
    SALTED_WELCOME_FRAME,
    SALTED_ACK_FRAME,
    UNSEALED_ERROR_FRAME,
];

fn hello() -> Hello {
    Hello {
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
        counter: 6,
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
fn spec_5_nonces() {
    assert_eq!(nonce(BOOT, Direction::DeviceToGateway, 6), NONCE_DEVICE);
    assert_eq!(
        nonce(
            BOOT,
            Direction::GatewayToDevice,
            u64::from(HELLO_COUNTER) << 24
        ),
        NONCE_GATEWAY
    );
    assert_eq!(salted_nonce(&SALT, BOOT, HELLO_COUNTER, 1), NONCE_SALTED);
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

/// The §10 conversation: Hello, Ping from the device; Ack from an unsalted gateway;
/// Welcome, Ack from a salted gateway; an unsealed Error.
#[test]
fn spec_10_frames() {
    let mut dev = DeviceSession::new(&KEY, BOOT, HELLO_COUNTER);
    let mut buf = [0u8; MAX_FRAME];
    let n = dev.encode(&Message::Hello(hello()), &mut buf).unwrap();
    assert_eq!(&buf[..n], HELLO_FRAME);
    assert_eq!(GatewaySession::peek_hello(HELLO_FRAME), Ok(hello()));
    let mut gw = GatewaySession::accept(&KEY, HELLO_FRAME).unwrap();
    let mut salted = GatewaySession::accept_salted(&KEY, HELLO_FRAME, SALT).unwrap();

    let ping = Message::Ping(Ping { nonce: 0xdead_beef });
    let n = dev.encode(&ping, &mut buf).unwrap();
    assert_eq!(&buf[..n], PING_FRAME);
    assert_eq!(gw.decode(&mut buf[..n]), Ok(ping));

    let n = gw.encode(&Message::Ack(ack()), &mut buf).unwrap();
    assert_eq!(&buf[..n], ACK_FRAME);
    assert_eq!(dev.decode(&mut buf[..n]), Ok(Message::Ack(ack())));

    let welcome = Message::Welcome(Welcome {
        high_water: 300,
        leader: None,
        credit: 64,
    });
    let n = salted.encode(&welcome, &mut buf).unwrap();
    assert_eq!(&buf[..n], SALTED_WELCOME_FRAME);
    let n = salted.encode(&Message::Ack(ack()), &mut buf).unwrap();
    assert_eq!(&buf[..n], SALTED_ACK_FRAME);
    // A device on a fresh connection with the same Hello reads the salted pair.
    let mut dev = DeviceSession::new(&KEY, BOOT, HELLO_COUNTER);
    dev.encode(&Message::Hello(hello()), &mut buf).unwrap();
    let mut f = SALTED_WELCOME_FRAME.to_vec();
    assert_eq!(dev.decode(&mut f), Ok(welcome));
    let mut f = SALTED_ACK_FRAME.to_vec();
    assert_eq!(dev.decode(&mut f), Ok(Message::Ack(ack())));

    let n = encode_unsealed_error(ErrorCode::UnknownDevice, &mut buf).unwrap();
    assert_eq!(&buf[..n], UNSEALED_ERROR_FRAME);
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
