//! Backup objects: their names and their bytes.
//!
//! # Names (under the target's prefix)
//!
//! ```text
//! snapshots/{index:020}-{stamp_ms:020}.snap            the database as of log index `index`
//! segments/{first:020}-{last:020}-{first_stamp:020}-{last_stamp:020}.seg
//!                                                      committed entries first..=last
//! ```
//!
//! Every number is zero-padded decimal, so names sort by index and a listing alone plans a
//! restore (which snapshot, which segments, which stamps) without reading any object. A stamp
//! is the leader's wall clock on the entry (`command::Command::Stamped`); entries without
//! one (openraft's blank and membership entries, entries older than stamping) carry the stamp
//! of the entry before them.
//!
//! # Bytes
//!
//! ```text
//! 0   8   magic "CAIRNBK" + format version 1
//! 8   1   kind: 1 snapshot, 2 segment
//! 9   1   flags: bit 0 = encrypted
//! 10  2   zero
//! 12  8   payload length before compression (u64 LE)
//! 20  32  SHA-256 of everything after this header (nonce and body)
//! 52  24  nonce (XChaCha20-Poly1305), only when encrypted
//! ..      body: zstd(payload); when encrypted, sealed with the key file's key and the first
//!         20 header bytes plus the object's name as associated data
//! ```
//!
//! The checksum names a damaged object whatever the key (and never reveals anything about
//! the plaintext: it covers the stored bytes). The AEAD's tag makes an encrypted object
//! useless without the key, and binding the name means an object renamed or copied into
//! another place (an old snapshot posing as a new one) is refused too. A segment's payload is
//! the postcard encoding of its `Vec<Entry>` (the Raft log's own encoding); a snapshot's is a
//! SQLite database file.

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: &[u8; 8] = b"CAIRNBK\x01";
const HEADER: usize = 52;
const NONCE: usize = 24;
/// zstd level: 3 is zstd's default, fast enough to keep up with the log on a board.
const LEVEL: i32 = 3;

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Segment,
}

/// A backup object as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: Kind,
    /// First and last log index (equal for a snapshot).
    pub first: u64,
    pub last: u64,
    /// Stamps of the first and last entry (equal for a snapshot: its last entry's).
    pub first_stamp: i64,
    pub last_stamp: i64,
}

impl ObjectName {
    pub fn snapshot(index: u64, stamp: i64) -> Self {
        ObjectName {
            kind: Kind::Snapshot,
            first: index,
            last: index,
            first_stamp: stamp,
            last_stamp: stamp,
        }
    }

    /// The object's key below the target's prefix.
    pub fn key(&self) -> String {
        match self.kind {
            Kind::Snapshot => format!("snapshots/{:020}-{:020}.snap", self.last, self.last_stamp),
            Kind::Segment => format!(
                "segments/{:020}-{:020}-{:020}-{:020}.seg",
                self.first,
                self.last,
                self.first_stamp.max(0),
                self.last_stamp.max(0)
            ),
        }
    }

    fn parse_snapshot(key: &str) -> Option<Self> {
        let rest = key.strip_prefix("snapshots/")?.strip_suffix(".snap")?;
        let (i, s) = rest.split_once('-')?;
        Some(Self::snapshot(
            i.parse().ok()?,
            s.parse::<u64>().ok()? as i64,
        ))
    }

    fn parse_segment(key: &str) -> Option<Self> {
        let rest = key.strip_prefix("segments/")?.strip_suffix(".seg")?;
        let p: Vec<u64> = rest
            .split('-')
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        let [first, last, fs, ls] = p[..] else {
            return None;
        };
        (first <= last).then_some(ObjectName {
            kind: Kind::Segment,
            first,
            last,
            first_stamp: fs as i64,
            last_stamp: ls as i64,
        })
    }

