//! Bytes on the wire per record, computed with the real protocol encoder (`cairn-protocol`):
//! a sealed full Batch frame of three-`f32` records and the sealed Ack that answers it.

use anyhow::{Result, anyhow};
use cairn_protocol::{
    Ack, BOOT_NONCE_LEN, BatchEncoder, CHALLENGE_LEN, DeviceSession, EncodeError, GatewaySession,
    MAX_FRAME, Message, Record, Welcome,
};
use cairn_tests::device::climate_values;

/// Sizes for a batch of typical three-value records.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    pub records_per_batch: u16,
    /// Encoded record bytes inside the Batch body, per record (no batch header, no frame).
    pub body_per_record: f64,
    /// Batch frame (header, body, tag) plus its Ack frame, per record.
    pub wire_per_record: f64,
}

/// A device sampling three `f32` values at 10 Hz on stream 1, sending full batches; seq and
/// uptime are mid-life values (seq in the thousands, an hour of uptime). The connection's
/// Hello/Welcome are paid once per connection and left out.
pub fn three_value_record() -> Result<Wire> {
    let e = |e: EncodeError| anyhow!("protocol encoder: {e}");
    let key = [7u8; 32];
    let mut device = DeviceSession::new(&key, 1, [3; BOOT_NONCE_LEN]);
    let mut hello_frame = [0u8; MAX_FRAME];
    let hello = device.hello(42, 1, 64);
    let n = device
        .encode(&Message::Hello(hello), &mut hello_frame)
        .map_err(e)?;
    let mut gateway = GatewaySession::accept(&key, &hello_frame[..n], [9u8; CHALLENGE_LEN])
        .map_err(|err| anyhow!("accept: {err}"))?;
    let mut reply = [0u8; MAX_FRAME];
    let welcome = Welcome {
        high_water: 1000,
        leader: None,
        credit: 256,
    };
    let n = gateway
        .encode(&Message::Welcome(welcome), &mut reply)
        .map_err(e)?;
    device
        .decode(&mut reply[..n])
        .map_err(|err| anyhow!("welcome: {err}"))?;

    let sent_uptime_ms = 3_600_000u64;
    let mut body = [0u8; MAX_FRAME];
    let mut batch = BatchEncoder::new(&mut body, 1001, sent_uptime_ms);
    for i in 0u64.. {
        let values = climate_values(i);
        let record = Record {
            stream: 1,
            uptime_ms: sent_uptime_ms - 100 * (64 - i.min(63)),
            values: &values,
        };
        match batch.push(&record) {
            Ok(()) => {}
            Err(EncodeError::Full) => break,
            Err(err) => return Err(e(err)),
        }
    }
    let view = batch.finish().map_err(e)?;
    let h = view.header();
    let count = h.count;
    let header_len =
        varint_len(h.first_seq) + varint_len(u64::from(count)) + varint_len(h.sent_uptime_ms);
    let body_len = view.as_bytes().len();
    let mut frame = [0u8; MAX_FRAME];
    let batch_frame = device
        .encode(&Message::Batch(view), &mut frame)
        .map_err(e)?;
    let ack = Ack {
        through_seq: 1000 + u64::from(count),
        credit: 256,
        leader: None,
    };
    let ack_frame = gateway.encode(&Message::Ack(ack), &mut reply).map_err(e)?;
    Ok(Wire {
        records_per_batch: count,
        body_per_record: (body_len - header_len) as f64 / f64::from(count),
        wire_per_record: (batch_frame + ack_frame) as f64 / f64::from(count),
    })
}

/// Bytes of a postcard (LEB128) varint.
fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(7).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_varint_len() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(3_600_000), 4);
        assert_eq!(varint_len(u64::MAX), 10);
    }

    #[test]
    fn three_value_record_fits_the_budget() {
        let w = three_value_record().unwrap();
        assert!(w.records_per_batch >= 40, "{w:?}");
        assert!(w.body_per_record <= 20.0, "{w:?}");
        // Frame header, tag and the Ack add a little over one byte per record in a full batch.
        assert!(w.wire_per_record > w.body_per_record, "{w:?}");
        assert!(w.wire_per_record < w.body_per_record + 3.0, "{w:?}");
    }
}
