//! Large values in shared memory, mapped by readers on the same host
//! (issue 15).
//!
//! A worker encodes a large result straight into a file of its own
//! directory under the shared-memory root (`/dev/shm` by default,
//! `FLOTILLA_SHM_DIR`) and keeps it like any other kept value. A reader on
//! the same host that asks the data connection for it is told the file
//! instead of sent the bytes ([`crate::data`], protocol version 2), and maps
//! it read-only: no byte crosses a socket, and the reader's `Bytes` is the
//! mapping. Readers elsewhere (another host, a container with its own
//! `/dev/shm`, another user) are sent the bytes over TCP as before.
//!
//! - **Same host** is decided by a *domain*: the kernel's boot id with the
//!   device and inode of the root directory ([`domain`]). Two processes
//!   that see the same root directory of the same running kernel agree.
//! - **Space** is reserved with `posix_fallocate` before a file is mapped:
//!   a full tmpfs is an error at allocation (the value is then encoded into
//!   ordinary memory), never a fault while writing.
//! - **Lifetime.** A file is unlinked when the worker drops the value (the
//!   last clone of its `Bytes`); a reader's mapping keeps the pages until
//!   the reader drops its own `Bytes`. Each process' files live in its own
//!   directory, locked (`flock`) for the process' life; a worker that
//!   starts removes the directories whose lock is free (their process is
//!   gone, even killed), so a crash leaks memory only until the next
//!   worker starts on the host.
//!
//! # Safety
//!
//! Mapping a file is `unsafe` in Rust: if another process wrote to or
//! truncated the file under the mapping, a `&[u8]` would change under the
//! reader or a read past the new end would raise `SIGBUS`. This module is
//! the one place Flotilla maps files, and it holds by construction: the
//! files are created `0600` in a `0700` directory under a fresh name, their
//! space is reserved before they are mapped, they are written only by the
//! process that made them and only before they are frozen, and they are
//! unlinked, never truncated. What it cannot rule out is another process
//! of the same user (or root) tampering with the files on purpose; such a
//! process could already attach a debugger to the worker.
#![allow(unsafe_code)]

use bytes::Bytes;
use flotilla_proto::LargeBuffer;
use memmap2::{MmapMut, MmapOptions};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// The default shared-memory root.
pub const DEFAULT_ROOT: &str = "/dev/shm";

/// The prefix of every process directory under the root.
const DIR_PREFIX: &str = "flotilla-";

/// A directory without its lock file is left alone this long (its process
/// may be creating it).
const YOUNG: Duration = Duration::from_secs(60);

/// The same-host domain of `root`: the kernel's boot id, and the device and
/// inode of `root`. `None` when `root` is not a directory or the boot id
/// cannot be read (not Linux).
pub fn domain(root: &Path) -> Option<String> {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let meta = fs::metadata(root).ok().filter(|m| m.is_dir())?;
    Some(format!("{}:{}:{}", boot.trim(), meta.dev(), meta.ino()))
}

/// The process' shared memory: its root, its domain and, once it has made
/// a buffer, its own directory.
#[derive(Debug)]
pub struct Shm {
    root: PathBuf,
    domain: String,
    dir: Mutex<Option<Arc<OwnDir>>>,
    next: AtomicU64,
}

/// The directory of this process' files, locked while the process lives.
#[derive(Debug)]
struct OwnDir {
    path: PathBuf,
    _lock: File,
}

static SHM: OnceLock<Shm> = OnceLock::new();

/// Sets up this process' shared memory under `root` (once per process; a
/// later call returns the first one's, whatever its root): removes the
/// directories of processes that are gone and installs the large-value
/// allocator, so that [`flotilla_proto::Encoded`] writes values of
/// [`flotilla_proto::MEASURED_MIN`] bytes or more into mapped files. Errs
/// when `root` is not a usable directory.
pub fn install(root: &Path) -> io::Result<&'static Shm> {
    if let Some(shm) = SHM.get() {
        return Ok(shm);
    }
    let made = Shm::at(root)?;
    let removed = sweep(root);
    if removed > 0 {
        tracing::info!(removed, root = %root.display(), "removed the shared memory of processes that are gone");
    }
    let shm = SHM.get_or_init(|| made);
    flotilla_proto::set_large_alloc(Box::new(|len| match shm.alloc(len) {
        Ok(buffer) => Some(Box::new(buffer) as Box<dyn LargeBuffer>),
        Err(error) => {
            tracing::debug!(%error, len, "no shared memory for a large value: ordinary memory");
            None
        }
    }));
    Ok(shm)
}

