//! The protocol-level test device: what tests and the bench need to speak Cairn's device
//! protocol (protocol/SPEC.md) to a gateway with the real `cairn-protocol` sessions, plus the
//! way to run `cairn sim` (the real firmware client) against a cluster.
//!
//! [`read_frame`] is the harness's one blocking frame read, on top of the protocol's
//! `FrameReassembler`; the [`fleet`] reads through it and so do the tests.
//!
//! [`fleet`]: crate::fleet

use std::io::{self, Read};
use std::ops::Range;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, anyhow, ensure};
use cairn_protocol::{FrameReassembler, MAX_FRAME, Value};
use serde_json::{Value as Json, json};

use crate::http::Client;

/// Stream 1 declared as table `readings` with `k` as a column: `cairn sim` pushes
/// `[U64(k), F32(t)]` with `k = 1, 2, 3, ...` per device, so stored rows can be checked by
/// content (a record stored twice under two seqs shows as a repeated `k`).
pub const READINGS_CONFIG: &str = r#"
[[stream]]
id = 1
table = "readings"
columns = [{ name = "k", type = "integer" }, { name = "temperature", type = "real" }]
"#;

/// Reads one whole gateway frame (header, body, tag) into `buf` and returns its length. The
/// framing is the protocol's [`FrameReassembler`] (the one every reader uses); this function
/// only moves bytes, exactly as many as the reassembler says are missing, so nothing after
/// the frame is consumed (tests go on reading the same socket by hand). A header that is not
/// a frame's is `InvalidData`.
pub fn read_frame(r: &mut impl Read, buf: &mut [u8; MAX_FRAME]) -> io::Result<usize> {
    let invalid = |e: cairn_protocol::FrameError| {
        io::Error::new(io::ErrorKind::InvalidData, format!("gateway frame: {e}"))
    };
    let mut frames = FrameReassembler::<MAX_FRAME>::new();
    loop {
        let want = frames.missing().map_err(invalid)?;
        if want == 0 {
            break;
        }
        r.read_exact(&mut frames.read_buf()[..want])?;
        frames.commit(want);
    }
    let frame = frames
        .next_frame()
        .map_err(invalid)?
        .ok_or_else(|| io::Error::other("reassembler: no frame after reading what it missed"))?;
    buf[..frame.len()].copy_from_slice(frame);
    Ok(frame.len())
}