    /// Parses a key made by [`ObjectName::key`]; `None` for anything else.
    pub fn from_key(key: &str) -> Option<Self> {
        if key.starts_with("snapshots/") {
            Self::parse_snapshot(key)
        } else {
            Self::parse_segment(key)
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// The key of `--backup-key-file`: 32 bytes, as the raw file or 64 hex digits.
#[derive(Clone)]
pub struct BackupKey([u8; 32]);

impl fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

impl BackupKey {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(b).map(str::trim).unwrap_or("");
        if text.len() == 64 && text.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut k = [0u8; 32];
            for (i, k) in k.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
            }
            return Some(BackupKey(k));
        }
        <[u8; 32]>::try_from(b).ok().map(BackupKey)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let b = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("backup key file {}: {e}", path.display()))?;
        Self::from_bytes(&b).ok_or_else(|| {
            anyhow::anyhow!(
                "backup key file {}: need 32 bytes or 64 hex digits (e.g. `head -c 32 \
                 /dev/urandom > FILE`)",
                path.display()
            )
        })
    }
}

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("backup object {0} is corrupt: {1}")]
    Corrupt(String, &'static str),
    #[error("backup object {0} is encrypted: give --backup-key-file (or --key-file)")]
    NeedKey(String),
    #[error("backup object {0} does not open with this key (wrong key, or the object was altered)")]
    WrongKey(String),
}

fn kind_byte(k: Kind) -> u8 {
    match k {
        Kind::Snapshot => 1,
        Kind::Segment => 2,
    }
}

/// Compresses, (optionally) encrypts and checksums `payload` as the object `key`.
pub fn seal(kind: Kind, key: &str, payload: &[u8], enc: Option<&BackupKey>) -> Vec<u8> {
    let body = zstd::bulk::compress(payload, LEVEL).expect("zstd compression of a buffer");
    let mut out = Vec::with_capacity(HEADER + NONCE + body.len() + 16);
    out.extend_from_slice(MAGIC);
    out.push(kind_byte(kind));
    out.push(u8::from(enc.is_some()));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 32]);
    match enc {
        None => out.extend_from_slice(&body),
        Some(k) => {
            let nonce: [u8; NONCE] = rand::random();
            let aad = [&out[..20], key.as_bytes()].concat();
            let sealed = XChaCha20Poly1305::new((&k.0).into())
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &body,
                        aad: &aad,
                    },
                )
                .expect("XChaCha20-Poly1305 seals any buffer");
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
        }
    }
    let sum = ring::digest::digest(&ring::digest::SHA256, &out[HEADER..]);
    out[20..HEADER].copy_from_slice(sum.as_ref());
    out
}

/// Checks, decrypts and decompresses the object `key`.
pub fn open(
    kind: Kind,
    key: &str,
    bytes: &[u8],
    enc: Option<&BackupKey>,
) -> Result<Vec<u8>, ObjectError> {
    let mut out = Vec::new();
    open_into(kind, key, bytes, enc, &mut out).map_err(|e| {
        e.into_inner()
            .unwrap_or_else(|io| ObjectError::Corrupt(key.into(), io))
    })?;
    Ok(out)
}

/// Why [`open_into`] failed: the object, or the writer.
#[derive(Debug)]
pub enum OpenError {
    Object(ObjectError),
    Write(std::io::Error),
}

impl OpenError {
    /// The object's error; a writer's error as a description.
    fn into_inner(self) -> Result<ObjectError, &'static str> {
        match self {
            OpenError::Object(e) => Ok(e),
            OpenError::Write(_) => Err("zstd body"),
        }
    }
}

impl From<OpenError> for anyhow::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Object(e) => e.into(),
            OpenError::Write(e) => e.into(),
        }
    }
}

