//! The `unpack` step: tar, tar.gz and zip archives, streamed entry by entry into a temporary
//! directory next to the destination, then published with one rename.
//!
//! Nothing may land outside the directory: entries with absolute paths or `..` are refused
//! (zip-slip), a symbolic link must point down the tree (relative, no `..`), hard links,
//! devices and FIFOs are
//! refused, and every file is created only after its parent directory, resolved on disk, is
//! checked to lie inside the tree. A refused entry fails the whole step and removes the
//! temporary directory: nothing is published.
//!
//! Limits (`maxbytes`, `maxfiles`, `maxratio`) stop an archive bomb before it fills the file
//! system. The temporary directory has a new name for each attempt and is created exclusively:
//! two unpackers of one archive never share it, and a folder that only looks like one (a
//! dCache folder of that name) is never removed. Every folder of the tree is fsynced before
//! the tree is renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use std::cell::{Cell, RefCell};

use dcflow_core::workflow::{ArchiveFormat, UnpackLimits};
use dcflow_core::Template;
use dcflow_transfer::engine::human_bytes;
use tracing::info;

use super::{relative_destination, Context as StepContext};
use crate::pipeline::Pipeline;

/// Why an archive was not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?} refused: {why}")]
    Refused { entry: String, why: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "cannot tell the archive format of {0:?}: set format = \"tar\", \"tar.gz\" or \"zip\""
    )]
    UnknownFormat(String),
    #[error("not a readable zip archive: {0}")]
    Zip(String),
    #[error("{0}: not unpacked (an archive bomb?); raise the step's limit if it is expected")]
    Limit(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UnpackError {
    let what = what.into();
    move |source| UnpackError::Io { what, source }
}

/// What was unpacked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
    /// The destination existed already (published by an earlier delivery): nothing was done.
    pub already: bool,
}

/// Unpacks `archive` into `destination` (which must not exist yet, else it is taken as done).
pub fn unpack(
    archive: &Path,
    format: ArchiveFormat,
    destination: &Path,
    dir_mode: u32,
    file_mode: u32,
    limits: UnpackLimits,
) -> Result<Unpacked, UnpackError> {
    if destination.is_dir() {
        return Ok(Unpacked {
            already: true,
            ..Default::default()
        });
    }
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let format = format
        .of(&name)
        .ok_or_else(|| UnpackError::UnknownFormat(name.clone()))?;
    let parent = destination.parent().unwrap_or(Path::new("."));
    let dest_name = destination
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(dir_mode)
        .create(parent)
        .map_err(io(format!("creating {}", parent.display())))?;
    // A new name each time, created exclusively (mkdir fails on an existing one).
    let tmp = loop {
        let nonce: u64 = rand::random();
        let tmp = parent.join(format!(".{dest_name}.{nonce:016x}.dcflow-unpack"));
        match std::fs::DirBuilder::new().mode(dir_mode).create(&tmp) {
            Ok(()) => break tmp,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(format!("creating {}", tmp.display()))(e)),
        }
    };
    let archive_len = std::fs::metadata(archive)
        .map_err(io("opening the archive"))?
        .len();
    let root = match tmp.canonicalize() {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir(&tmp);
            return Err(io("resolving the unpack folder")(e));
        }
    };
    let tree = Tree {
        dirs: RefCell::new(vec![root.clone()]),
        root,
        dir_mode,
        file_mode,
        entries: Cell::new(0),
        bytes: Cell::new(0),
        max_entries: limits.max_entries,
        max_bytes: limits
            .max_bytes
            .min(archive_len.max(1).saturating_mul(limits.max_ratio)),
        why_max_bytes: if limits.max_bytes <= archive_len.max(1).saturating_mul(limits.max_ratio) {
            format!("more than maxbytes = {}", limits.max_bytes)
        } else {
            format!(
                "more than maxratio = {} times the archive's {archive_len} bytes",
                limits.max_ratio
            )
        },
    };
    let result = match format {
        ArchiveFormat::Tar => tree.tar(File::open(archive).map_err(io("opening the archive"))?),
        ArchiveFormat::TarGz => tree.tar(flate2::read::GzDecoder::new(
            File::open(archive).map_err(io("opening the archive"))?,
        )),
        ArchiveFormat::Zip => tree.zip(File::open(archive).map_err(io("opening the archive"))?),
        ArchiveFormat::Auto => unreachable!("resolved above"),
    };
    let publish = result.and_then(|done| {
        // Every folder's entries, then the rename: a published tree is a durable one.
        for dir in tree.dirs.borrow().iter() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("syncing {}", dir.display())))?;
        }
        std::fs::rename(&tmp, destination)
            .map_err(io(format!("publishing {}", destination.display())))?;
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the destination folder"))?;
        Ok(done)
    });
    if publish.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    publish
}

