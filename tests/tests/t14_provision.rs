//! Provisioning (`cairn device add --generate --provision-out`, `cairn device provision`): the
//! key is generated locally, registered and written to a settings region in one step and
//! shown once; the region decodes with the firmware's codec (`cairn_protocol::settings`, the
//! very code devices read it with); `provision` needs no cluster; a file is never overwritten;
//! a failed registration leaves no file behind. That a provisioned device then authenticates
//! is checked by `cargo xtask qemu` (two QEMU devices, one image, two settings regions).

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Command, Output};

use cairn_protocol::GatewayAddr;
use cairn_protocol::settings::{DeviceSettings, SETTINGS_LEN, parse_key};
use cairn_tests::{Cluster, cairn_bin};

fn cairn(args: &[&str]) -> Output {
    let out = Command::new(cairn_bin())
        .args(args)
        .output()
        .expect("running cairn");
    eprintln!(
        "cairn {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `cairn device add --id ID --generate --provision-out FILE --gateway G... --host HOST`.
fn generate(id: &str, file: &Path, gateways: &[&str], host: &str) -> Output {
    let mut args = vec!["device", "add", "--id", id, "--generate", "--provision-out"];
    args.push(file.to_str().unwrap());
    for g in gateways {
        args.extend(["--gateway", g]);
    }
    args.extend(["--host", host]);
    cairn(&args)
}

/// Whether `cairn device list` shows device `id`.
fn listed(host: &str, id: &str) -> bool {
    let list = cairn(&["device", "list", "--host", host]);
    assert!(list.status.success());
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(id))
}

fn read_settings(path: &Path) -> DeviceSettings {
    let bytes = std::fs::read(path).expect("settings file");
    assert_eq!(bytes.len(), SETTINGS_LEN);
    DeviceSettings::decode(&bytes).expect("settings file decodes")
}

/// The key printed on the `generated key` line.
fn printed_key(stdout: &[u8]) -> [u8; 32] {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .find(|l| l.contains("generated key"))
        .expect("a `generated key` line");
    let hex = line
        .split_whitespace()
        .find(|w| w.len() == 64)
        .expect("64 hex digits on it");
    parse_key(hex).expect("a key")
}

#[test]
fn test_generate_register_and_provision_in_one_step() {
    let cluster = Cluster::start(1);
    let host = cluster.nodes[0].url("");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dev41.bin");

    let out = generate("41", &file, &["10.0.2.2:4003", "192.168.7.2:4013"], &host);
    assert!(out.status.success());
    let key = printed_key(&out.stdout);
    let settings = read_settings(&file);
    assert_eq!(settings.device_id, 41);
    assert_eq!(settings.key, key, "the file holds the key that was shown");
    assert_ne!(key, [0; 32]);
    assert_eq!(
        settings.gateways(),
        [
            GatewayAddr::new([10, 0, 2, 2], 4003),
            GatewayAddr::new([192, 168, 7, 2], 4013)
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the settings file (a key) is private: {mode:o}"
        );
    }

    // Registered: listed. No route returns the key.
    assert!(listed(&host, "41"));
    let hex = cairn_tests::device::hex(&key);
    let devices = cairn_tests::get(&cluster.nodes[0].url("/devices"));
    assert!(
        !devices.body.to_string().contains(&hex),
        "/devices shows the key"
    );

    // An existing file is never overwritten, and then nothing is registered.
    let again = generate("42", &file, &["10.0.2.2:4003"], &host);
    assert!(
        !again.status.success(),
        "overwrote an existing settings file"
    );
    assert_eq!(read_settings(&file).device_id, 41);
    assert!(
        !listed(&host, "42"),
        "device 42 registered although its settings file could not be written"
    );
    // A second generated key differs.
    let file2 = dir.path().join("dev42.bin");
    let out2 = generate("42", &file2, &["10.0.2.2:4003"], &host);
    assert!(out2.status.success());
    assert_ne!(printed_key(&out2.stdout), key);
    assert_eq!(read_settings(&file2).key, printed_key(&out2.stdout));
}

#[test]
fn test_provision_is_offline_and_add_failure_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here: `provision` must not need it.
    let dead = "http://127.0.0.1:9";
    let key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let file = dir.path().join("dev7.bin");
    let out = cairn(&[
        "device",
        "provision",
        "--id",
        "7",
        "--key",
        key,
        "--gateway",
        "10.0.0.2:4003",
        "--out",
        file.to_str().unwrap(),
        "--host",
        dead,
    ]);
    assert!(out.status.success());
    let s = read_settings(&file);
    assert_eq!((s.device_id, s.key), (7, parse_key(key).unwrap()));
    let gw: SocketAddrV4 = "10.0.0.2:4003".parse().unwrap();
    assert_eq!(s.gateways(), [GatewayAddr::from(gw)]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(key),
        "provision echoes a key it was given"
    );

    // Bad input is refused before anything is written.
    for bad in [
        vec!["--key", "0011", "--gateway", "10.0.0.2:4003"],
        vec!["--key", key, "--gateway", "10.0.0.2:0"],
    ] {
        let f = dir.path().join("bad.bin");
        let mut args = vec![
            "device",
            "provision",
            "--id",
            "8",
            "--out",
            f.to_str().unwrap(),
        ];
        args.extend(bad);
        assert!(!cairn(&args).status.success());
        assert!(!f.exists());
    }
    // Five gateways are one too many.
    let f = dir.path().join("five.bin");
    let mut args = vec![
        "device",
        "provision",
        "--id",
        "8",
        "--key",
        key,
        "--out",
        f.to_str().unwrap(),
    ];
    for g in [
        "1.1.1.1:1",
        "1.1.1.2:1",
        "1.1.1.3:1",
        "1.1.1.4:1",
        "1.1.1.5:1",
    ] {
        args.extend(["--gateway", g]);
    }
    assert!(!cairn(&args).status.success());
    assert!(!f.exists());

    // `add` against an unreachable cluster fails and leaves no settings file behind.
    let f = dir.path().join("unregistered.bin");
    let out = generate("9", &f, &["10.0.0.2:4003"], dead);
    assert!(!out.status.success());
    assert!(
        !f.exists(),
        "a settings file for an unregistered key was left behind"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("generated key"),
        "a key that was never registered was shown"
    );
}
