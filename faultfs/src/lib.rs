#![doc = include_str!("../README.md")]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// Overlay page size; also what a torn write is cut within.
pub const PAGE: u64 = 4096;
/// The unit a torn write persists whole (a disk sector).
pub const SECTOR: u64 = 512;

/// How long the kernel may cache names and attributes. Only faultfs changes the files, so a
/// short TTL is coherent; a power cut remounts, which drops the caches anyway.
const TTL: Duration = Duration::from_secs(1);

/// What a mount does besides the model above.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// File names (last path component) written straight through to the backing directory.
    pub durable_names: Vec<String>,
    /// Name endings of scratch files whose content after a cut does not matter (SQLite's
    /// `-shm` index, rebuilt on open): a tear never picks their writes, so it lands where it
    /// tests something.
    pub scratch_suffixes: Vec<String>,
}

/// What a power cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// Files that had unsynced data or size changes.
    pub files: usize,
    /// Unsynced bytes dropped (whole overlay pages).
    pub bytes: u64,
    /// `Some((path, offset, persisted, of))` when the last unsynced write was torn: `persisted`
    /// of its `of` bytes at `offset` reached the disk.
    pub torn: Option<(PathBuf, u64, u64, u64)>,
}

/// A mounted faultfs. Dropping it unmounts without syncing anything (a cut without tear).
pub struct Mount {
    backing: PathBuf,
    mountpoint: PathBuf,
    options: Options,
    state: Arc<State>,
    session: Option<BackgroundSession>,
}