/// Removes this process' directory if none of its values is left in it (a
/// worker calls it when it stops); a later buffer makes a new one.
pub fn leave() {
    let Some(shm) = SHM.get() else { return };
    let mut dir = shm.dir.lock().unwrap_or_else(|e| e.into_inner());
    if segments().is_empty() {
        if let Some(own) = dir.take() {
            let _ = fs::remove_dir_all(&own.path);
        }
    }
}

/// The process' shared memory, if [`install`] set it up.
pub fn installed() -> Option<&'static Shm> {
    SHM.get()
}

impl Shm {
    /// Shared memory under `root`, not installed (see [`install`] for the
    /// process'). Its directory is made with its first buffer. Errs when
    /// `root` is not a usable directory.
    pub fn at(root: &Path) -> io::Result<Shm> {
        let domain = domain(root).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a shared-memory directory here", root.display()),
            )
        })?;
        Ok(Shm {
            root: root.to_owned(),
            domain,
            dir: Mutex::new(None),
            next: AtomicU64::new(0),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The same-host domain of the root ([`domain`]).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// A writable buffer of `len` bytes in a new file of this process'
    /// directory, its space reserved.
    pub fn alloc(&self, len: usize) -> io::Result<ShmBuffer> {
        let dir = self.own_dir()?;
        let path = dir
            .path
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let made = (|| {
            reserve(&file, len)?;
            // SAFETY: the file is this process' own, new, 0600 in a 0700
            // directory, and its `len` bytes are reserved: nothing else
            // writes or truncates it (see the module's Safety section).
            unsafe { MmapOptions::new().len(len).populate().map_mut(&file) }
        })();
        match made {
            Ok(map) => Ok(ShmBuffer {
                map,
                path,
                _dir: dir,
            }),
            Err(error) => {
                let _ = fs::remove_file(&path);
                Err(error)
            }
        }
    }

    fn own_dir(&self) -> io::Result<Arc<OwnDir>> {
        let mut dir = self.dir.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = &*dir {
            return Ok(dir.clone());
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self
            .root
            .join(format!("{DIR_PREFIX}{}-{nanos:x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        let lock = File::create(path.join("lock"))?;
        try_lock(&lock)?;
        let made = Arc::new(OwnDir { path, _lock: lock });
        *dir = Some(made.clone());
        Ok(made)
    }
}

/// Reserves `len` bytes of `file` (`posix_fallocate`): allocates its pages
/// now, so that writing through a mapping cannot fault on a full tmpfs.
fn reserve(file: &File, len: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large"))?;
    // SAFETY: a plain system call on an open descriptor of ours.
    let errno = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match errno {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Takes the exclusive `flock` of `file` without waiting (held until the
/// file is closed, by the process' end at the latest).
fn try_lock(file: &File) -> io::Result<()> {
    // SAFETY: a plain system call on an open descriptor of ours.
    match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Removes, under `root`, the directories of processes that are gone (their
/// lock is free); returns how many.
pub fn sweep(root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_ours = name.to_str().is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let gone = match File::open(path.join("lock")) {
            Ok(lock) => try_lock(&lock).is_ok(),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > YOUNG),
        };
        if gone && fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A writable buffer in a mapped file of this process (see
/// [`Shm::alloc`]); frozen into a [`Bytes`] that unlinks the file when its
/// last clone goes.
#[derive(Debug)]
pub struct ShmBuffer {
    map: MmapMut,
    path: PathBuf,
    _dir: Arc<OwnDir>,
}

impl LargeBuffer for ShmBuffer {
    fn as_slice(&self) -> &[u8] {
        &self.map
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    fn freeze(self: Box<Self>, len: usize) -> Bytes {
        let ShmBuffer { map, path, _dir } = *self;
        segments().insert(map.as_ptr() as usize, (map.len(), path.clone()));
        Bytes::from_owner(Segment { map, path, _dir }).slice(..len)
    }
}

/// A frozen value's mapping (no longer written: the `Bytes` it backs only
/// reads); unlinks its file when dropped.
struct Segment {
    map: MmapMut,
    path: PathBuf,
    _dir: Arc<OwnDir>,
}

impl AsRef<[u8]> for Segment {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        segments().remove(&(self.map.as_ptr() as usize));
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::debug!(%error, path = %self.path.display(), "shared-memory file already gone");
        }
    }
}

/// This process' frozen segments: start address → (length, file).
fn segments() -> std::sync::MutexGuard<'static, BTreeMap<usize, (usize, PathBuf)>> {
    static SEGMENTS: Mutex<BTreeMap<usize, (usize, PathBuf)>> = Mutex::new(BTreeMap::new());
    SEGMENTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where `value` lies, if it lies inside one of this process' frozen
/// segments: the file and the offset of its first byte.
pub fn locate(value: &[u8]) -> Option<(PathBuf, u64)> {
    let start = value.as_ptr() as usize;
    let segments = segments();
    let (&segment_start, (len, path)) = segments.range(..=start).next_back()?;
    let end = start.checked_add(value.len())?;
    (end <= segment_start + len).then(|| (path.clone(), (start - segment_start) as u64))
}

/// Maps `len` bytes of the file at `path` from `offset`, read-only, as a
/// [`Bytes`]. Errs when the file is gone or shorter.
pub fn map(path: &Path, offset: u64, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > size) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{} has {size} bytes, {len} wanted from {offset}",
                path.display()
            ),
        ));
    }
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large"))?;
    // SAFETY: the file is a frozen value of a process of this user, which
    // neither writes nor truncates it again (see the module's Safety
    // section); the range was checked against its size.
    let map = unsafe {
        MmapOptions::new()
            .offset(offset)
            .len(len)
            .populate()
            .map(&file)?
    };
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A private root under the system's temporary directory, standing in
    /// for `/dev/shm`; removed on drop.
    pub(crate) struct Root(PathBuf);

    impl Root {
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn root() -> Root {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("flotilla-shm-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).unwrap();
        Root(path)
    }

    fn shm(root: &Path) -> Shm {
        Shm::at(root).unwrap()
    }

    #[test]
    fn a_frozen_buffer_is_located_mapped_by_path_and_unlinked_when_dropped() {
        let root = root();
        let shm = shm(root.path());
        let mut buffer = Box::new(shm.alloc(3 << 20).unwrap());
        for (i, byte) in buffer.as_mut_slice().iter_mut().enumerate() {
            *byte = i as u8;
        }
        let value = buffer.freeze((3 << 20) - 5);
        assert_eq!(value.len(), (3 << 20) - 5);
        let (path, offset) = locate(&value).expect("a segment of ours");
        assert_eq!(offset, 0);
        let part = value.slice(4096..8192);
        assert_eq!(locate(&part).unwrap(), (path.clone(), 4096));
        assert!(locate(&[1u8, 2, 3]).is_none(), "not in a segment");

        let mapped = map(&path, 0, value.len() as u64).unwrap();
        assert_eq!(mapped, value);
        let piece = map(&path, 4096, 4096).unwrap();
        assert_eq!(piece, part);
        let err = map(&path, 0, (3 << 20) + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        drop((value, part));
        assert!(!path.exists(), "unlinked with its last clone");
        assert_eq!(mapped[100], 100, "a reader's mapping outlives the file");
        assert!(map(&path, 0, 10).is_err());
    }

    #[test]
    fn the_directory_of_a_live_process_stays_and_a_dead_ones_goes() {
        let root = root();
        let live = shm(root.path());
        let _kept = Box::new(live.alloc(4096).unwrap()).freeze(4096);
        // A directory whose lock nobody holds: its process is gone.
        let dead = root.path().join(format!("{DIR_PREFIX}1-dead"));
        fs::create_dir(&dead).unwrap();
        File::create(dead.join("lock")).unwrap();
        File::create(dead.join("0")).unwrap();
        // Not ours: left alone.
        fs::create_dir(root.path().join("other")).unwrap();
        assert_eq!(sweep(root.path()), 1);
        assert!(!dead.exists());
        assert!(root.path().join("other").exists());
        let own = live.dir.lock().unwrap().clone().unwrap();
        assert!(own.path.exists(), "the live process' directory stays");
    }

    #[test]
    fn the_domain_names_the_directory_and_the_boot() {
        let root = root();
        let other = self::root();
        let here = domain(root.path()).unwrap();
        assert_eq!(domain(root.path()).unwrap(), here);
        assert_ne!(domain(other.path()).unwrap(), here);
        assert!(domain(&root.path().join("missing")).is_none());
    }
}
