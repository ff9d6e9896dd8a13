//! The destination side: directories created with the configured mode and never through a
//! symlink that leads outside the download folder; temporary names beside the final path;
//! fsync of file and directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dcflow_core::PathEscapes;

use crate::error::TransferError;

/// Creates (as needed) the directories leading to `root/rel[..last]` with `dir_mode`, and
/// returns the parent directory. An existing symlink on the way is followed only if it stays
/// inside `root`.
pub fn prepare_parent(
    root: &Path,
    rel: &[String],
    dir_mode: u32,
) -> Result<PathBuf, TransferError> {
    if !root.is_dir() {
        std::fs::create_dir_all(root)
            .map_err(TransferError::io("cannot create download folder", root))?;
        if let Some(up) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(up)?;
        }
    }
    // Resolved only when a symlink is met (a few syscalls per file otherwise).
    let canonical_root = || {
        root.canonicalize()
            .map_err(TransferError::io("cannot resolve download folder", root))
    };
    let escapes = |why| {
        TransferError::PathEscapes(PathEscapes {
            path: rel.join("/"),
            why,
        })
    };
    let (_, dirs) = rel
        .split_last()
        .ok_or_else(|| escapes("escapes the download folder: empty path"))?;
    let mut current = root.to_path_buf();
    for part in dirs {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = current.canonicalize().map_err(|_| {
                    escapes("escapes the download folder: a dangling symlink on the way")
                })?;
                if !target.starts_with(canonical_root()?) || !target.is_dir() {
                    return Err(escapes(
                        "escapes the download folder: a symlinked directory points outside it",
                    ));
                }
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TransferError::Io {
                    what: "not a directory",
                    path: current,
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&current) {
                Ok(()) => {
                    // Explicit chmod: mkdir's mode is masked by umask and may drop setgid.
                    std::fs::set_permissions(&current, std::fs::Permissions::from_mode(dir_mode))
                        .map_err(TransferError::io("cannot set permissions on", &current))?;
                    // The new folder's entry in its parent: durable before a file that is
                    // recorded as copied can depend on it.
                    sync_dir(current.parent().unwrap_or(root))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(TransferError::io("cannot create directory", &current)(e)),
            },
            Err(e) => return Err(TransferError::io("cannot inspect", &current)(e)),
        }
    }
    Ok(current)
}

/// A fresh temporary name beside `final_name` for one attempt: hidden, unique (64 random
/// bits, so that two copiers of one file, or a dCache file that happens to be called
/// `.x.dcflow-part`, never share it), and short enough for NAME_MAX.
pub fn part_name(final_name: &str) -> String {
    let nonce: u64 = rand::random();
    let candidate = format!(".{final_name}.{nonce:016x}.dcflow-part");
    if candidate.len() <= 255 {
        candidate
    } else {
        format!(".dcflow-{nonce:016x}.part")
    }
}

/// Whether `name` is a temporary name that [`part_name`] could have given `final_name`.
fn is_part_of(name: &str, final_name: &str) -> bool {
    let hex16 = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(nonce) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_prefix(final_name))
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.strip_suffix(".dcflow-part"))
    {
        return hex16(nonce);
    }
    name.strip_prefix(".dcflow-")
        .and_then(|n| n.strip_suffix(".part"))
        .is_some_and(hex16)
}