impl Mount {
    /// Mounts faultfs over `backing` (an existing directory) at `mountpoint` (created if
    /// missing).
    pub fn new(backing: &Path, mountpoint: &Path, options: Options) -> io::Result<Mount> {
        fs::create_dir_all(mountpoint)?;
        let backing = fs::canonicalize(backing)?;
        let (state, session) = mount(&backing, mountpoint, &options)?;
        Ok(Mount {
            backing,
            mountpoint: mountpoint.to_path_buf(),
            options,
            state,
            session: Some(session),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Bytes written but not yet fsync'd (whole overlay pages).
    pub fn unsynced_bytes(&self) -> u64 {
        self.state.lock().pending_bytes()
    }

    /// The power goes out: everything not fsync'd is lost (with `tear = Some(seed)`, part of
    /// the last unsynced write persists), then the filesystem comes back empty-cached at the
    /// same place. Whatever still has files open on the mount gets `EIO` from then on: kill
    /// the processes using it first.
    pub fn power_cut(&mut self, tear: Option<u64>) -> io::Result<Cut> {
        let cut = self.state.cut(tear);
        self.unmount();
        let (state, session) = mount(&self.backing, &self.mountpoint, &self.options)?;
        self.state = state;
        self.session = Some(session);
        Ok(cut)
    }

    fn unmount(&mut self) {
        if let Some(s) = self.session.take() {
            // A lazy unmount: it succeeds even while a killed process's files are closing.
            if let Ok(p) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
                // SAFETY: umount2(2) on a path we mounted, with a valid C string.
                unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
            drop(s);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.state.cut(None);
        self.unmount();
    }
}

fn mount(
    backing: &Path,
    mountpoint: &Path,
    options: &Options,
) -> io::Result<(Arc<State>, BackgroundSession)> {
    let state = Arc::new(State::new(backing, options));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("faultfs".into()),
    ];
    config.n_threads = Some(2);
    let session = fuser::spawn_mount(FaultFs(state.clone()), mountpoint, &config)?;
    Ok((state, session))
}

/// The shared state behind one mount (one "boot" of the disk).
struct State {
    inner: Mutex<Inner>,
}

/// One file's unsynced data.
#[derive(Default)]
struct Overlay {
    /// Whole pages, loaded from the backing file on first write.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The file's size as programs see it.
    size: u64,
    /// Backing bytes at or beyond this offset are stale (a truncation not yet synced).
    floor: u64,
}

struct Handle {
    ino: u64,
    file: File,
}

struct Inner {
    /// Set by a power cut: every later request fails with `EIO`, nothing reaches the disk.
    dead: bool,
    backing: PathBuf,
    durable: Vec<OsString>,
    scratch: Vec<String>,
    /// FUSE inode -> backing path.
    paths: HashMap<u64, PathBuf>,
    overlays: HashMap<u64, Overlay>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// (inode, offset, first page's worth of bytes) of the last write not yet synced.
    last_write: Option<(u64, u64, Vec<u8>)>,
}

impl State {
    fn new(backing: &Path, options: &Options) -> State {
        let mut paths = HashMap::new();
        paths.insert(INodeNo::ROOT.0, backing.to_path_buf());
        State {
            inner: Mutex::new(Inner {
                dead: false,
                backing: backing.to_path_buf(),
                durable: options.durable_names.iter().map(OsString::from).collect(),
                scratch: options.scratch_suffixes.clone(),
                paths,
                overlays: HashMap::new(),
                handles: HashMap::new(),
                next_fh: 1,
                last_write: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every overlay; with `tear`, persists part of the last unsynced write first.
    fn cut(&self, tear: Option<u64>) -> Cut {
        let mut s = self.lock();
        if s.dead {
            return Cut::default();
        }
        s.dead = true;
        let mut cut = Cut {
            files: s.overlays.len(),
            bytes: s.pending_bytes(),
            torn: None,
        };
        if let (Some(seed), Some((ino, offset, data))) = (tear, s.last_write.take())
            && let Some(path) = s.paths.get(&ino).cloned()
        {
            let sectors = (data.len() as u64).div_ceil(SECTOR);
            // Never all of it: 0..sectors whole sectors reach the disk.
            let keep = (splitmix(seed) % sectors.max(1)) * SECTOR;
            let keep = keep.min(data.len() as u64);
            if keep > 0
                && let Ok(f) = OpenOptions::new().write(true).open(&path)
            {
                let _ = f.write_all_at(&data[..keep as usize], offset);
            }
            cut.torn = Some((path, offset, keep, data.len() as u64));
        }
        s.overlays.clear();
        s.handles.clear();
        cut
    }
}

/// One SplitMix64 output: the tear's size from its seed, stable across dependency updates.
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// FUSE inode of a backing file: its own inode number, shifted past the root's 1.
fn ino_of(m: &Metadata) -> u64 {
    m.ino() + 2
}

fn kind_of(m: &Metadata) -> FileType {
    FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile)
}

fn attr_of(ino: u64, m: &Metadata, size: Option<u64>) -> FileAttr {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let size = size.unwrap_or(m.size());
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: PAGE as u32,
        flags: 0,
    }
}

/// Reads `buf.len()` bytes at `offset`, zero-filling past the end of the file; returns how
/// many bytes the file had.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

impl Inner {
    fn pending_bytes(&self) -> u64 {
        self.overlays
            .values()
            .map(|o| o.pages.len() as u64 * PAGE)
            .sum()
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        self.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn is_durable(&self, ino: u64) -> bool {
        self.paths
            .get(&ino)
            .and_then(|p| p.file_name())
            .is_some_and(|n| self.durable.iter().any(|d| d == n))
    }

    fn is_scratch(&self, ino: u64) -> bool {
        self.paths
            .get(&ino)
            .and_then(|p| p.file_name())
            .is_some_and(|n| {
                let n = n.to_string_lossy();
                self.scratch.iter().any(|s| n.ends_with(s.as_str()))
            })
    }

    /// Records `path` under its inode and returns its attributes (as programs see them).
    fn remember(&mut self, path: PathBuf) -> Result<FileAttr, Errno> {
        let m = fs::symlink_metadata(&path).map_err(err)?;
        let ino = ino_of(&m);
        self.paths.insert(ino, path);
        Ok(self.attr(ino, &m))
    }

    fn attr(&self, ino: u64, m: &Metadata) -> FileAttr {
        attr_of(ino, m, self.overlays.get(&ino).map(|o| o.size))
    }

    /// The overlay of `ino`, created from the backing file's current size.
    fn overlay(&mut self, ino: u64, file: &File) -> Result<&mut Overlay, Errno> {
        use std::collections::hash_map::Entry;
        match self.overlays.entry(ino) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let size = file.metadata().map_err(err)?.len();
                Ok(e.insert(Overlay {
                    pages: BTreeMap::new(),
                    size,
                    floor: size,
                }))
            }
        }
    }

    /// Drops what is known about a name that is going away (unlink, rename over it).
    fn forget_path(&mut self, path: &Path) {
        if let Ok(m) = fs::symlink_metadata(path) {
            let ino = ino_of(&m);
            if m.nlink() <= 1 {
                self.overlays.remove(&ino);
                if self.last_write.as_ref().is_some_and(|w| w.0 == ino) {
                    self.last_write = None;
                }
            }
        }
    }

    /// Free bytes of the backing filesystem.
    fn backing_free(&self) -> u64 {
        let Ok(p) = CString::new(self.backing.as_os_str().as_bytes()) else {
            return u64::MAX;
        };
        // SAFETY: statvfs(2) fills a zeroed struct we own.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut st) } != 0 {
            return u64::MAX;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }

    fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        let file = self
            .handles
            .get(&fh)
            .ok_or(Errno::EBADF)?
            .file
            .try_clone()
            .map_err(err)?;
        if self.is_durable(ino) {
            file.write_all_at(data, offset).map_err(err)?;
            return Ok(data.len() as u32);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset + data.len() as u64;
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        let new_pages = {
            let o = self.overlay(ino, &file)?;
            (first..=last).filter(|p| !o.pages.contains_key(p)).count() as u64
        };
        if new_pages > 0 && self.pending_bytes() + new_pages * PAGE > self.backing_free() {
            return Err(Errno::ENOSPC);
        }
        let o = self.overlay(ino, &file)?;
        for p in first..=last {
            if !o.pages.contains_key(&p) {
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                let valid = o.floor.saturating_sub(p * PAGE).min(PAGE) as usize;
                read_full(&file, &mut page[..valid], p * PAGE).map_err(err)?;
                o.pages.insert(p, page);
            }
            let page = o.pages.get_mut(&p).expect("loaded above");
            let from = offset.max(p * PAGE);
            let to = end.min((p + 1) * PAGE);
            page[(from - p * PAGE) as usize..(to - p * PAGE) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        }
        o.size = o.size.max(end);
        if !self.is_scratch(ino) {
            let first_page = ((first + 1) * PAGE - offset).min(data.len() as u64) as usize;
            self.last_write = Some((ino, offset, data[..first_page].to_vec()));
        }
        Ok(data.len() as u32)
    }

    fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        let file = &self.handles.get(&fh).ok_or(Errno::EBADF)?.file;
        let Some(o) = self.overlays.get(&ino) else {
            let mut buf = vec![0u8; size as usize];
            let n = read_full(file, &mut buf, offset).map_err(err)?;
            buf.truncate(n);
            return Ok(buf);
        };
        let end = (offset + u64::from(size)).min(o.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let backed = o.floor.clamp(offset, end);
        read_full(file, &mut buf[..(backed - offset) as usize], offset).map_err(err)?;
        for (&p, page) in o.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let from = offset.max(p * PAGE);
            let to = end.min((p + 1) * PAGE);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - p * PAGE) as usize..(to - p * PAGE) as usize]);
        }
        Ok(buf)
    }

    fn truncate(&mut self, ino: u64, file: &File, size: u64) -> Result<(), Errno> {
        if self.is_durable(ino) {
            return file.set_len(size).map_err(err);
        }
        let o = self.overlay(ino, file)?;
        if size < o.size {
            o.pages.retain(|&p, _| p * PAGE < size);
            if let Some(page) = o.pages.get_mut(&(size / PAGE)) {
                page[(size % PAGE) as usize..].fill(0);
            }
            o.floor = o.floor.min(size);
        }
        o.size = size;
        Ok(())
    }

    /// Writes `ino`'s overlay to the backing file: now it survives a cut.
    fn sync(&mut self, ino: u64, file: &File) -> Result<(), Errno> {
        if self.dead {
            return Err(Errno::EIO);
        }
        let Some(o) = self.overlays.remove(&ino) else {
            return Ok(());
        };
        let len = file.metadata().map_err(err)?.len();
        if o.floor < len {
            file.set_len(o.floor).map_err(err)?;
        }
        for (&p, page) in &o.pages {
            let n = o.size.saturating_sub(p * PAGE).min(PAGE) as usize;
            file.write_all_at(&page[..n], p * PAGE).map_err(err)?;
        }
        file.set_len(o.size).map_err(err)?;
        if self.last_write.as_ref().is_some_and(|w| w.0 == ino) {
            self.last_write = None;
        }
        Ok(())
    }

    fn open(&mut self, ino: u64, path: &Path, flags: i32, create: Option<u32>) -> io::Result<u64> {
        let mut opts = OpenOptions::new();
        // Every handle reads and writes the backing file: a partial page write loads the rest
        // of the page first, and fsync(2) on a read-only descriptor still writes the overlay.
        opts.read(true).write(true);
        if let Some(mode) = create {
            opts.create(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                opts.create_new(true);
            }
        }
        let passed = flags & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let passed = passed & !(libc::O_APPEND | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC);
        let file = match opts.custom_flags(passed).open(path) {
            Err(_) if flags & libc::O_ACCMODE == libc::O_RDONLY && create.is_none() => {
                // A file we may only read (mode 0444): then it has nothing to sync either.
                File::open(path)?
            }
            r => r?,
        };
        let ino = match create {
            Some(_) => ino_of(&file.metadata()?),
            None => ino,
        };
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, file });
        Ok(fh)
    }
}

