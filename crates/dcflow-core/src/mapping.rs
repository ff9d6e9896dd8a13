//! From a dCache billing path to a source URL and a destination path.
//!
//! For `billingPath = pool + folder + rel` the source is `url + folder + rel` and the
//! destination is `downloadfolder + rel` (DESIGN.md). `rel` is checked here, lexically: no
//! `..`, `.`, empty components or NUL, so it cannot name anything outside the download folder.
//! Symlinked parents are refused when directories are created (`dcflow-transfer`), where the
//! file system can be looked at.

use std::path::PathBuf;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use url::Url;

use crate::config::DcacheConfig;

/// Characters escaped in one path segment: everything not unreserved or a sub-delimiter safe
/// in WebDAV doors (spaces, `#`, `%`, `+`, `?` and all non-ASCII among them).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'+')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^')
    .add(b'[')
    .add(b']')
    .add(b';')
    .add(b'/');

/// A billing path that cannot be a destination: its relative part would leave the download
/// folder, or it is longer than a file system takes. Never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path {:?} {why}", crate::text::bounded(path, SHOWN))]
pub struct PathEscapes {
    pub path: String,
    pub why: &'static str,
}

/// How much of a refused path its error shows (a 10 MB path must not make a 10 MB error).
const SHOWN: usize = 512;
/// The longest file name POSIX file systems take (NAME_MAX); dCache's own limit too.
pub const NAME_MAX: usize = 255;
/// The longest path the kernel takes (PATH_MAX, with its NUL).
pub const PATH_MAX: usize = 4096;
const NAME_TOO_LONG: &str =
    "is refused: a name longer than 255 bytes (NAME_MAX): no file system takes it";

/// Where one file comes from and goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Components below `pool + folder`, each checked.
    pub rel: Vec<String>,
    pub source_url: Url,
    pub destination: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PathMapper {
    base_url: Url,
    prefix: String,
    folder: String,
    download_folder: PathBuf,
}

impl PathMapper {
    pub fn new(dcache: &DcacheConfig, download_folder: PathBuf) -> Self {
        Self {
            base_url: dcache.url.clone(),
            prefix: format!("{}{}", dcache.pool, dcache.folder),
            folder: dcache.folder.clone(),
            download_folder,
        }
    }