/// Creates the temporary file exclusively (`O_EXCL`: never an existing file, never through
/// a link) with the file mode applied; a name already taken gets a new nonce. `note` is told
/// each name *before* the file is created (the final path's lock records it), so that a
/// copier killed at any moment leaves no temporary file that the next holder does not know.
pub fn create_part(
    parent: &Path,
    final_name: &str,
    file_mode: u32,
    note: impl Fn(&Path),
) -> Result<(PathBuf, File), TransferError> {
    let mut tries = 0;
    loop {
        let path = parent.join(part_name(final_name));
        note(&path);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(file_mode)
            .open(&path)
        {
            Ok(file) => {
                file.set_permissions(std::fs::Permissions::from_mode(file_mode))
                    .map_err(TransferError::io("cannot set permissions on", &path))?;
                return Ok((path, file));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 3 => tries += 1,
            Err(e) => return Err(TransferError::io("cannot create temporary file", path)(e)),
        }
    }
}

/// The cross-process lock on one final path: a hidden lock file beside it, `flock`ed, so that
/// two copiers of one file (a `run` and a `replay`, or the old and new owner after a Kafka
/// rebalance, on one host or on several that share the file system) take turns, and the
/// second finds the first one's verified copy instead of copying again.
///
/// The file holds the temporary name of the attempt under way: a copier killed mid-transfer
/// leaves it behind, and the next holder removes that temporary file. The lock file is
/// removed when released (unlinked before it is unlocked; a waiter that then locks the
/// unlinked file notices and opens the path again).
pub struct FinalLock {
    /// `None` when the lock path is taken by something that is not dcflow's lock file (a
    /// dCache file of that name): it is then left alone and the copy goes on unlocked.
    file: Option<File>,
    path: PathBuf,
}

/// How often a copier waiting for another one's lock tries again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

impl FinalLock {
    /// The lock file's name for `final_name`.
    fn name(final_name: &str) -> String {
        let candidate = format!(".{final_name}.dcflow-lock");
        if candidate.len() <= 255 {
            candidate
        } else {
            use md5::{Digest, Md5};
            let digest: [u8; 16] = Md5::digest(final_name.as_bytes()).into();
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!(".dcflow-{hex}.lock")
        }
    }

    /// Whether a lock file of `destination` exists: a copier at work, or one that died and
    /// left the name of its temporary file in it. (Also true when the folder cannot be read.)
    pub fn exists(destination: &Path) -> bool {
        let (Some(parent), Some(name)) = (destination.parent(), destination.file_name()) else {
            return true;
        };
        let lock = parent.join(Self::name(&name.to_string_lossy()));
        !matches!(std::fs::symlink_metadata(lock), Err(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// Waits until no other copier holds `parent/final_name`.
    pub async fn acquire(parent: &Path, final_name: &str) -> Result<Self, TransferError> {
        let path = parent.join(Self::name(final_name));
        let mut waited = false;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .mode(0o600)
                .open(&path)
                .map_err(TransferError::io("cannot open the lock file", &path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !waited {
                        waited = true;
                        tracing::info!(lock = %path.display(), "another copier of this file is at work: waiting for it");
                    }
                    drop(file);
                    tokio::time::sleep(LOCK_POLL).await;
                    continue;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(TransferError::io("cannot lock", &path)(e))
                }
            }
            // The holder before us may have unlinked the file after we opened it.
            use std::os::unix::fs::MetadataExt;
            let ours = file
                .metadata()
                .map_err(TransferError::io("cannot inspect", &path))?;
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            let mut content = String::new();
            let readable = {
                use std::io::Read;
                (&file).read_to_string(&mut content).is_ok() && content.len() <= 255
            };
            let held = content.trim_end();
            if !readable || (!held.is_empty() && !is_part_of(held, final_name)) {
                tracing::warn!(path = %path.display(), "a file that is not dcflow's lock has the lock file's name: copying without the cross-process lock");
                return Ok(Self { file: None, path });
            }
            if !held.is_empty() {
                // A copier that died mid-attempt: its temporary file is garbage.
                match std::fs::remove_file(parent.join(held)) {
                    Ok(()) => tracing::info!(
                        part = held,
                        "removed the temporary file of an interrupted copy"
                    ),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(part = held, error = %e, "cannot remove the temporary file of an interrupted copy")
                    }
                }
            }
            return Ok(Self {
                file: Some(file),
                path,
            });
        }
    }

    /// Notes the temporary file of the attempt under way (removed by the next holder if this
    /// process dies before it is renamed or removed).
    pub fn holding(&self, part: &Path) {
        let Some(file) = &self.file else { return };
        let name = part
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        use std::os::unix::fs::FileExt;
        // A fresh lock file is empty: truncating it anyway made ext4 flush it at close (its
        // auto_da_alloc rule for truncated files), 10 % of a small-file copy's CPU in a profile
        // (bench/README.md).
        let empty = file.metadata().is_ok_and(|m| m.len() == 0);
        let _ = if empty { Ok(()) } else { file.set_len(0) }
            .and_then(|()| file.write_all_at(name.as_bytes(), 0));
    }
}

impl Drop for FinalLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = std::fs::remove_file(&self.path);
            drop(file); // unlocks
        }
    }
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), TransferError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(TransferError::io("cannot fsync directory", dir))
}

