//! Every way a frame or body can be wrong produces its own error: tampered, replayed,
//! reordered, truncated, oversized, unknown kind, unexpected, malformed.

use cairn_protocol::*;

const KEY: [u8; KEY_LEN] = [0x42; KEY_LEN];
const BOOT: u32 = 1234;

struct Pair {
    dev: DeviceSession,
    gw: GatewaySession,
    hello_counter: u32,
}

fn connect(first_counter: u32) -> Pair {
    let mut dev = DeviceSession::new(&KEY, BOOT, first_counter);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    let gw = GatewaySession::accept_salted(&KEY, &buf[..n], [9; SALT_LEN]).unwrap();
    Pair {
        dev,
        gw,
        hello_counter: first_counter,
    }
}

fn ping(dev: &mut DeviceSession, nonce: u32) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Ping(Ping { nonce }), &mut buf)
        .unwrap();
    buf[..n].to_vec()
}

#[test]
fn tampered_device_frame_every_byte() {
    let Pair { mut dev, gw, .. } = connect(10);
    let frame = ping(&mut dev, 0xdead_beef);
    for i in 0..frame.len() {
        let mut t = frame.clone();
        t[i] ^= 0x01;
        let expected = match i {
            0 | 1 => FrameError::BadMagic,
            2 => FrameError::UnsupportedVersion,
            5 => FrameError::Truncated, // length + 256 runs past the buffer
            6 | 7 => FrameError::Malformed, // UNSEALED on a Ping; reserved byte
            _ => FrameError::BadAuth,   // kind, length, counter (AAD), body, tag
        };
        let mut gw = gw.clone();
        assert_eq!(gw.decode(&mut t), Err(expected), "byte {i}");
    }
    // The untouched frame still opens.
    let mut gw = gw;
    let mut f = frame;
    assert_eq!(
        gw.decode(&mut f),
        Ok(Message::Ping(Ping { nonce: 0xdead_beef }))
    );
}

#[test]
fn tampered_gateway_frames() {
    let Pair {
        mut dev, mut gw, ..
    } = connect(0);
    let mut buf = [0u8; 128];
    let welcome = Message::Welcome(Welcome {
        high_water: 5,
        leader: None,
        credit: 3,
    });
    let n = gw.encode(&welcome, &mut buf).unwrap();
    // Flip the salt, the ciphertext and the tag of the salted reply 0: each is BadAuth.
    for i in HEADER_LEN..n {
        let mut t = buf[..n].to_vec();
        t[i] ^= 0x80;
        assert_eq!(
            dev.clone().decode(&mut t),
            Err(FrameError::BadAuth),
            "byte {i}"
        );
    }
    // Stripping the SALTED flag is BadAuth too (header is associated data).
    let mut t = buf[..n].to_vec();
    t[6] = 0;
    assert_eq!(dev.clone().decode(&mut t), Err(FrameError::BadAuth));
    assert_eq!(dev.decode(&mut buf[..n]), Ok(welcome));
}

#[test]
fn replayed_frames() {
    let Pair {
        mut dev, mut gw, ..
    } = connect(0);
    let f1 = ping(&mut dev, 1);
    assert!(gw.decode(&mut f1.clone()).is_ok());
    assert_eq!(gw.decode(&mut f1.clone()), Err(FrameError::Replay));

    // The Hello itself, replayed on the same connection.
    let mut dev2 = DeviceSession::new(&KEY, BOOT, 50);
    let mut hello = [0u8; 64];
    let n = dev2
        .encode(&Message::Hello(dev2.hello(77, 1, 10)), &mut hello)
        .unwrap();
    let mut gw2 = GatewaySession::accept(&KEY, &hello[..n]).unwrap();
    assert_eq!(gw2.decode(&mut hello[..n]), Err(FrameError::Replay));

    // A frame of an earlier connection replayed into a new one of the same boot.
    let old = ping(&mut dev, 2);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    let mut gw = GatewaySession::accept_salted(&KEY, &buf[..n], [1; SALT_LEN]).unwrap();
    assert_eq!(gw.decode(&mut old.clone()), Err(FrameError::Replay));

    // Gateway replies replayed to the device.
    let mut reply = [0u8; 64];
    let n = gw
        .encode(&Message::Pong(Pong { nonce: 2 }), &mut reply)
        .unwrap();
    let mut copy = reply;
    assert!(dev.decode(&mut reply[..n]).is_ok());
    assert_eq!(dev.decode(&mut copy[..n]), Err(FrameError::Replay));
}

