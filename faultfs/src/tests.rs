//! Each test mounts a real faultfs (root and `/dev/fuse` needed; skipped otherwise).

use super::*;
use std::io::Write;

fn mounted() -> Option<(tempfile::TempDir, Mount)> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: faultfs needs root and /dev/fuse");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk");
    fs::create_dir(&backing).unwrap();
    let opts = Options {
        durable_names: vec!["node.log".into()],
        scratch_suffixes: vec!["-shm".into()],
    };
    let m = Mount::new(&backing, &dir.path().join("mnt"), opts).unwrap();
    Some((dir, m))
}

#[test]
fn test_unsynced_data_is_lost_synced_data_stays() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let mnt = m.mountpoint().to_path_buf();
    fs::write(mnt.join("volatile"), b"gone after the cut").unwrap();
    let mut f = File::create(mnt.join("synced")).unwrap();
    f.write_all(b"survives").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" but not this").unwrap();
    drop(f);
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(mnt.join("node.log"))
        .unwrap();
    log.write_all(b"line 1\n").unwrap();
    log.write_all(b"line 2\n").unwrap();
    drop(log);
    // Reads before the cut see everything.
    assert_eq!(
        fs::read(mnt.join("synced")).unwrap(),
        b"survives but not this"
    );
    assert_eq!(fs::read(mnt.join("volatile")).unwrap().len(), 18);
    assert!(m.unsynced_bytes() > 0);

    let cut = m.power_cut(None).unwrap();
    assert_eq!(cut.files, 2, "{cut:?}");
    assert_eq!(fs::read(mnt.join("synced")).unwrap(), b"survives");
    // The name was durable at once, its data never synced.
    assert_eq!(fs::read(mnt.join("volatile")).unwrap(), b"");
    assert_eq!(
        fs::read_to_string(mnt.join("node.log")).unwrap(),
        "line 1\nline 2\n"
    );
    assert_eq!(m.unsynced_bytes(), 0);
}

#[test]
fn test_truncate_then_extend_reads_zeros_and_cut_restores() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let p = m.mountpoint().join("f");
    let mut f = File::create(&p).unwrap();
    f.write_all(&[7u8; 10_000]).unwrap();
    f.sync_all().unwrap();
    f.set_len(100).unwrap();
    f.write_all_at(b"x", 5000).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 5001);
    assert!(got[..100].iter().all(|&b| b == 7));
    assert!(
        got[100..5000].iter().all(|&b| b == 0),
        "stale bytes after truncate"
    );
    assert_eq!(got[5000], b'x');
    drop(f);
    m.power_cut(None).unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![7u8; 10_000]);

    // The same sequence synced is what the backing file holds afterwards.
    let f = File::options().write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    f.write_all_at(b"x", 5000).unwrap();
    f.sync_data().unwrap();
    drop(f);
    m.power_cut(None).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 5001);
    assert!(got[100..5000].iter().all(|&b| b == 0));
}

#[test]
fn test_torn_write_persists_whole_sectors_never_all() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let p = m.mountpoint().join("f");
    let f = File::create(&p).unwrap();
    f.write_all_at(&[0u8; 8192], 0).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 4096).unwrap();
    drop(f);
    let mut kept = Vec::new();
    for seed in 0..8 {
        let cut = m.power_cut(Some(seed)).unwrap();
        let (path, offset, persisted, of) = cut.torn.expect("a torn write");
        assert_eq!(
            (path.file_name().unwrap(), offset, of),
            (OsStr::new("f"), 4096, 4096)
        );
        assert!(persisted < of && persisted % SECTOR == 0, "{persisted}");
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), 8192);
        assert!(
            got[..4096].iter().all(|&b| b == 0),
            "the earlier write reached the disk"
        );
        let twos = got[4096..].iter().take_while(|&&b| b == 2).count() as u64;
        assert!(twos >= persisted, "seed {seed}: {twos} < {persisted}");
        kept.push(persisted);
        // Write the same again for the next seed.
        let f = File::options().write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 4096], 4096).unwrap();
        f.sync_all().unwrap();
        f.write_all_at(&[2u8; 4096], 4096).unwrap();
    }
    kept.sort();
    kept.dedup();
    assert!(kept.len() > 1, "every seed tore the same way: {kept:?}");
}

