//! Seeded random testing without extra dependencies: random and mutated bytes into every
//! decoder (no panic, and the right error where the answer is known), and random messages
//! through both sessions (exact round trip).

use cairn_protocol::*;

/// xorshift64*: small, deterministic, good enough to generate test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn fill(&mut self, buf: &mut [u8]) {
        buf.iter_mut().for_each(|b| *b = self.byte());
    }
    /// A u64 of random magnitude, so varints of every length occur.
    fn varied(&mut self) -> u64 {
        let bits = self.below(65) as u32;
        self.next().checked_shr(64 - bits).unwrap_or(0)
    }
}

const KEY: [u8; KEY_LEN] = [0x5a; KEY_LEN];
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

/// A device and a gateway session past the handshake (Hello, Welcome).
fn sessions(seed: u32) -> (DeviceSession, GatewaySession) {
    let mut boot_nonce = [0u8; BOOT_NONCE_LEN];
    boot_nonce[..4].copy_from_slice(&seed.to_le_bytes());
    let mut dev = DeviceSession::new(&KEY, 99, boot_nonce);
    let mut buf = [0u8; 64];
    let n = dev
        .encode(&Message::Hello(dev.hello(1, 1, 50)), &mut buf)
        .unwrap();
    let mut gw = GatewaySession::accept(&KEY, &buf[..n], [7; CHALLENGE_LEN]).unwrap();
    let welcome = Message::Welcome(Welcome {
        high_water: 0,
        leader: None,
        credit: 1,
    });
    let n = gw.encode(&welcome, &mut buf).unwrap();
    assert_eq!(dev.decode(&mut buf[..n]), Ok(welcome));
    (dev, gw)
}

/// Runs every decoder over `bytes`; none may panic. Returns whether any accepted it.
fn decode_everything(bytes: &[u8], dev: &DeviceSession, gw: &GatewaySession) -> bool {
    let mut accepted = false;
    if let Ok(frame) = Frame::new_checked(bytes) {
        let _ = FrameHeader::parse(&frame).map(|h| h.to_string());
        let _ = frame.to_string();
    }
    if let Ok(header) = <&[u8; HEADER_LEN]>::try_from(bytes.get(..HEADER_LEN).unwrap_or(&[])) {
        let _ = read_frame_len(header);
    }
    for kind in KINDS {
        if let Ok(msg) = Message::decode_body(kind, bytes) {
            let _ = msg.to_string();
            if let Message::Batch(b) = msg {
                for r in b.records() {
                    let r = r.expect("parse validated every record");
                    assert_eq!(r.values().count(), r.value_count());
                    let _ = r.to_string();
                }
            }
        }
    }
    let _ = GatewaySession::peek_hello(bytes);
    accepted |= GatewaySession::accept(&KEY, bytes, [0; CHALLENGE_LEN]).is_ok();
    accepted |= gw.clone().decode(&mut bytes.to_vec()).is_ok();
    // Nothing unsealed is accepted by a device.
    accepted |= dev.clone().decode(&mut bytes.to_vec()).is_ok();
    accepted
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (dev, gw) = sessions(0);
    let mut buf = vec![0u8; MAX_FRAME + 64];
    for i in 0..20_000 {
        let len = rng.below(buf.len() as u64) as usize;
        let bytes = &mut buf[..len];
        rng.fill(bytes);
        // Half the inputs get a valid magic/version/length so they reach the deeper checks.
        if i % 2 == 0 && len >= HEADER_LEN + TAG_LEN {
            bytes[..3].copy_from_slice(&[b'C', b'R', PROTOCOL_VERSION]);
            bytes[3] = rng.below(10) as u8;
            bytes[6] &= 0x03;
            bytes[7] = 0;
            let l = (len - HEADER_LEN).min(MAX_FRAME - HEADER_LEN) as u16;
            bytes[4..6].copy_from_slice(&l.to_le_bytes());
        }
        let accepted = decode_everything(bytes, &dev, &gw);
        assert!(!accepted, "random bytes authenticated: {bytes:02x?}");
    }
}

fn random_value<'a>(rng: &mut Rng, blob: &'a [u8], text: &'a str) -> Value<'a> {
    match rng.below(7) {
        0 => Value::Bool(rng.bool()),
        1 => Value::I64(rng.varied() as i64),
        2 => Value::U64(rng.varied()),
        3 => Value::F32(f32::from_bits(rng.next() as u32 & 0x7f7f_ffff)),
        4 => Value::F64(f64::from_bits(rng.next() & 0x7fef_ffff_ffff_ffff)),
        5 => Value::Bytes(&blob[..rng.below(blob.len() as u64 + 1) as usize]),
        _ => {
            let mut end = rng.below(text.len() as u64 + 1) as usize;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            Value::Str(&text[..end])
        }
    }
}

fn random_addr(rng: &mut Rng) -> Option<GatewayAddr> {
    rng.bool().then(|| {
        let ip = (rng.next() as u32).to_be_bytes();
        GatewayAddr::new(ip, rng.next() as u16)
    })
}

