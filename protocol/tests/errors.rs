//! Every way a frame or body can be wrong produces its own error: tampered, replayed,
//! reordered, truncated, oversized, unknown kind, unexpected, malformed.

use cairn_protocol::*;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};

const KEY: [u8; KEY_LEN] = [0x42; KEY_LEN];
const BOOT: u32 = 1234;
const CHALLENGE: [u8; CHALLENGE_LEN] = [9; CHALLENGE_LEN];

/// A device and a gateway after the Hello, before the gateway's first frame.
fn hello_only(boot_nonce: u8) -> (DeviceSession, GatewaySession, Vec<u8>) {
    let mut dev = DeviceSession::new(&KEY, BOOT, [boot_nonce; BOOT_NONCE_LEN]);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    let gw = GatewaySession::accept(&KEY, &buf[..n], CHALLENGE).unwrap();
    (dev, gw, buf[..n].to_vec())
}

/// A device and a gateway after the Welcome (gateway frame 0).
fn connect() -> (DeviceSession, GatewaySession) {
    let (mut dev, mut gw, _) = hello_only(1);
    let mut buf = [0u8; 64];
    let welcome = Message::Welcome(Welcome {
        high_water: 0,
        leader: None,
        credit: 3,
    });
    let n = gw.encode(&welcome, &mut buf).unwrap();
    assert_eq!(dev.decode(&mut buf[..n]), Ok(welcome));
    (dev, gw)
}

fn ping(dev: &mut DeviceSession, nonce: u32) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Ping(Ping { nonce }), &mut buf)
        .unwrap();
    buf[..n].to_vec()
}

/// Seals any bytes as a version 2 frame: `prefix` in the clear (associated data), `body`
/// encrypted (or, for a Hello, authenticated only), under `key` and nonce `counter`.
fn seal_raw(key: &[u8; KEY_LEN], kind: Kind, counter: u32, prefix: &[u8], body: &[u8]) -> Vec<u8> {
    seal_as(key, kind, counter, prefix, body, kind == Kind::Hello)
}

/// [`seal_raw`], choosing whether the body is encrypted or only authenticated.
fn seal_as(
    key: &[u8; KEY_LEN],
    kind: Kind,
    counter: u32,
    prefix: &[u8],
    body: &[u8],
    hello: bool,
) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN];
    FrameHeader {
        kind,
        length: (prefix.len() + body.len() + TAG_LEN) as u16,
        flags: 0,
        counter,
    }
    .emit(&mut Frame::new_unchecked(&mut f[..]));
    f.extend_from_slice(prefix);
    let mut data = body.to_vec();
    let aead = ChaCha20Poly1305::new(key.into());
    let tag = if hello {
        f.extend_from_slice(body);
        aead.encrypt_in_place_detached(&nonce(counter).into(), &f, &mut [])
    } else {
        aead.encrypt_in_place_detached(&nonce(counter).into(), &f, &mut data)
    }
    .unwrap();
    if !hello {
        f.extend_from_slice(&data);
    }
    f.extend_from_slice(&tag);
    f
}

fn keys_of(hello: &[u8]) -> (TrafficKeys, [u8; KEY_LEN]) {
    let h = GatewaySession::peek_hello(hello).unwrap();
    let conn = connection_key(&root_key(&KEY), &h.nonce);
    (traffic_keys(&conn, &CHALLENGE), hello_key(&conn))
}

#[test]
fn tampered_device_frame_every_byte() {
    let (mut dev, gw) = connect();
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
    let (mut dev, mut gw, _) = hello_only(2);
    let mut buf = [0u8; 128];
    let welcome = Message::Welcome(Welcome {
        high_water: 5,
        leader: None,
        credit: 3,
    });
    let n = gw.encode(&welcome, &mut buf).unwrap();
    // Flip the header, the challenge, the ciphertext and the tag of frame 0: BadAuth (or a
    // header error), and the device stays where it was.
    for i in 3..n {
        let mut t = buf[..n].to_vec();
        t[i] ^= 0x80;
        let got = dev.clone().decode(&mut t);
        match i {
            3 => assert_eq!(got, Err(FrameError::UnknownKind), "byte {i}"),
            4 => assert_eq!(got, Err(FrameError::Truncated), "byte {i}"),
            5 => assert_eq!(got, Err(FrameError::TooLarge), "byte {i}"),
            6 | 7 => assert_eq!(got, Err(FrameError::Malformed), "byte {i}"),
            _ => assert_eq!(got, Err(FrameError::BadAuth), "byte {i}"),
        }
    }
    assert!(!dev.is_open());
    assert_eq!(dev.decode(&mut buf[..n]), Ok(welcome));
}

#[test]
fn replayed_frames() {
    let (mut dev, mut gw) = connect();
    let f1 = ping(&mut dev, 1);
    assert!(gw.decode(&mut f1.clone()).is_ok());
    assert_eq!(gw.decode(&mut f1.clone()), Err(FrameError::Replay));

    // The Hello itself, replayed on its connection: not under the traffic key.
    let (_, mut gw2, hello) = hello_only(3);
    assert_eq!(gw2.decode(&mut hello.clone()), Err(FrameError::BadAuth));

    // A frame of an earlier connection replayed into a new one of the same boot.
    let old = ping(&mut dev, 2);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(77, 1, 10)), &mut buf)
        .unwrap();
    let mut gw = GatewaySession::accept(&KEY, &buf[..n], CHALLENGE).unwrap();
    assert_eq!(gw.decode(&mut old.clone()), Err(FrameError::BadAuth));

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
    let (mut dev, mut gw, _) = hello_only(4);
    let mut r0 = [0u8; 64];
    let mut r1 = [0u8; 64];
    let n0 = gw
        .encode(&Message::Pong(Pong { nonce: 1 }), &mut r0)
        .unwrap();
    let n1 = gw
        .encode(&Message::Pong(Pong { nonce: 2 }), &mut r1)
        .unwrap();
    // Frame 1 before frame 0: the device has no key for it yet.
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

    let f1 = ping(&mut dev, 1);
    let f2 = ping(&mut dev, 2);
    assert_eq!(gw.decode(&mut f2.clone()), Err(FrameError::Reordered));
    assert!(gw.decode(&mut f1.clone()).is_ok());
    assert!(gw.decode(&mut f2.clone()).is_ok());
}

