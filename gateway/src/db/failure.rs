//! Which SQLite failures belong to this node's environment, and what the storage layer does
//! with each (issue 26, item 3). Retrying the wrong one loses data, so the classes are few and
//! strict:
//!
//! - [`Failure::Hold`]: the disk is full (`SQLITE_FULL`), memory ran out (`SQLITE_NOMEM`), the
//!   file is busy or locked, or cannot be opened or written for a reason an operator fixes
//!   (read-only remount, permissions). Nothing was written: SQLite rolled the transaction
//!   back. The log writer and apply hold the work and retry it with back-off, never telling
//!   openraft (which treats any storage error as fatal); the node reports the stall in
//!   `/readyz`, `/status` and its log, and resumes by itself when the cause is gone.
//! - [`Failure::Exit`]: an I/O error (`SQLITE_IOERR`, a failed fsync among them). After a failed
//!   fsync Linux may drop the dirty pages and a later fsync reports success, so the same write
//!   is never tried again: the process ends (non-zero), systemd restarts it, and it recovers
//!   from what was durable.
//! - [`Failure::Corrupt`]: `SQLITE_CORRUPT` or `SQLITE_NOTADB`. The node stops with a clear
//!   error; the replica is repaired from the leader (a blank data dir gets a snapshot).
//! - [`Failure::Other`]: anything else, which storage code does not expect (a bug): an error
//!   to openraft, as before.
//!
//! A user statement's deterministic errors (syntax, constraints, the sandbox's refusals) never
//! get here: they are results ([`super::sandbox`]).

use rusqlite::{ErrorCode, ffi};

/// What to do with a failed storage operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Hold the work and retry it with back-off.
    Hold,
    /// End the process; never retry the same write.
    Exit,
    /// Stop with a clear error: the file is damaged.
    Corrupt,
    /// Not an environment failure.
    Other,
}

/// The class of `e` (see the module doc).
pub fn classify(e: &rusqlite::Error) -> Failure {
    let rusqlite::Error::SqliteFailure(f, _) = e else {
        return Failure::Other;
    };
    match f.code {
        ErrorCode::DiskFull
        | ErrorCode::OutOfMemory
        | ErrorCode::DatabaseBusy
        | ErrorCode::DatabaseLocked
        | ErrorCode::ReadOnly
        | ErrorCode::CannotOpen
        | ErrorCode::PermissionDenied
        | ErrorCode::FileLockingProtocolFailed => Failure::Hold,
        // An allocation inside the I/O layer failed: memory, not the disk.
        ErrorCode::SystemIoFailure if f.extended_code == ffi::SQLITE_IOERR_NOMEM => Failure::Hold,
        ErrorCode::SystemIoFailure | ErrorCode::NoLargeFileSupport => Failure::Exit,
        ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Failure::Corrupt,
        _ => Failure::Other,
    }
}

/// A one-line description of a held or fatal failure, for logs and `/status`.
pub fn describe(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg)) => {
            format!("{msg} ({:?}, code {})", f.code, f.extended_code)
        }
        rusqlite::Error::SqliteFailure(f, None) => {
            format!("{:?} (code {})", f.code, f.extended_code)
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn test_classes() {
        assert_eq!(classify(&err(ffi::SQLITE_FULL)), Failure::Hold);
        assert_eq!(classify(&err(ffi::SQLITE_NOMEM)), Failure::Hold);
        assert_eq!(classify(&err(ffi::SQLITE_BUSY)), Failure::Hold);
        assert_eq!(classify(&err(ffi::SQLITE_LOCKED)), Failure::Hold);
        assert_eq!(classify(&err(ffi::SQLITE_IOERR_NOMEM)), Failure::Hold);
        assert_eq!(classify(&err(ffi::SQLITE_IOERR)), Failure::Exit);
        assert_eq!(classify(&err(ffi::SQLITE_IOERR_FSYNC)), Failure::Exit);
        assert_eq!(classify(&err(ffi::SQLITE_IOERR_WRITE)), Failure::Exit);
        assert_eq!(classify(&err(ffi::SQLITE_CORRUPT)), Failure::Corrupt);
        assert_eq!(classify(&err(ffi::SQLITE_NOTADB)), Failure::Corrupt);
        assert_eq!(classify(&err(ffi::SQLITE_CONSTRAINT)), Failure::Other);
        assert_eq!(
            classify(&rusqlite::Error::QueryReturnedNoRows),
            Failure::Other
        );
    }

    /// A real full disk is `SQLITE_FULL`, not an I/O error: the classification the log writer
    /// and apply rely on. Uses a 1 MiB tmpfs when running as root, else is skipped.
    #[test]
    fn test_a_full_disk_is_held_not_fatal() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        let fs = c"tmpfs";
        // SAFETY: mount(2)/umount2(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                fs.as_ptr(),
                mnt.as_ptr(),
                fs.as_ptr(),
                0,
                c"size=1m".as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
        let conn = rusqlite::Connection::open(dir.path().join("db.sqlite")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t(b)").unwrap();
        let mut failed = None;
        for _ in 0..64 {
            if let Err(e) = conn.execute("INSERT INTO t VALUES(zeroblob(65536))", []) {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("a 1 MiB disk took 4 MiB");
        assert_eq!(classify(&e), Failure::Hold, "{e}");
        drop(conn);
        unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_DETACH) };
    }
}
