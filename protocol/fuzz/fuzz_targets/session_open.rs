//! Untrusted frames into both session decoders (authentication, counters, salt handling).
//! Without the key nothing may decode, except an unsealed Error on the device side.
#![no_main]

use cairn_protocol::*;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; KEY_LEN] = [0x11; KEY_LEN];

fuzz_target!(|data: &[u8]| {
    let mut device = DeviceSession::new(&KEY, 3, 0);
    let mut hello = [0u8; 64];
    let n = device
        .encode(&Message::Hello(device.hello(1, 1, 10)), &mut hello)
        .unwrap();
    let mut gateway = GatewaySession::accept_salted(&KEY, &hello[..n], [2; SALT_LEN]).unwrap();

    let mut buf = data.to_vec();
    if let Ok(msg) = device.decode(&mut buf) {
        assert!(
            matches!(msg, Message::Error(_)),
            "forged gateway frame: {msg}"
        );
        assert_ne!(data[6] & FLAG_UNSEALED, 0);
    }
    let mut buf = data.to_vec();
    assert!(gateway.decode(&mut buf).is_err(), "forged device frame");
    assert!(GatewaySession::accept(&KEY, data).is_err(), "forged Hello");
    let mut buf = data.to_vec();
    let _ = open(&KEY, 3, Direction::DeviceToGateway, 1, &mut buf);
});