#[test]
fn truncated_frames() {
    let (mut dev, gw) = connect();
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
    let (mut dev, gw) = connect();
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
    let (mut dev, gw) = connect();
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
    let mut fresh = DeviceSession::new(&KEY, BOOT, [0; BOOT_NONCE_LEN]);
    let (mut dev, mut gw, hello) = hello_only(5);
    let mut buf = [0u8; 64];
    let n = gw
        .encode(&Message::Pong(Pong { nonce: 1 }), &mut buf)
        .unwrap();
    assert_eq!(fresh.decode(&mut buf[..n]), Err(FrameError::Unexpected));
    assert!(dev.decode(&mut buf[..n]).is_ok());
    // A Hello sealed as the next device frame of the connection (authentic, next counter).
    let (keys, _) = keys_of(&hello);
    let mut body = [0u8; 64];
    let blen = Message::Hello(dev.hello(77, 1, 10))
        .encode_body(&mut body)
        .unwrap();
    let mut f = seal_raw(&keys.device_to_gateway, Kind::Hello, 1, &[], &body[..blen]);
    assert_eq!(gw.decode(&mut f), Err(FrameError::Unexpected));
    // A Hello sent to the device, as gateway frame 1.
    let mut f = seal_as(
        &keys.gateway_to_device,
        Kind::Hello,
        1,
        &[],
        &body[..blen],
        false,
    );
    assert_eq!(dev.decode(&mut f), Err(FrameError::Unexpected));
    // A first frame that is not a Hello.
    let f = ping(&mut dev, 3);
    assert_eq!(
        GatewaySession::accept(&KEY, &f, CHALLENGE).err(),
        Some(FrameError::Unexpected)
    );
}

#[test]
fn malformed_body_after_auth() {
    let (mut dev, _, hello) = hello_only(6);
    // Gateway frame 0 whose Ack body is a truncated varint, sealed correctly.
    let (keys, _) = keys_of(&hello);
    let mut f = seal_raw(
        &keys.gateway_to_device,
        Kind::Ack,
        0,
        &CHALLENGE,
        &[0xff, 0xff],
    );
    assert_eq!(dev.decode(&mut f), Err(FrameError::Malformed));
    // Frame 0 too short to hold the challenge.
    let mut f = seal_raw(
        &keys.gateway_to_device,
        Kind::Ack,
        0,
        &[],
        &[0x02, 0x40, 0x00],
    );
    assert_eq!(dev.decode(&mut f), Err(FrameError::Malformed));
}

#[test]
fn bad_hello() {
    let (dev, _, hello) = hello_only(7);
    // Wrong key, tampered device id (clear text, but authenticated).
    assert_eq!(
        GatewaySession::accept(&[0; KEY_LEN], &hello, CHALLENGE).err(),
        Some(FrameError::BadAuth)
    );
    let mut t = hello.clone();
    t[HEADER_LEN] ^= 0x01;
    assert_eq!(GatewaySession::peek_hello(&t).unwrap().device_id, 76);
    assert_eq!(
        GatewaySession::accept(&KEY, &t, CHALLENGE).err(),
        Some(FrameError::BadAuth)
    );
    // An authentic Hello with another protocol version in its body.
    let (_, hkey) = keys_of(&hello);
    let other = Hello {
        protocol_version: 3,
        nonce: GatewaySession::peek_hello(&hello).unwrap().nonce,
        ..dev.hello(77, 1, 10)
    };
    let mut body = [0u8; 64];
    let blen = Message::Hello(other).encode_body(&mut body).unwrap();
    let f = seal_raw(&hkey, Kind::Hello, 0, &[], &body[..blen]);
    assert_eq!(
        GatewaySession::accept(&KEY, &f, CHALLENGE).err(),
        Some(FrameError::UnsupportedVersion)
    );
    // A Hello whose counter is not 0.
    let f = seal_raw(
        &hkey,
        Kind::Hello,
        1,
        &[],
        &hello[HEADER_LEN..hello.len() - TAG_LEN],
    );
    assert_eq!(
        GatewaySession::accept(&KEY, &f, CHALLENGE).err(),
        Some(FrameError::Malformed)
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
    let (mut dev, gw) = connect();
    let mut buf = [0u8; 64];
    let n = encode_unsealed_error(ErrorCode::Overloaded, &mut buf).unwrap();
    // Gateways never accept unsealed frames.
    assert_eq!(gw.clone().decode(&mut buf[..n]), Err(FrameError::Malformed));
    // Only Error may be unsealed.
    let mut t = buf;
    t[3] = Kind::Ack as u8;
    assert_eq!(dev.clone().decode(&mut t[..n]), Err(FrameError::Malformed));
    // A device only closes on it; the code is for logs.
    assert_eq!(dev.decode(&mut buf[..n]), Err(FrameError::Unsealed));
    assert_eq!(unsealed_error_code(&buf[..n]), Some(ErrorCode::Overloaded));
    assert_eq!(FrameError::Unsealed.code(), ErrorCode::Malformed);
}
