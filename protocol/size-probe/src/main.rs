//! Links what a device needs from cairn-protocol, with inputs hidden behind `black_box` so
//! nothing is folded away. Built twice (with and without `use-protocol`); the difference in
//! `.text` + `.rodata` is the protocol's flash cost.
#![no_std]
#![no_main]

use core::hint::black_box;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(feature = "use-protocol")]
fn device_round(frame: &mut [u8; cairn_protocol::MAX_FRAME]) -> usize {
    use cairn_protocol::*;
    let key = black_box([0x42u8; KEY_LEN]);
    let mut session = DeviceSession::new(&key, black_box(1), black_box([0; BOOT_NONCE_LEN]));
    let hello = session.hello(black_box(7), 1, 50);
    let mut total = session.encode(&Message::Hello(hello), frame).unwrap_or(0);

    let mut body = [0u8; MAX_FRAME];
    let mut batch = BatchEncoder::new(&mut body, black_box(1), black_box(10_000));
    let values = [
        Value::F32(black_box(21.5)),
        Value::I64(black_box(-3)),
        Value::Str(black_box("ok")),
    ];
    let record = Record {
        stream: black_box(1),
        uptime_ms: black_box(9_000),
        values: &values,
    };
    let _ = batch.push(&record);
    if let Ok(view) = batch.finish() {
        total += session.encode(&Message::Batch(view), frame).unwrap_or(0);
    }

    // Gateway replies: the first one derives the connection's keys (HChaCha20).
    let n = black_box(frame.len());
    if let Ok(Message::Ack(ack)) = session.decode(&mut frame[..n]) {
        total += ack.through_seq as usize;
    }
    if let Ok(view) = BatchView::parse(black_box(&body[..8])) {
        total += session.encode(&Message::Batch(view), frame).unwrap_or(0);
    }
    total
}

#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let mut frame = [0u8; 1024];
    black_box(&mut frame);
    #[cfg(feature = "use-protocol")]
    black_box(device_round(&mut frame));
    loop {
        black_box(&frame);
    }
}