#[test]
fn test_scratch_files_are_never_the_torn_write() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let wal = m.mountpoint().join("raft.db-wal");
    let shm = m.mountpoint().join("raft.db-shm");
    File::create(&wal)
        .unwrap()
        .write_all_at(&[3u8; 4096], 0)
        .unwrap();
    File::create(&shm)
        .unwrap()
        .write_all_at(&[4u8; 4096], 0)
        .unwrap();
    let cut = m.power_cut(Some(1)).unwrap();
    let (path, ..) = cut.torn.expect("a torn write");
    assert_eq!(path.file_name().unwrap(), "raft.db-wal");
}

#[test]
fn test_rename_over_keeps_only_synced_bytes() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let mnt = m.mountpoint().to_path_buf();
    fs::create_dir(mnt.join("snapshots")).unwrap();
    let staged = mnt.join("snapshots/installing.db");
    let current = mnt.join("snapshots/current.db");
    fs::write(&current, b"old").unwrap();
    File::open(&current).unwrap().sync_all().unwrap();
    // Synced before the rename: survives.
    let f = File::create(&staged).unwrap();
    f.write_all_at(b"new and synced", 0).unwrap();
    f.sync_all().unwrap();
    fs::rename(&staged, &current).unwrap();
    // Not synced before the rename: the name moves, the bytes do not.
    fs::write(mnt.join("snapshots/other"), b"never synced").unwrap();
    fs::rename(mnt.join("snapshots/other"), mnt.join("snapshots/moved")).unwrap();
    m.power_cut(None).unwrap();
    assert_eq!(fs::read(&current).unwrap(), b"new and synced");
    assert!(!staged.exists());
    assert_eq!(fs::read(mnt.join("snapshots/moved")).unwrap(), b"");
}

#[test]
fn test_rename_exchange_swaps_names_and_unsynced_data_stays_with_its_inode() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let (a, b) = (m.mountpoint().join("a"), m.mountpoint().join("b"));
    let fa = File::create(&a).unwrap();
    fa.write_all_at(b"synced a", 0).unwrap();
    fa.sync_all().unwrap();
    fs::write(&b, b"unsynced b").unwrap();
    let (ca, cb) = (
        CString::new(a.as_os_str().as_bytes()).unwrap(),
        CString::new(b.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: renameat2(2) with valid C strings.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    assert_eq!(fs::read(&a).unwrap(), b"unsynced b");
    assert_eq!(fs::read(&b).unwrap(), b"synced a");
    fa.write_all_at(b"S", 0).unwrap();
    fa.sync_all().unwrap();
    m.power_cut(None).unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"");
    assert_eq!(fs::read(&b).unwrap(), b"Synced a");
}

#[test]
fn test_full_backing_answers_enospc_at_write() {
    let Some((dir, m)) = mounted() else {
        return;
    };
    // A 1 MiB tmpfs as the disk.
    let backing = dir.path().join("small");
    fs::create_dir(&backing).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&backing)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t tmpfs failed");
    drop(m);
    let small = Mount::new(&backing, &dir.path().join("mnt2"), Options::default()).unwrap();
    let f = File::create(small.mountpoint().join("big")).unwrap();
    let chunk = vec![9u8; 64 << 10];
    let mut written = 0u64;
    let e = loop {
        match f.write_all_at(&chunk, written) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(written < 4 << 20, "no ENOSPC after {written} bytes");
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    drop(f);
    drop(small);
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&backing)
        .status();
}

#[test]
fn test_sqlite_wal_full_survives_off_does_not() {
    let Some((_dir, mut m)) = mounted() else {
        return;
    };
    let db = m.mountpoint().join("raft.db");
    let count = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        for i in 0..200 {
            c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        // A second connection reads through the shared-memory WAL index (-shm, mmap).
        let reader = rusqlite::Connection::open(&db).unwrap();
        assert_eq!(count(&reader), 200);
        c.pragma_update(None, "synchronous", "OFF").unwrap();
        for i in 0..50 {
            c.execute("INSERT INTO t VALUES (?1)", [1000 + i]).unwrap();
        }
        assert_eq!(count(&reader), 250);
        // The power goes out with both connections open (as under kill -9).
        m.power_cut(Some(3)).unwrap();
    }
    let c = rusqlite::Connection::open(&db).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(
        count(&c),
        200,
        "synchronous=FULL commits kept, OFF ones lost"
    );
}