/// Removes the temporary file unless disarmed: an abandoned or failed attempt leaves nothing.
pub struct PartGuard {
    path: Option<PathBuf>,
}

impl PartGuard {
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }
    pub fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Renames into place and makes the renames durable with group commits of the directory's
/// fsync: a rename is durable once an fsync of its directory that started after it has
/// finished, so renames into one directory while an fsync runs share the next one (5,000
/// small files at 32 transfers: about 2,000 directory fsyncs instead of 5,000, by strace).
/// A file found already in place is made durable the same way ([`Publisher::make_durable`]),
/// once: the publisher remembers which file (device, inode, change time) each path held
/// before a finished fsync of its folder, and a path that still holds that same file needs
/// no other fsync (a redelivered upload of a file in place costs no journal commit).
#[derive(Default)]
pub struct Publisher {
    dirs: std::sync::Mutex<HashMap<PathBuf, Arc<DirSync>>>,
    fsyncs: AtomicU64,
    durable: std::sync::Mutex<HashMap<PathBuf, FileId>>,
}

/// Which file a path names: another file at the path (a rename, or a new file in a reused
/// inode) has another inode or a later change time. (A file deleted and another created in
/// the same inode within one tick of the change-time clock would look the same: its folder
/// would not be synced again; its bytes are still checked against dCache's checksum.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Paths remembered as durable at most; past it the memory starts again (each path then
/// costs one more folder fsync).
const DURABLE_MAX: usize = 65_536;

#[derive(Default)]
struct DirSync {
    /// Calls that asked for the directory to be durable (after a rename, or a file found in
    /// place) so far.
    asked: AtomicU64,
    /// How many of them the last finished fsync covers; held while an fsync runs.
    synced: tokio::sync::Mutex<u64>,
}

impl Publisher {
    pub async fn publish(&self, part: &Path, destination: &Path) -> Result<(), TransferError> {
        std::fs::rename(part, destination)
            .map_err(TransferError::io("cannot rename into place", destination))?;
        // What the path holds before the fsync starts (normally the file just renamed).
        let placed = std::fs::symlink_metadata(destination).ok();
        match destination.parent() {
            Some(dir) => self.sync_dir(dir).await?,
            None => return Ok(()),
        }
        if let Some(meta) = placed {
            self.remember(destination, &meta);
        }
        Ok(())
    }

