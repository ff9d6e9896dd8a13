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
    let (_, dirs) = rel.split_last().ok_or_else(|| escapes("empty path"))?;
    let mut current = root.to_path_buf();
    for part in dirs {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = current
                    .canonicalize()
                    .map_err(|_| escapes("a dangling symlink on the way"))?;
                if !target.starts_with(canonical_root()?) || !target.is_dir() {
                    return Err(escapes(
                        "a symlinked directory pointing outside the download folder",
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
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(TransferError::io("cannot create directory", &current)(e)),
            },
            Err(e) => return Err(TransferError::io("cannot inspect", &current)(e)),
        }
    }
    Ok(current)
}

/// The temporary name beside `final_name`: hidden, deterministic (a crashed attempt's leftover
/// is overwritten by the next attempt at the same file), and short enough for NAME_MAX.
pub fn part_name(final_name: &str) -> String {
    let candidate = format!(".{final_name}.dcflow-part");
    if candidate.len() <= 255 {
        candidate
    } else {
        format!(
            ".dcflow-{:08x}.part",
            adler2::adler32_slice(final_name.as_bytes())
        )
    }
}

/// Creates (truncating) the temporary file with the file mode applied.
pub fn create_part(path: &Path, file_mode: u32) -> Result<File, TransferError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(file_mode)
        .open(path)
        .map_err(TransferError::io("cannot create temporary file", path))?;
    file.set_permissions(std::fs::Permissions::from_mode(file_mode))
        .map_err(TransferError::io("cannot set permissions on", path))?;
    Ok(file)
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
#[derive(Default)]
pub struct Publisher {
    dirs: std::sync::Mutex<HashMap<PathBuf, Arc<DirSync>>>,
    fsyncs: AtomicU64,
}

#[derive(Default)]
struct DirSync {
    /// Renames done into the directory so far.
    renamed: AtomicU64,
    /// How many of them the last finished fsync covers; held while an fsync runs.
    synced: tokio::sync::Mutex<u64>,
}

impl Publisher {
    pub async fn publish(&self, part: &Path, destination: &Path) -> Result<(), TransferError> {
        std::fs::rename(part, destination)
            .map_err(TransferError::io("cannot rename into place", destination))?;
        let Some(dir) = destination.parent() else {
            return Ok(());
        };
        let state = self
            .dirs
            .lock()
            .expect("publisher lock")
            .entry(dir.to_owned())
            .or_default()
            .clone();
        let ticket = state.renamed.fetch_add(1, Ordering::SeqCst) + 1;
        let result = async {
            let mut synced = state.synced.lock().await;
            if *synced >= ticket {
                return Ok(()); // an fsync that started after our rename has finished
            }
            // Every rename counted so far happened before this fsync starts.
            let upto = state.renamed.load(Ordering::SeqCst);
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
        while state.renamed.load(Ordering::SeqCst) < 50 {
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
    fn part_names_fit() {
        assert_eq!(part_name("f.fits"), ".f.fits.dcflow-part");
        assert!(part_name(&"x".repeat(250)).len() < 30);
    }
}
