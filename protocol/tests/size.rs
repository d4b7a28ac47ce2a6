//! Encoded size of typical batches: three `f32` values per record, one record per second.
//!
//! Prints bytes per record for batches of 1, 10 and 50 records
//! (`cargo test -p cairn-protocol --test size -- --nocapture`) and asserts the promise of
//! SPEC.md §7.3.2: at most 20 bytes per record in a 50-record batch (body and frame overhead
//! excluded from the per-record figure, shown separately).

use cairn_protocol::*;

/// Body length of a batch of `n` records, sent 100 ms after the newest, starting at an uptime
/// of one hour and at seq 1000.
fn batch_body_len(n: u16) -> usize {
    let mut buf = [0u8; MAX_FRAME];
    let start = 3_600_000u64;
    let sent = start + u64::from(n - 1) * 1000 + 100;
    let mut enc = BatchEncoder::new(&mut buf, 1000, sent);
    for i in 0..n {
        let values = [
            Value::F32(21.5 + f32::from(i)),
            Value::F32(40.25),
            Value::F32(1013.25),
        ];
        enc.push(&Record {
            stream: 1,
            uptime_ms: start + u64::from(i) * 1000,
            values: &values,
        })
        .unwrap();
    }
    let view = enc.finish().unwrap();
    assert_eq!(view.records().count(), usize::from(n));
    view.as_bytes().len()
}

#[test]
fn bytes_per_three_f32_record() {
    let header_only = {
        let h = BatchHeader {
            first_seq: 1000,
            count: 1,
            sent_uptime_ms: 3_600_100,
        };
        let mut b = [0u8; 32];
        postcard::to_slice(&h, &mut b).unwrap().len()
    };
    for n in [1u16, 10, 50] {
        let body = batch_body_len(n);
        let records = body - header_only;
        let per_record = records as f64 / f64::from(n);
        let frame = HEADER_LEN + body + TAG_LEN;
        println!(
            "batch of {n:2}: body {body:4} B, frame {frame:4} B, {per_record:.2} B/record \
             ({:.2} B/record with frame overhead)",
            frame as f64 / f64::from(n)
        );
        if n == 50 {
            assert!(per_record <= 20.0, "{per_record} bytes per record");
            assert!(frame <= MAX_FRAME);
        }
    }
}

#[test]
fn full_batch_of_three_f32_records() {
    // How many such records fit in one frame: the device's largest useful max_batch.
    let mut buf = [0u8; MAX_FRAME];
    let mut enc = BatchEncoder::new(&mut buf, 1, 100_000);
    let values = [Value::F32(1.0), Value::F32(2.0), Value::F32(3.0)];
    let mut n = 0u64;
    loop {
        match enc.push(&Record {
            stream: 1,
            uptime_ms: 100_000 - n * 1000,
            values: &values,
        }) {
            Ok(()) => n += 1,
            Err(e) => {
                assert_eq!(e, EncodeError::Full);
                break;
            }
        }
    }
    let view = enc.finish().unwrap();
    println!(
        "a full frame holds {n} three-f32 records ({} B body)",
        view.as_bytes().len()
    );
    assert!(n >= 49, "{n}");
    assert!(view.as_bytes().len() <= MAX_BODY);
}

#[test]
fn session_ram() {
    // What a device keeps in RAM for the protocol, besides its frame buffers.
    let device = core::mem::size_of::<DeviceSession>();
    let gateway = core::mem::size_of::<GatewaySession>();
    println!("DeviceSession {device} B, GatewaySession {gateway} B");
    // Protocol 2 keeps the root key and the connection's two traffic keys (was 80 B in protocol 1).
    assert!(device <= 160, "{device}");
    assert!(gateway <= 160, "{gateway}");
}