#[test]
fn reordered_frames() {
    let Pair {
        mut dev, mut gw, ..
    } = connect(0);
    let f1 = ping(&mut dev, 1);
    let f2 = ping(&mut dev, 2);
    assert_eq!(gw.decode(&mut f2.clone()), Err(FrameError::Reordered));
    assert!(gw.decode(&mut f1.clone()).is_ok());
    assert!(gw.decode(&mut f2.clone()).is_ok());

    let mut r0 = [0u8; 64];
    let mut r1 = [0u8; 64];
    let n0 = gw
        .encode(&Message::Pong(Pong { nonce: 1 }), &mut r0)
        .unwrap();
    let n1 = gw
        .encode(&Message::Pong(Pong { nonce: 2 }), &mut r1)
        .unwrap();
    // Reply 1 before reply 0: the device does not know the salt yet, so it cannot open it.
    assert_eq!(dev.clone().decode(&mut r1[..n1]), Err(FrameError::BadAuth));
    assert!(dev.decode(&mut r0[..n0]).is_ok());
    let n2 = gw
        .encode(&Message::Pong(Pong { nonce: 3 }), &mut r0)
        .unwrap();
    let mut early = r0;
    assert_eq!(
        dev.clone().decode(&mut early[..n2]),
        Err(FrameError::Reordered)
    );
    assert!(dev.decode(&mut r1[..n1]).is_ok());
    assert!(dev.decode(&mut r0[..n2]).is_ok());
}

#[test]
fn truncated_frames() {
    let Pair { mut dev, gw, .. } = connect(0);
    let frame = ping(&mut dev, 1);
    for n in 0..frame.len() {
        let mut t = frame[..n].to_vec();
        assert_eq!(gw.clone().decode(&mut t), Err(FrameError::Truncated), "{n}");
        assert_eq!(
            GatewaySession::peek_hello(&t).unwrap_err(),
            FrameError::Truncated
        );
    }
}

#[test]
fn oversized_frames() {
    let Pair { mut dev, gw, .. } = connect(0);
    let mut frame = ping(&mut dev, 1);
    frame[4..6].copy_from_slice(&((MAX_FRAME - HEADER_LEN + 1) as u16).to_le_bytes());
    frame.resize(MAX_FRAME + 1, 0);
    assert_eq!(gw.clone().decode(&mut frame), Err(FrameError::TooLarge));
    assert_eq!(
        read_frame_len(frame[..HEADER_LEN].try_into().unwrap()),
        Err(FrameError::TooLarge)
    );
    assert_eq!(FrameError::TooLarge.code(), ErrorCode::TooLarge);

    // Encoding a batch body longer than MAX_BODY is refused, whatever the buffer size.
    let mut body = vec![0x01, 0xff, 0x01, 0x00]; // first_seq 1, count 255, sent 0
    for _ in 0..255 {
        body.extend_from_slice(&[0x01, 0x00, 0x01, 0x05, 0x02, 0xaa, 0xbb]);
    }
    assert!(body.len() > MAX_BODY);
    let view = BatchView::parse(&body).unwrap();
    let mut out = vec![0u8; 4096];
    assert_eq!(
        dev.encode(&Message::Batch(view), &mut out),
        Err(EncodeError::TooLarge)
    );
    assert_eq!(
        dev.encode(&Message::Batch(view), &mut out[..100]),
        Err(EncodeError::Full)
    );
}

#[test]
fn unknown_kinds() {
    let Pair { mut dev, gw, .. } = connect(0);
    let frame = ping(&mut dev, 1);
    for kind in [0u8, 9, 0x7f, 0xff] {
        let mut t = frame.clone();
        t[3] = kind;
        assert_eq!(gw.clone().decode(&mut t), Err(FrameError::UnknownKind));
        assert_eq!(dev.clone().decode(&mut t), Err(FrameError::UnknownKind));
        assert_eq!(GatewaySession::peek_hello(&t), Err(FrameError::UnknownKind));
    }
    assert_eq!(FrameError::UnknownKind.code(), ErrorCode::Malformed);
}