struct Tree {
    root: PathBuf,
    dir_mode: u32,
    file_mode: u32,
    /// Folders of the tree (fsynced before it is published).
    dirs: RefCell<Vec<PathBuf>>,
    entries: Cell<u64>,
    bytes: Cell<u64>,
    max_entries: u64,
    max_bytes: u64,
    why_max_bytes: String,
}

impl Tree {
    /// One more entry: an error past `maxfiles`.
    fn count(&self) -> Result<(), UnpackError> {
        self.entries.set(self.entries.get() + 1);
        if self.entries.get() > self.max_entries {
            return Err(UnpackError::Limit(format!(
                "more than maxfiles = {} entries",
                self.max_entries
            )));
        }
        Ok(())
    }

    fn tar(&self, reader: impl Read) -> Result<Unpacked, UnpackError> {
        let mut archive = tar::Archive::new(reader);
        let mut done = Unpacked::default();
        for entry in archive.entries().map_err(io("reading the archive"))? {
            let mut entry = entry.map_err(io("reading the archive"))?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let rel = checked(&shown)?;
            if !matches!(
                entry.header().entry_type(),
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                self.count()?;
            }
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    self.dir(&rel, &shown)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    done.bytes += self.file(&rel, &shown, &mut entry)?;
                    done.files += 1;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default();
                    self.symlink(&rel, &shown, &target)?;
                }
                // Extensions that describe the next entry (long names, pax headers) are
                // handled by the tar crate itself.
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
                tar::EntryType::Link => {
                    return Err(UnpackError::Refused {
                        entry: shown,
                        why: "hard links are not unpacked",
                    })
                }
                _ => {
                    return Err(UnpackError::Refused {
                        entry: shown,
                        why: "devices, FIFOs and other special entries are not unpacked",
                    })
                }
            }
        }
        Ok(done)
    }

    fn zip(&self, file: File) -> Result<Unpacked, UnpackError> {
        let mut archive =
            zip::ZipArchive::new(file).map_err(|e| UnpackError::Zip(e.to_string()))?;
        let mut done = Unpacked::default();
        for i in 0..archive.len() {
            let mut entry = archive
                .by_index(i)
                .map_err(|e| UnpackError::Zip(e.to_string()))?;
            let shown = entry.name().to_owned();
            let rel = checked(&shown)?;
            self.count()?;
            if entry.is_dir() {
                self.dir(&rel, &shown)?;
            } else if entry.is_symlink() {
                let mut target = String::new();
                entry
                    .read_to_string(&mut target)
                    .map_err(io("reading a link entry"))?;
                self.symlink(&rel, &shown, &target)?;
            } else {
                done.bytes += self.file(&rel, &shown, &mut entry)?;
                done.files += 1;
            }
        }
        Ok(done)
    }

    /// Creates the directories of `rel` and checks, on disk, that they lie in the tree.
    fn dir(&self, rel: &Path, shown: &str) -> Result<PathBuf, UnpackError> {
        let dir = self.root.join(rel);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(self.dir_mode)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let resolved = dir
            .canonicalize()
            .map_err(io(format!("resolving {}", dir.display())))?;
        if !resolved.starts_with(&self.root) {
            return Err(UnpackError::Refused {
                entry: shown.to_owned(),
                why: "its folder leads outside the unpack folder through a link",
            });
        }
        let mut dirs = self.dirs.borrow_mut();
        let mut d = resolved.as_path();
        // This folder and those created on the way to it.
        while d.starts_with(&self.root) && !dirs.iter().any(|k| k == d) {
            dirs.push(d.to_owned());
            match d.parent() {
                Some(up) => d = up,
                None => break,
            }
        }
        drop(dirs);
        Ok(resolved)
    }

    fn file(&self, rel: &Path, shown: &str, data: &mut impl Read) -> Result<u64, UnpackError> {
        let parent = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.dir(p, shown)?,
            _ => self.root.clone(),
        };
        let name = rel.file_name().expect("checked: a normal last component");
        let path = parent.join(name);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.file_mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => UnpackError::Refused {
                    entry: shown.to_owned(),
                    why: "a second entry of the same name (or over a link)",
                },
                _ => UnpackError::Io {
                    what: format!("creating {}", path.display()),
                    source: e,
                },
            })?;
        let room = self.max_bytes.saturating_sub(self.bytes.get());
        let n = std::io::copy(&mut (&mut *data).take(room.saturating_add(1)), &mut out)
            .map_err(io(format!("writing {}", path.display())))?;
        if n > room {
            return Err(UnpackError::Limit(self.why_max_bytes.clone()));
        }
        self.bytes.set(self.bytes.get() + n);
        out.flush()
            .and_then(|_| out.sync_all())
            .map_err(io(format!("syncing {}", path.display())))?;
        Ok(n)
    }

    fn symlink(&self, rel: &Path, shown: &str, target: &str) -> Result<(), UnpackError> {
        let refused = |why| UnpackError::Refused {
            entry: shown.to_owned(),
            why,
        };
        if target.is_empty() || target.starts_with('/') {
            return Err(refused("a link to an absolute path"));
        }
        // Only downward targets: a `..` could climb out through another link (`a -> .`,
        // `b -> a/..`), whatever a lexical check says.
        for c in Path::new(target).components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(refused(
                        "a link with .. in its target (only links down the tree are unpacked)",
                    ))
                }
                _ => return Err(refused("a link to an absolute path")),
            }
        }
        let parent = match rel.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.dir(p, shown)?,
            _ => self.root.clone(),
        };
        let link = parent.join(rel.file_name().expect("checked"));
        std::os::unix::fs::symlink(target, &link)
            .map_err(io(format!("creating the link {}", link.display())))
    }
}

