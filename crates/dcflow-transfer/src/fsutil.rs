//! The destination side: directories created with the configured mode and never through a
//! symlink that leads outside the download folder; temporary names beside the final path;
//! fsync of file and directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    let canonical_root = root
        .canonicalize()
        .map_err(TransferError::io("cannot resolve download folder", root))?;
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
                if !target.starts_with(&canonical_root) || !target.is_dir() {
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

/// Renames into place and makes the rename durable (fsync of the directory).
pub fn publish(part: &Path, destination: &Path) -> Result<(), TransferError> {
    std::fs::rename(part, destination)
        .map_err(TransferError::io("cannot rename into place", destination))?;
    if let Some(dir) = destination.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(TransferError::io("cannot fsync directory", dir))?;
    }
    Ok(())
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