fn random_message<'a>(rng: &mut Rng, batch: Option<BatchView<'a>>) -> Message<'a> {
    match (rng.below(7), batch) {
        (0, _) => Message::Welcome(Welcome {
            high_water: rng.varied(),
            leader: random_addr(rng),
            credit: rng.next() as u16,
        }),
        (1, _) => Message::Ack(Ack {
            through_seq: rng.varied(),
            credit: rng.next() as u16,
            leader: random_addr(rng),
        }),
        (2, _) => Message::Redirect(Redirect {
            addr: GatewayAddr::new([rng.byte(), rng.byte(), rng.byte(), rng.byte()], 4003),
        }),
        (3, _) => Message::Error(Error {
            code: ErrorCode::from(rng.byte()),
        }),
        (4, _) => Message::Ping(Ping {
            nonce: rng.next() as u32,
        }),
        (5, Some(b)) => Message::Batch(b),
        _ => Message::Pong(Pong {
            nonce: rng.next() as u32,
        }),
    }
}

#[test]
fn random_messages_round_trip() {
    let mut rng = Rng(42);
    let blob: Vec<u8> = (0..MAX_BLOB as u8).collect();
    let text = "héllo wörld, Cairn ingests telemetry from microcontrollers ok";
    assert!(text.len() <= MAX_BLOB);
    for conn in 0..50u32 {
        let (mut dev, mut gw) = sessions(conn * 1000);
        for _ in 0..20 {
            // A random batch, pushed until full or up to a random count.
            let mut batch_buf = vec![0u8; MAX_FRAME];
            let first_seq = 1 + rng.varied() / 2;
            let sent = rng.varied();
            let mut enc = BatchEncoder::new(&mut batch_buf, first_seq, sent);
            let mut expected = Vec::new();
            for _ in 0..1 + rng.below(60) {
                let values: Vec<Value<'_>> = (0..rng.below(MAX_VALUES as u64 + 1))
                    .map(|_| random_value(&mut rng, &blob, text))
                    .collect();
                let record = Record {
                    stream: rng.next() as u16,
                    uptime_ms: sent - rng.varied().min(sent),
                    values: &values,
                };
                match enc.push(&record) {
                    Ok(()) => expected.push((record.stream, record.uptime_ms, values)),
                    Err(EncodeError::Full) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let batch = if expected.is_empty() {
                None
            } else {
                Some(enc.finish().unwrap())
            };

            // Device → gateway: the batch (when there is one), else a Ping.
            let msg = match batch {
                Some(b) => Message::Batch(b),
                None => Message::Ping(Ping { nonce: 1 }),
            };
            let mut frame = vec![0u8; MAX_FRAME];
            let n = dev.encode(&msg, &mut frame).unwrap();
            assert_eq!(
                read_frame_len(frame[..HEADER_LEN].try_into().unwrap()),
                Ok(n)
            );
            let got = gw.decode(&mut frame[..n]).unwrap();
            assert_eq!(got, msg);
            if let Message::Batch(view) = got {
                assert_eq!(view.header().first_seq, first_seq);
                for (i, (r, (stream, uptime, values))) in view.records().zip(&expected).enumerate()
                {
                    let r = r.unwrap();
                    assert_eq!(r.seq, first_seq + i as u64);
                    assert_eq!((r.stream, r.uptime_ms), (*stream, *uptime));
                    assert!(r.values().eq(values.iter().copied()));
                }
            }

            // Gateway → device: a random message.
            let reply = random_message(&mut rng, None);
            let n = gw.encode(&reply, &mut frame).unwrap();
            assert_eq!(dev.decode(&mut frame[..n]), Ok(reply));
        }
    }
}

#[test]
fn mutated_frames_get_the_right_error() {
    let mut rng = Rng(7);
    let blob = [0xabu8; MAX_BLOB];
    for round in 0..300u32 {
        let (mut dev, gw) = sessions(round * 10);
        let mut batch_buf = vec![0u8; MAX_FRAME];
        let mut enc = BatchEncoder::new(&mut batch_buf, 1, 1_000_000);
        for _ in 0..1 + rng.below(20) {
            let values = [random_value(&mut rng, &blob, "x"), Value::F32(1.0)];
            enc.push(&Record {
                stream: 3,
                uptime_ms: 999_000,
                values: &values,
            })
            .unwrap();
        }
        let batch = enc.finish().unwrap();
        let mut frame = vec![0u8; MAX_FRAME];
        let n = dev.encode(&Message::Batch(batch), &mut frame).unwrap();
        let frame = &frame[..n];

        // Flip 1 to 4 bytes after the header: always BadAuth.
        let mut t = frame.to_vec();
        for _ in 0..1 + rng.below(4) {
            let i = HEADER_LEN + rng.below((n - HEADER_LEN) as u64) as usize;
            t[i] ^= 1 + rng.below(255) as u8;
        }
        assert_eq!(gw.clone().decode(&mut t), Err(FrameError::BadAuth));

        // Cut it anywhere: Truncated.
        let mut t = frame[..rng.below(n as u64) as usize].to_vec();
        assert_eq!(gw.clone().decode(&mut t), Err(FrameError::Truncated));

        // Mutate the clear-text body for the body decoders: no panic, any outcome.
        let mut body = batch.as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(body.len() as u64) as usize;
            body[i] = rng.byte();
        }
        decode_everything(&body, &dev, &gw);
        for kind in KINDS {
            let _ = Message::decode_body(kind, &body);
        }
    }
}