/// An entry name as a relative path of normal components only.
fn checked(name: &str) -> Result<PathBuf, UnpackError> {
    let refused = |why| UnpackError::Refused {
        entry: name.to_owned(),
        why,
    };
    if name.contains('\0') {
        return Err(refused("a NUL byte in its name"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused("a .. component")),
            Component::RootDir | Component::Prefix(_) => return Err(refused("an absolute path")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refused("an empty name"));
    }
    Ok(out)
}

impl Pipeline {
    /// Unpacks the copied archive into its destination (by default the archive's path plus
    /// `.d`), published by one rename; sets `{unpacked}`.
    pub(crate) async fn unpack_step(
        &self,
        ctx: &mut StepContext,
        template: Option<&Template>,
        format: dcflow_core::workflow::ArchiveFormat,
        limits: dcflow_core::workflow::UnpackLimits,
    ) -> Result<(), String> {
        let archive = PathBuf::from(
            ctx.values
                .get("local_path")
                .cloned()
                .ok_or("no copied file to unpack")?,
        );
        let root = self.engine.settings().download_folder.clone();
        let destination = match template {
            Some(t) => {
                let rendered = ctx.render(t).map_err(|e| e.to_string())?;
                let rel = relative_destination(&rendered).map_err(|why| {
                    format!("destination {rendered:?} escapes the download folder: {why}")
                })?;
                let mut d = root.clone();
                d.extend(&rel);
                d
            }
            None => {
                let mut d = archive.clone().into_os_string();
                d.push(".d");
                PathBuf::from(d)
            }
        };
        let modes = self.engine.settings().permissions;
        let (a, d) = (archive.clone(), destination.clone());
        let result = tokio::task::spawn_blocking(move || {
            unpack(&a, format, &d, modes.dir_mode, modes.file_mode, limits)
        })
        .await
        .map_err(|e| format!("unpacking: {e}"))?;
        match result {
            Ok(u) if u.already => {
                info!(destination = %destination.display(), "UNPACK already published by an earlier delivery")
            }
            Ok(u) => info!(
                destination = %destination.display(),
                files = u.files,
                bytes = u.bytes,
                "UNPACK {} files ({}) into {}",
                u.files,
                human_bytes(u.bytes),
                destination.display()
            ),
            Err(e) => return Err(format!("unpacking {}: {e}", archive.display())),
        }
        ctx.set("unpacked", destination.display().to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_checked() {
        assert_eq!(checked("a/./b.txt").unwrap(), PathBuf::from("a/b.txt"));
        for bad in ["../x", "a/../../x", "/etc/passwd", "", "./"] {
            assert!(checked(bad).is_err(), "{bad:?}");
        }
    }
}