    /// The namespace prefix under which files are handled (`pool + folder`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `Ok(None)` for a path outside `pool + folder` (not ours: skipped), an error for a path
    /// inside it that is unsafe (recorded as a failure).
    pub fn map(&self, billing_path: &str) -> Result<Option<Mapped>, PathEscapes> {
        let Some(rest) = billing_path.strip_prefix(&self.prefix) else {
            return Ok(None);
        };
        // The prefix must end on a component boundary: /data/lsst2 is not under /data/lsst.
        let Some(rest) = rest.strip_prefix('/') else {
            return Ok(None);
        };
        let escapes = |why| PathEscapes {
            path: billing_path.to_owned(),
            why,
        };
        let mut rel = Vec::new();
        if billing_path.len() >= PATH_MAX {
            return Err(escapes(if rest.split('/').any(|p| p.len() > NAME_MAX) {
                NAME_TOO_LONG
            } else {
                "is refused: longer than 4095 bytes (PATH_MAX): no file system takes it"
            }));
        }
        for part in rest.split('/') {
            match part {
                "" => {
                    return Err(escapes(
                        "escapes the download folder: empty component (// or a trailing /)",
                    ))
                }
                "." | ".." => {
                    return Err(escapes("escapes the download folder: a . or .. component"))
                }
                p if p.contains('\0') => {
                    return Err(escapes("escapes the download folder: a NUL byte"))
                }
                p if p.len() > NAME_MAX => return Err(escapes(NAME_TOO_LONG)),
                p => rel.push(p.to_owned()),
            }
        }
        let mut url_path = self.base_url.path().trim_end_matches('/').to_owned();
        for part in self
            .folder
            .split('/')
            .filter(|p| !p.is_empty())
            .chain(rel.iter().map(String::as_str))
        {
            url_path.push('/');
            url_path.extend(utf8_percent_encode(part, SEGMENT));
        }
        let mut source_url = self.base_url.clone();
        source_url.set_path(&url_path);
        let mut destination = self.download_folder.clone();
        destination.extend(&rel);
        if destination.as_os_str().len() >= PATH_MAX {
            return Err(escapes(
                "is refused: its destination would be longer than 4095 bytes (PATH_MAX)",
            ));
        }
        Ok(Some(Mapped {
            rel,
            source_url,
            destination,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Env};

    fn mapper(folder: &str) -> PathMapper {
        let text = format!(
            "[dcache]\nurl='https://door.example.org:2880/lsst'\npool='/pnfs/example.org/data/lsst'\nfolder='{folder}'\n[local]\ndownloadfolder='/sps/data/input'\n"
        );
        let c = Config::from_toml(&text, &Env::default()).unwrap();
        PathMapper::new(&c.dcache, c.local.download_folder)
    }

    /// Issue 15: a door whose root is the namespace root (dCache's default layout) is
    /// `pool = "/"`; check-config refused it ("must not be /").
    #[test]
    fn a_pool_at_the_namespace_root_maps_too() {
        let text = "[dcache]\nurl='https://localhost:2885'\npool='/'\nfolder='/public/run'\n[local]\ndownloadfolder='/sps/in'\n";
        let c = Config::from_toml(text, &Env::default()).unwrap();
        let m = PathMapper::new(&c.dcache, c.local.download_folder);
        assert_eq!(m.prefix(), "/public/run");
        let got = m.map("/public/run/a b/f.fits").unwrap().unwrap();
        assert_eq!(
            got.source_url.as_str(),
            "https://localhost:2885/public/run/a%20b/f.fits"
        );
        assert_eq!(got.destination, PathBuf::from("/sps/in/a b/f.fits"));
        assert_eq!(m.map("/public/running/f").unwrap(), None);
        let whole =
            "[dcache]\nurl='https://localhost:2885'\npool='/'\n[local]\ndownloadfolder='/sps/in'\n";
        let c = Config::from_toml(whole, &Env::default()).unwrap();
        let m = PathMapper::new(&c.dcache, c.local.download_folder);
        let got = m.map("/x/y").unwrap().unwrap();
        assert_eq!(got.source_url.as_str(), "https://localhost:2885/x/y");
        assert_eq!(got.rel, vec!["x", "y"]);
    }

    #[test]
    fn maps_as_the_design_says() {
        let m = mapper("/lsst/user/j/jdoe");
        let got = m
            .map("/pnfs/example.org/data/lsst/lsst/user/j/jdoe/run1/f.fits")
            .unwrap()
            .unwrap();
        assert_eq!(
            got.source_url.as_str(),
            "https://door.example.org:2880/lsst/lsst/user/j/jdoe/run1/f.fits"
        );
        assert_eq!(
            got.destination,
            PathBuf::from("/sps/data/input/run1/f.fits")
        );
        assert_eq!(got.rel, vec!["run1", "f.fits"]);
    }

    #[test]
    fn outside_the_folder_is_not_ours() {
        let m = mapper("/lsst/user/j/jdoe");
        for p in [
            "/pnfs/example.org/data/lsst/lsst/user/j/jdoe2/f",
            "/pnfs/example.org/data/other/f",
            "/pnfs/example.org/data/lsst/lsst/user/j/jdoe",
            "Unknown",
        ] {
            assert_eq!(m.map(p).unwrap(), None, "{p}");
        }
    }

    #[test]
    fn odd_names_are_percent_encoded() {
        let m = mapper("");
        let got = m
            .map("/pnfs/example.org/data/lsst/a dir/f#1%+?;é.dat")
            .unwrap()
            .unwrap();
        assert_eq!(
            got.source_url.as_str(),
            "https://door.example.org:2880/lsst/a%20dir/f%231%25%2B%3F%3B%C3%A9.dat"
        );
        assert_eq!(
            got.destination,
            PathBuf::from("/sps/data/input/a dir/f#1%+?;é.dat")
        );
    }

    #[test]
    fn escapes_are_refused() {
        let m = mapper("");
        for p in [
            "/pnfs/example.org/data/lsst/../../etc/passwd",
            "/pnfs/example.org/data/lsst/a/./b",
            "/pnfs/example.org/data/lsst//etc/passwd",
            "/pnfs/example.org/data/lsst/a/",
            "/pnfs/example.org/data/lsst/a\0b",
        ] {
            assert!(m.map(p).is_err(), "{p:?}");
        }
    }

    /// Issue 17, item 3: a 5,000-byte name was retried as a network error ("builder error")
    /// until the run timed out, and a 10 MB path made a 31 MB CSV row.
    #[test]
    fn names_and_paths_no_file_system_takes_are_refused_and_shown_cut() {
        let m = mapper("");
        let base = "/pnfs/example.org/data/lsst/";
        let ok = format!("{base}{}", "n".repeat(255));
        assert!(
            m.map(&ok).unwrap().is_some(),
            "255 bytes is NAME_MAX itself"
        );
        let long_name = format!("{base}{}", "n".repeat(5_000));
        let e = m.map(&long_name).unwrap_err();
        assert!(e.to_string().contains("NAME_MAX"), "{e}");
        assert!(
            e.to_string().len() < 700,
            "the error shows a part of the path"
        );
        // Many short names: every one fits, the whole does not.
        let deep = format!("{base}{}", ["d"; 2100].join("/"));
        let e = m.map(&deep).unwrap_err();
        assert!(e.to_string().contains("PATH_MAX"), "{e}");
        let huge = format!("{base}{}", "x/".repeat(5_000_000));
        let e = m.map(&huge).unwrap_err();
        assert!(
            e.to_string().contains("…[cut] (10000028 bytes)"),
            "{}",
            &e.to_string()[..100]
        );
    }
}