/// [`open`], writing the payload to `out` as it is decompressed (a snapshot is never held in
/// memory whole); the payload's length.
pub fn open_into(
    kind: Kind,
    key: &str,
    bytes: &[u8],
    enc: Option<&BackupKey>,
    out: &mut impl std::io::Write,
) -> Result<u64, OpenError> {
    let corrupt = |why| OpenError::Object(ObjectError::Corrupt(key.to_string(), why));
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt(
            "not a Cairn backup object (bad magic or too short)",
        ));
    }
    let sum = ring::digest::digest(&ring::digest::SHA256, &bytes[HEADER..]);
    if sum.as_ref() != &bytes[20..HEADER] {
        return Err(corrupt("checksum mismatch"));
    }
    if bytes[8] != kind_byte(kind) {
        return Err(corrupt("kind does not match its name"));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let decrypted;
    let body: &[u8] = match (bytes[9] & 1 == 1, enc) {
        (false, _) => &bytes[HEADER..],
        (true, None) => return Err(OpenError::Object(ObjectError::NeedKey(key.to_string()))),
        (true, Some(k)) => {
            if bytes.len() < HEADER + NONCE {
                return Err(corrupt("truncated nonce"));
            }
            let aad = [&bytes[..20], key.as_bytes()].concat();
            decrypted = XChaCha20Poly1305::new((&k.0).into())
                .decrypt(
                    XNonce::from_slice(&bytes[HEADER..HEADER + NONCE]),
                    Payload {
                        msg: &bytes[HEADER + NONCE..],
                        aad: &aad,
                    },
                )
                .map_err(|_| OpenError::Object(ObjectError::WrongKey(key.to_string())))?;
            &decrypted
        }
    };
    // The header's length is not under the checksum: never allocate by it. The stream
    // decoder goes as far as the body really holds, and stops one byte past the claim.
    use std::io::Read as _;
    let mut decoder = zstd::stream::read::Decoder::new(body)
        .map_err(|_| corrupt("zstd body"))?
        .take(len.saturating_add(1));
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(corrupt("zstd body")),
        };
        n += got as u64;
        if n > len {
            return Err(corrupt("length mismatch"));
        }
        out.write_all(&buf[..got]).map_err(OpenError::Write)?;
    }
    if n != len {
        return Err(corrupt("length mismatch"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_round_trip_and_sort() {
        let s = ObjectName::snapshot(42, 1_700_000_000_123);
        assert_eq!(
            s.key(),
            "snapshots/00000000000000000042-00000001700000000123.snap"
        );
        assert_eq!(ObjectName::from_key(&s.key()), Some(s));
        let g = ObjectName {
            kind: Kind::Segment,
            first: 9,
            last: 10,
            first_stamp: 5,
            last_stamp: 7,
        };
        assert_eq!(ObjectName::from_key(&g.key()), Some(g.clone()));
        let later = ObjectName {
            first: 11,
            last: 100,
            ..g.clone()
        };
        assert!(g.key() < later.key());
        assert_eq!(ObjectName::from_key("segments/x.seg"), None);
        assert_eq!(ObjectName::from_key("snapshots/1.snap"), None);
    }

    #[test]
    fn test_seal_open() {
        let k = BackupKey([7; 32]);
        let data = b"hello hello hello hello".repeat(100);
        for enc in [None, Some(&k)] {
            let b = seal(Kind::Segment, "segments/a", &data, enc);
            assert!(b.len() < data.len());
            assert_eq!(open(Kind::Segment, "segments/a", &b, enc).unwrap(), data);
            // Flipped byte: named as corrupt.
            let mut bad = b.clone();
            let n = bad.len() - 3;
            bad[n] ^= 1;
            let e = open(Kind::Segment, "segments/a", &bad, enc)
                .unwrap_err()
                .to_string();
            assert!(e.contains("segments/a") && e.contains("checksum"), "{e}");
        }
        // A length field claiming far more than the body holds: named as corrupt, no
        // allocation by the claim.
        let mut lying = seal(Kind::Segment, "segments/a", &data, None);
        lying[12..20].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let e = open(Kind::Segment, "segments/a", &lying, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("segments/a") && e.contains("length"), "{e}");
        let sealed = seal(Kind::Segment, "segments/a", &data, Some(&k));
        assert!(matches!(
            open(Kind::Segment, "segments/a", &sealed, None),
            Err(ObjectError::NeedKey(_))
        ));
        assert!(matches!(
            open(
                Kind::Segment,
                "segments/a",
                &sealed,
                Some(&BackupKey([8; 32]))
            ),
            Err(ObjectError::WrongKey(_))
        ));
        // Renamed: the name is bound into the seal.
        assert!(matches!(
            open(Kind::Segment, "segments/b", &sealed, Some(&k)),
            Err(ObjectError::WrongKey(_))
        ));
        // Compressible plaintext is not visible in the sealed bytes.
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
    }

    #[test]
    fn test_key_file_forms() {
        assert!(BackupKey::from_bytes(&[1; 32]).is_some());
        assert!(BackupKey::from_bytes(format!("{}\n", "ab".repeat(32)).as_bytes()).is_some());
        assert!(BackupKey::from_bytes(b"short").is_none());
    }
}