struct FaultFs(Arc<State>);

impl FaultFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock()
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        match s.child(parent, name).and_then(|p| s.remember(p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.lock();
        let m = match fh.and_then(|fh| s.handles.get(&fh.0)) {
            Some(h) if !s.dead => h.file.metadata().map_err(err),
            _ => s
                .path(ino)
                .and_then(|p| fs::symlink_metadata(p).map_err(err)),
        };
        match m {
            Ok(m) => reply.attr(&TTL, &s.attr(ino.0, &m)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let result = (|| {
            let path = s.path(ino)?;
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(err)?;
            }
            if let Some(size) = size {
                let file = match fh.and_then(|fh| s.handles.get(&fh.0)) {
                    Some(h) => h.file.try_clone().map_err(err)?,
                    None => OpenOptions::new().write(true).open(&path).map_err(err)?,
                };
                s.truncate(ino.0, &file, size)?;
            }
            if atime.is_some() || mtime.is_some() {
                let f = File::open(&path).map_err(err)?;
                let to = |t: Option<TimeOrNow>| match t {
                    Some(TimeOrNow::SpecificTime(t)) => Some(t),
                    Some(TimeOrNow::Now) => Some(SystemTime::now()),
                    None => None,
                };
                let mut times = fs::FileTimes::new();
                if let Some(t) = to(atime) {
                    times = times.set_accessed(t);
                }
                if let Some(t) = to(mtime) {
                    times = times.set_modified(t);
                }
                f.set_times(times).map_err(err)?;
            }
            let m = fs::symlink_metadata(&path).map_err(err)?;
            Ok(s.attr(ino.0, &m))
        })();
        match result {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = s.child(parent, name).and_then(|p| {
            fs::DirBuilder::new()
                .mode(mode & !umask)
                .create(&p)
                .map_err(err)?;
            s.remember(p)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let r = s.child(parent, name).and_then(|p| {
            s.forget_path(&p);
            fs::remove_file(&p).map_err(err)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = self.lock();
        match s
            .child(parent, name)
            .and_then(|p| fs::remove_dir(p).map_err(err))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && fs::symlink_metadata(&to).is_ok() {
                return Err(Errno::EEXIST);
            }
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            if !(flags - RenameFlags::RENAME_NOREPLACE - RenameFlags::RENAME_EXCHANGE).is_empty() {
                return Err(Errno::EINVAL);
            }
            if exchange {
                // Both names stay, each on the other's inode (a file swap).
                let c =
                    |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL);
                let (a, b) = (c(&from)?, c(&to)?);
                // SAFETY: renameat2(2) with valid C strings that outlive the call.
                let rc = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                if rc != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
            } else {
                s.forget_path(&to);
                fs::rename(&from, &to).map_err(err)?;
            }
            // Re-point the moved inodes and, for a directory, everything below it.
            let moved = |p: &Path, a: &Path, b: &Path| {
                p.strip_prefix(a).ok().map(|rest| {
                    if rest.as_os_str().is_empty() {
                        b.to_path_buf()
                    } else {
                        b.join(rest)
                    }
                })
            };
            for p in s.paths.values_mut() {
                if let Some(q) = moved(p, &from, &to) {
                    *p = q;
                } else if exchange && let Some(q) = moved(p, &to, &from) {
                    *p = q;
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let r = s
            .path(ino)
            .and_then(|p| s.open(ino.0, &p, flags.0, None).map_err(err));
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let path = s.child(parent, name)?;
            let existed = fs::symlink_metadata(&path).is_ok();
            let fh = s.open(0, &path, flags, Some(mode & !umask)).map_err(err)?;
            let ino = s.handles[&fh].ino;
            if !existed {
                // A new file may reuse the inode number of one deleted earlier.
                s.overlays.remove(&ino);
            } else if flags & libc::O_TRUNC != 0 {
                let file = s.handles[&fh].file.try_clone().map_err(err)?;
                s.truncate(ino, &file, 0)?;
            }
            let attr = s.remember(path)?;
            Ok((attr, fh))
        })();
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.lock().read(ino.0, fh.0, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.lock().write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a sync point.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = match s.handles.get(&fh.0).map(|h| h.file.try_clone()) {
            Some(Ok(file)) => s.sync(ino.0, &file),
            Some(Err(e)) => Err(err(e)),
            None => Err(Errno::EBADF),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.lock().path(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let dir = s.path(ino)?;
            let mut entries = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ];
            for e in fs::read_dir(&dir).map_err(err)? {
                let e = e.map_err(err)?;
                let m = e.metadata().map_err(err)?;
                let child = ino_of(&m);
                s.paths.insert(child, e.path());
                entries.push((child, kind_of(&m), e.file_name()));
            }
            Ok(entries)
        })();
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names are durable as soon as they change.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.lock();
        let free = s.backing_free().saturating_sub(s.pending_bytes()) / PAGE;
        reply.statfs(
            free * 2,
            free,
            free,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.lock().path(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests;