#[test]
fn unexpected_frames() {
    // A gateway frame before the device said Hello.
    let mut fresh = DeviceSession::new(&KEY, BOOT, 0);
    let Pair {
        mut dev, mut gw, ..
    } = connect(0);
    let mut buf = [0u8; 64];
    let n = gw
        .encode(&Message::Pong(Pong { nonce: 1 }), &mut buf)
        .unwrap();
    assert_eq!(fresh.decode(&mut buf[..n]), Err(FrameError::Unexpected));
    // A second Hello on a connection (authentic, next counter).
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    assert_eq!(gw.decode(&mut buf[..n]), Err(FrameError::Unexpected));
    // A first frame that is not a Hello.
    let f = ping(&mut dev, 3);
    assert_eq!(
        GatewaySession::accept(&KEY, &f).err(),
        Some(FrameError::Unexpected)
    );
}

#[test]
fn malformed_body_after_auth() {
    let Pair {
        mut dev,
        hello_counter,
        ..
    } = connect(3);
    // An unsalted gateway reply 0 whose Ack body is a truncated varint, sealed correctly.
    let mut frame = [0u8; 64];
    let body = [0xff, 0xff];
    FrameHeader {
        kind: Kind::Ack,
        length: (body.len() + TAG_LEN) as u16,
        flags: 0,
        counter: 0,
    }
    .emit(&mut Frame::new_unchecked(&mut frame[..]));
    frame[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&body);
    let n = seal(
        &KEY,
        BOOT,
        Direction::GatewayToDevice,
        u64::from(hello_counter) << 24,
        &mut frame,
    )
    .unwrap();
    assert_eq!(dev.decode(&mut frame[..n]), Err(FrameError::Malformed));
}

#[test]
fn bad_hello() {
    let mut dev = DeviceSession::new(&KEY, BOOT, 0);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    // Wrong key, tampered device id (clear text, but authenticated).
    assert_eq!(
        GatewaySession::accept(&[0; KEY_LEN], &buf[..n]).err(),
        Some(FrameError::BadAuth)
    );
    let mut t = buf;
    t[HEADER_LEN] ^= 0x01;
    assert_eq!(GatewaySession::peek_hello(&t[..n]).unwrap().device_id, 76);
    assert_eq!(
        GatewaySession::accept(&KEY, &t[..n]).err(),
        Some(FrameError::BadAuth)
    );
    // An authentic Hello with another protocol version.
    let mut frame = [0u8; 64];
    let hello = Hello {
        protocol_version: 2,
        ..dev.hello(77, 1, 10)
    };
    let mut body = [0u8; 32];
    let blen = Message::Hello(hello).encode_body(&mut body).unwrap();
    FrameHeader {
        kind: Kind::Hello,
        length: (blen + TAG_LEN) as u16,
        flags: 0,
        counter: 9,
    }
    .emit(&mut Frame::new_unchecked(&mut frame[..]));
    frame[HEADER_LEN..HEADER_LEN + blen].copy_from_slice(&body[..blen]);
    let n = seal(&KEY, BOOT, Direction::DeviceToGateway, 9, &mut frame).unwrap();
    assert_eq!(
        GatewaySession::accept(&KEY, &frame[..n]).err(),
        Some(FrameError::UnsupportedVersion)
    );
}

