//! A small tmpfs to use as a node's data dir, so a test can fill the node's disk.
//!
//! [`Tmpfs::fill`] writes a ballast file until the filesystem answers `ENOSPC`, leaving the
//! node no byte to write its log or database with; [`Tmpfs::free`] deletes the ballast. The
//! mount is detached (`umount -l`) on drop, so it goes even while a killed node's files are
//! still being closed. Needs root.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const BALLAST: &str = "ballast";

pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mb` MiB on `path` (created if missing).
    pub fn mount(path: &Path, size_mb: u64) -> io::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let c = |s: &[u8]| CString::new(s).map_err(io::Error::other);
        let src = c(b"tmpfs")?;
        let target = c(path.as_os_str().as_bytes())?;
        let opts = c(format!("size={size_mb}m,mode=0755").as_bytes())?;
        // SAFETY: mount(2) with valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes ballast until the filesystem is full; returns how many bytes it took.
    pub fn fill(&self) -> io::Result<u64> {
        let mut f = File::options()
            .create(true)
            .append(true)
            .open(self.path.join(BALLAST))?;
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        let mut size = chunk.len();
        // Big chunks first, then smaller ones to take the last free bytes.
        while size > 0 {
            match f.write(&chunk[..size]) {
                Ok(0) => size /= 2,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => size /= 2,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Deletes the ballast.
    pub fn free(&self) -> io::Result<()> {
        match std::fs::remove_file(self.path.join(BALLAST)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Free bytes left (statvfs).
    pub fn available(&self) -> io::Result<u64> {
        let p = CString::new(self.path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: statvfs(2) fills a zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(p) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: umount2(2) on the path we mounted.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fill_and_free() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("data");
        let t = Tmpfs::mount(&mnt, 2).unwrap();
        std::fs::write(mnt.join("a"), b"x").unwrap();
        let n = t.fill().unwrap();
        assert!(n > 1 << 20, "ballast only took {n} bytes");
        assert_eq!(t.available().unwrap(), 0);
        let err = std::fs::write(mnt.join("b"), vec![0u8; 8192]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        t.free().unwrap();
        assert!(t.available().unwrap() > 1 << 20);
        std::fs::write(mnt.join("b"), vec![0u8; 8192]).unwrap();
        drop(t);
        assert!(!mnt.join("a").exists(), "tmpfs still mounted after drop");
    }
}