/// A boot nonce for a test device session: 12 bytes of the operating system's RNG
/// (`/dev/urandom`), as host builds take them (protocol/SPEC.md §5.2).
pub fn boot_nonce() -> [u8; cairn_protocol::BOOT_NONCE_LEN] {
    let mut n = [0u8; cairn_protocol::BOOT_NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .expect("reading /dev/urandom");
    n
}

/// A test device's pre-shared key, derived from its id (test devices are throwaway).
pub fn key_of(id: u64) -> [u8; 32] {
    let mut k = [0x5au8; 32];
    k[..8].copy_from_slice(&id.to_le_bytes());
    k
}

/// Lower-case hex, as `/devices` and `cairn device add` take keys.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The three values of a typical climate record (temperature, humidity, pressure) for
/// sample `n`: what the fleet pushes and what the bench's bytes-per-record figure encodes.
pub fn climate_values(n: u64) -> [Value<'static>; 3] {
    [
        Value::F32(21.5 + (n % 10) as f32 * 0.1),
        Value::F32(48.25),
        Value::F32(1013.0),
    ]
}

/// Registers devices `ids` with keys [`key_of`] through the `/devices` admin API of the node
/// at `http` (`http://host:port`, what `cairn device add` calls), from a few kept-alive
/// connections in parallel.
pub fn register(http: &str, ids: Range<u64>) -> Result<()> {
    let ids: Vec<u64> = ids.collect();
    let url = format!("{http}/devices");
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = ids
            .chunks(ids.len().div_ceil(8).max(1))
            .map(|chunk| {
                let url = &url;
                scope.spawn(move || -> Result<()> {
                    let client = Client::default();
                    for &id in chunk {
                        let body = json!({"id": id, "key": hex(&key_of(id))});
                        let r = client.post(url, &body);
                        ensure!(
                            (200..300).contains(&r.status),
                            "registering device {id}: {} {}",
                            r.status,
                            r.body
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow!("registration thread panicked"))??;
        }
        Ok(())
    })
}

/// `BIN sim --gateways A,B --host URL` (the real firmware client on tokio); the caller adds
/// devices, rate, duration and output flags.
pub fn sim_command(bin: &Path, gateways: &[&str], host: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("sim")
        .args(["--gateways", &gateways.join(",")])
        .args(["--host", host]);
    cmd
}

/// Gives a CLI command (`cairn sim`, `cairn device`, ...) the harness's credentials and CA:
/// `--user` with `CAIRN_PASSWORD`, `--ca-cert`.
pub fn authenticate(cmd: &mut Command, auth: &crate::http::Auth) {
    if let Some((user, password)) = &auth.user {
        cmd.args(["--user", user]).env("CAIRN_PASSWORD", password);
    }
    if let Some(ca) = &auth.ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
}

/// `cairn sim` (the harness's binary and credentials) on every started node's device port,
/// registering its devices through node `host`'s API: `--json --quiet`, each device's final
/// state in `report` (one JSON line each, [`read_report`]), stdout piped for [`sim_summary`].
/// The caller adds devices, rate, duration, drain and first id.
pub fn fleet_command(c: &crate::Cluster, host: usize, report: &Path) -> Command {
    let gateways: Vec<String> = (0..c.nodes.len())
        .filter(|&i| c.nodes[i].is_started())
        .map(|i| c.nodes[i].device_addr())
        .collect();
    let gateways: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let mut cmd = sim_command(&crate::cairn_bin(), &gateways, &c.nodes[host].url(""));
    authenticate(&mut cmd, &c.auth());
    cmd.args(["--json", "--quiet", "--report"])
        .arg(report)
        .stdout(std::process::Stdio::piped());
    cmd
}

/// The lines of a `cairn sim --report` file, one JSON object per device.
pub fn read_report(report: &Path) -> Vec<Json> {
    std::fs::read_to_string(report)
        .expect("sim report")
        .lines()
        .map(|l| serde_json::from_str(l).expect("report line"))
        .collect()
}

/// The JSON summary `cairn sim --json` prints as its last `{...}` line.
pub fn sim_summary(stdout: &[u8]) -> Option<Json> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_differ_per_device_and_hex_is_64_digits() {
        assert_ne!(key_of(1), key_of(2));
        assert_eq!(hex(&key_of(1)).len(), 64);
        assert!(hex(&key_of(1)).starts_with("01000000000000005a"));
    }

    #[test]
    fn test_read_frame_reads_one_frame_and_rejects_a_bad_header() {
        // SPEC §10.1: Hello of device 258, boot 7, counter 5 (36 bytes), then the next frame.
        let hello: [u8; 36] = [
            0x43, 0x52, 0x01, 0x01, 0x18, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x82, 0x02,
            0x07, 0x82, 0x80, 0x04, 0x01, 0x32, 0x31, 0x7b, 0x4d, 0x77, 0x73, 0x7c, 0x8d, 0x4e,
            0xd4, 0x85, 0xd8, 0xd0, 0xf1, 0x18, 0x71, 0xf4,
        ];
        let mut two = hello.to_vec();
        two.extend_from_slice(&hello);
        let mut r = &two[..];
        let mut buf = [0u8; MAX_FRAME];
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), 36);
        assert_eq!(&buf[..36], &hello);
        assert_eq!(r.len(), 36, "exactly one frame consumed");
        let mut http = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        let e = read_frame(&mut http, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn test_sim_summary_is_the_last_json_line() {
        let out = b"starting\n{\"acked\": 1}\nnoise\n{\"acked\": 2}\n";
        assert_eq!(sim_summary(out).unwrap()["acked"], 2);
        assert!(sim_summary(b"no json").is_none());
    }
}