#[test]
fn batch_body_errors() {
    use DecodeError::*;
    let cases: &[(&[u8], DecodeError)] = &[
        (&[], Truncated),
        (&[0x00, 0x01, 0x00, 0x01, 0x00, 0x00], Malformed), // first_seq 0
        (&[0x01, 0x00, 0x00], Malformed),                   // count 0
        (&[0x01, 0x02, 0x00, 0x01, 0x00, 0x00], Truncated), // one record of two
        (&[0x01, 0x01, 0x00, 0x01, 0x01, 0x00], Malformed), // delta 1 > sent 0
        (&[0x01, 0x01, 0x05, 0x01, 0x00, 0x09], TooManyValues),
        (&[0x01, 0x01, 0x05, 0x01, 0x00, 0x01, 0x07], Malformed), // value tag 7
        (&[0x01, 0x01, 0x05, 0x01, 0x00, 0x01, 0x00, 0x02], Malformed), // bool 2
        (
            &[0x01, 0x01, 0x05, 0x01, 0x00, 0x01, 0x06, 0x01, 0xff],
            Malformed,
        ), // bad UTF-8
        (&[0x01, 0x01, 0x05, 0x01, 0x00, 0x00, 0x00], TrailingBytes),
        (
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02, 0x00,
            ],
            Malformed,
        ), // first_seq u64::MAX, count 2: seq overflow
    ];
    for (body, expected) in cases {
        assert_eq!(BatchView::parse(body), Err(*expected), "{body:02x?}");
    }
    let mut blob = vec![0x01, 0x01, 0x00, 0x01, 0x00, 0x01, 0x05, 65];
    blob.extend_from_slice(&[0; 65]);
    assert_eq!(BatchView::parse(&blob), Err(BlobTooLarge));
    blob[7] = 64;
    blob.pop();
    assert!(BatchView::parse(&blob).is_ok());
}

#[test]
fn message_body_errors() {
    assert_eq!(
        Message::decode_body(Kind::Ping, &[0x01, 0x02]),
        Err(DecodeError::TrailingBytes)
    );
    assert_eq!(
        Message::decode_body(Kind::Ack, &[0x01]),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        Message::decode_body(Kind::Welcome, &[0x01, 0x02, 0x00]),
        Err(DecodeError::Malformed)
    ); // Option tag 2
    assert_eq!(
        Message::decode_body(Kind::Error, &[0x63]),
        Ok(Message::Error(Error {
            code: ErrorCode::Unknown(0x63)
        }))
    );
}

#[test]
fn batch_encode_errors() {
    let mut buf = [0u8; MAX_FRAME];
    let v9 = [Value::Bool(true); 9];
    let big = [0u8; MAX_BLOB + 1];
    let mut enc = BatchEncoder::new(&mut buf, 1, 100);
    let rec = |uptime_ms, values| Record {
        stream: 1,
        uptime_ms,
        values,
    };
    assert_eq!(enc.push(&rec(1, &v9)), Err(EncodeError::TooManyValues));
    let blob = [Value::Bytes(&big)];
    assert_eq!(enc.push(&rec(1, &blob)), Err(EncodeError::TooLarge));
    assert_eq!(enc.push(&rec(101, &[])), Err(EncodeError::UptimeAfterSend));
    assert!(enc.is_empty());
    assert_eq!(enc.finish(), Err(EncodeError::Empty));

    let mut buf = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut buf, 0, 100);
    assert_eq!(enc.push(&rec(1, &[])), Err(EncodeError::Invalid));

    // A small buffer: Full, and the records pushed so far survive intact.
    let mut small = [0u8; BATCH_HEADER_MAX + 10];
    let mut enc = BatchEncoder::new(&mut small, 5, 100);
    let vals = [Value::U64(1)];
    enc.push(&rec(99, &vals)).unwrap();
    enc.push(&rec(99, &vals)).unwrap();
    assert_eq!(enc.push(&rec(99, &vals)), Err(EncodeError::Full));
    assert_eq!(enc.next_seq(), 7);
    let view = enc.finish().unwrap();
    assert_eq!(view.records().count(), 2);
    assert_eq!(view.header().last_seq(), 6);
}

#[test]
fn unsealed_error_rules() {
    let Pair { mut dev, gw, .. } = connect(0);
    let mut buf = [0u8; 64];
    let n = encode_unsealed_error(ErrorCode::Overloaded, &mut buf).unwrap();
    // Gateways never accept unsealed frames.
    assert_eq!(gw.clone().decode(&mut buf[..n]), Err(FrameError::Malformed));
    // Only Error may be unsealed.
    let mut t = buf;
    t[3] = Kind::Ack as u8;
    assert_eq!(dev.decode(&mut t[..n]), Err(FrameError::Malformed));
    assert_eq!(
        dev.decode(&mut buf[..n]),
        Ok(Message::Error(Error {
            code: ErrorCode::Overloaded
        }))
    );
}