    /// Makes durable the entry of a file found at `path` (`meta`, read before this call): a
    /// predecessor that crashed after its rename may not have synced the folder. Nothing to
    /// do when the path still holds the file it held before an fsync of its folder finished.
    pub async fn make_durable(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<(), TransferError> {
        let id = FileId::of(meta);
        if self.durable.lock().expect("publisher lock").get(path) == Some(&id) {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            self.sync_dir(dir).await?;
        }
        self.remember(path, meta);
        Ok(())
    }

    fn remember(&self, path: &Path, meta: &std::fs::Metadata) {
        let mut durable = self.durable.lock().expect("publisher lock");
        if durable.len() >= DURABLE_MAX {
            durable.clear();
        }
        durable.insert(path.to_owned(), FileId::of(meta));
    }

    /// Returns once an fsync of `dir` that started after this call has finished: every
    /// change to the folder's entries made before the call is then durable. Calls for one
    /// folder while an fsync runs share the next one.
    pub async fn sync_dir(&self, dir: &Path) -> Result<(), TransferError> {
        let state = self
            .dirs
            .lock()
            .expect("publisher lock")
            .entry(dir.to_owned())
            .or_default()
            .clone();
        let ticket = state.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let result = async {
            let mut synced = state.synced.lock().await;
            if *synced >= ticket {
                return Ok(()); // an fsync that started after our call has finished
            }
            // Every call counted so far came before this fsync starts.
            let upto = state.asked.load(Ordering::SeqCst);
            let d = dir.to_owned();
            tokio::task::spawn_blocking(move || File::open(&d).and_then(|f| f.sync_all()))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e.to_string())))
                .map_err(TransferError::io("cannot fsync directory", dir))?;
            *synced = upto;
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        .await;
        let mut dirs = self.dirs.lock().expect("publisher lock");
        // Forget directories nobody is publishing into (the map and this call hold it).
        if Arc::strong_count(&state) == 2 {
            dirs.remove(dir);
        }
        result
    }

    /// Directory fsyncs done so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}

