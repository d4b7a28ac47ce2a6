//! Untrusted frames into both session decoders (authentication, counters, salt handling).
//! Without the key nothing may decode (protocol 2 devices act on no unsealed frame).
#![no_main]

use cairn_protocol::*;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; KEY_LEN] = [0x11; KEY_LEN];

fuzz_target!(|data: &[u8]| {
    let mut device = DeviceSession::new(&KEY, 3, [4; BOOT_NONCE_LEN]);
    let mut hello = [0u8; 64];
    let n = device
        .encode(&Message::Hello(device.hello(1, 1, 10)), &mut hello)
        .unwrap();
    let mut gateway = GatewaySession::accept(&KEY, &hello[..n], [2; CHALLENGE_LEN]).unwrap();

    // Nothing opens without the key, unsealed Errors included.
    let mut buf = data.to_vec();
    assert!(device.decode(&mut buf).is_err(), "forged gateway frame");
    let mut buf = data.to_vec();
    assert!(gateway.decode(&mut buf).is_err(), "forged device frame");
    assert!(
        GatewaySession::accept(&KEY, data, [0; CHALLENGE_LEN]).is_err(),
        "forged Hello"
    );
    let mut buf = data.to_vec();
    let _ = v1::open(&KEY, 3, v1::Direction::DeviceToGateway, 1, &mut buf);
});