/// Asks the kernel to start writing back what was written so far, so that the final fsync
/// of a large file does not have to write it all at once.
pub fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; SYNC_FILE_RANGE_WRITE only initiates writeback.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> Vec<String> {
        s.split('/').map(String::from).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn renames_during_an_fsync_share_the_next_one_and_all_are_published() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let publisher = Arc::new(Publisher::default());
        // An fsync of the directory is in progress (its lock held) while 50 renames happen.
        let state = publisher
            .dirs
            .lock()
            .unwrap()
            .entry(dir.clone())
            .or_default()
            .clone();
        let in_progress = state.synced.lock().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (dir, publisher) = (dir.clone(), publisher.clone());
            tasks.spawn(async move {
                let part = dir.join(format!(".f{i}.dcflow-part"));
                std::fs::write(&part, i.to_string()).unwrap();
                publisher.publish(&part, &dir.join(format!("f{i}"))).await
            });
        }
        while state.asked.load(Ordering::SeqCst) < 50 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(in_progress);
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(
            publisher.fsyncs(),
            1,
            "one fsync, started after all 50 renames"
        );
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 50, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with('f')), "{names:?}");
        drop(state);
        // A later rename gets an fsync of its own, and the directory is then forgotten.
        let part = dir.join(".late.dcflow-part");
        std::fs::write(&part, "late").unwrap();
        publisher.publish(&part, &dir.join("late")).await.unwrap();
        assert_eq!(publisher.fsyncs(), 2);
        assert!(publisher.dirs.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_file_in_place_costs_one_folder_fsync_until_the_path_holds_another() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let publisher = Publisher::default();
        let (found, copied) = (dir.join("found"), dir.join("copied"));
        std::fs::write(&found, "left by a predecessor").unwrap();
        for _ in 0..3 {
            let meta = std::fs::symlink_metadata(&found).unwrap();
            publisher.make_durable(&found, &meta).await.unwrap();
        }
        assert_eq!(publisher.fsyncs(), 1, "found three times, synced once");
        // A file this publisher renamed into place is known durable already.
        let part = dir.join(".copied.dcflow-part");
        std::fs::write(&part, "copied").unwrap();
        publisher.publish(&part, &copied).await.unwrap();
        let meta = std::fs::symlink_metadata(&copied).unwrap();
        publisher.make_durable(&copied, &meta).await.unwrap();
        assert_eq!(publisher.fsyncs(), 2, "the publish's own fsync, no other");
        // Another file renamed over the path: not the one seen before the fsync.
        let part = dir.join(".found.dcflow-part");
        std::fs::write(&part, "replaced").unwrap();
        std::fs::rename(&part, &found).unwrap();
        let meta = std::fs::symlink_metadata(&found).unwrap();
        publisher.make_durable(&found, &meta).await.unwrap();
        assert_eq!(
            publisher.fsyncs(),
            3,
            "a new file at the path is synced again"
        );
        publisher.make_durable(&found, &meta).await.unwrap();
        assert_eq!(publisher.fsyncs(), 3);
    }

    #[test]
    fn creates_directories_with_mode_and_refuses_outside_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("dl");
        let parent = prepare_parent(&root, &rel("a/b/f"), 0o2750).unwrap();
        assert_eq!(parent, root.join("a/b"));
        let mode = std::fs::metadata(root.join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o2750);

        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        let err = prepare_parent(&root, &rel("evil/f"), 0o755).unwrap_err();
        assert!(matches!(err, TransferError::PathEscapes(_)), "{err}");
        assert!(!err.is_retryable());

        std::os::unix::fs::symlink(root.join("a"), root.join("inside")).unwrap();
        assert!(prepare_parent(&root, &rel("inside/c/f"), 0o755).is_ok());
        assert!(root.join("a/c").is_dir());
    }

    #[test]
    fn part_names_fit_and_are_never_shared() {
        let name = part_name("f.fits");
        assert!(is_part_of(&name, "f.fits"), "{name}");
        assert_ne!(part_name("f.fits"), part_name("f.fits"), "one per attempt");
        assert!(part_name(&"x".repeat(250)).len() < 30);
        // Long names: their temporary name was the adler32 of the name, and `…1221` and
        // `…2112` have one adler32.
        let (a, b) = (
            format!("{}1221", "x".repeat(250)),
            format!("{}2112", "x".repeat(250)),
        );
        assert_eq!(
            adler2::adler32_slice(a.as_bytes()),
            adler2::adler32_slice(b.as_bytes())
        );
        assert_ne!(part_name(&a), part_name(&b));
        // A dCache file called `.x.dcflow-part` is not x's temporary file.
        assert_ne!(part_name("x"), ".x.dcflow-part");
        assert!(!is_part_of(".x.dcflow-part", "x"));
    }

    #[test]
    fn temporary_files_are_created_exclusively() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _fa) = create_part(tmp.path(), "f", 0o640, |_| {}).unwrap();
        let (b, _fb) = create_part(tmp.path(), "f", 0o640, |_| {}).unwrap();
        assert_ne!(
            a, b,
            "two attempts at one file never write into one temporary file"
        );
    }

    #[tokio::test]
    async fn the_final_path_lock_excludes_a_second_holder_and_cleans_up_after_a_dead_one() {
        let tmp = tempfile::tempdir().unwrap();
        let first = FinalLock::acquire(tmp.path(), "f").await.unwrap();
        let second = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            FinalLock::acquire(tmp.path(), "f"),
        )
        .await;
        assert!(
            second.is_err(),
            "a second copier waits while the first holds the lock"
        );
        // The first dies mid-attempt: its lock file names its temporary file, noted before
        // the file was created.
        let lock_path = tmp.path().join(".f.dcflow-lock");
        let (part, _f) = create_part(tmp.path(), "f", 0o640, |p| {
            assert!(!p.exists(), "noted before it is created");
            first.holding(p);
            assert_eq!(
                std::fs::read_to_string(&lock_path).unwrap(),
                p.file_name().unwrap().to_string_lossy()
            );
        })
        .unwrap();
        let mut first = first;
        // Its death: the file is closed (and so unlocked) without the unlink.
        drop(first.file.take());
        drop(first);
        assert!(lock_path.exists());
        let third = FinalLock::acquire(tmp.path(), "f").await.unwrap();
        assert!(
            !part.exists(),
            "the dead copier's temporary file is removed"
        );
        drop(third);
        assert!(!lock_path.exists(), "a released lock leaves no file");
        // A dCache file that has the lock file's name is not written into or removed.
        std::fs::write(&lock_path, "real data").unwrap();
        drop(FinalLock::acquire(tmp.path(), "f").await.unwrap());
        assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), "real data");
    }
}
