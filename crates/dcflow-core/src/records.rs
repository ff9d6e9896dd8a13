//! Success and failure records: CSV files with a header row, one complete line per file.
//!
//! Columns (DESIGN.md): time, pnfsid, billing path, source URL, destination, size, checksum,
//! attempts, seconds, error. Each row is formatted in memory and appended with one `write`
//! on an `O_APPEND` file under a lock, so concurrent transfers never interleave lines.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const HEADER: [&str; 10] = [
    "time",
    "pnfsid",
    "billing_path",
    "source_url",
    "destination",
    "size",
    "checksum",
    "attempts",
    "seconds",
    "error",
];

/// One line of a record file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub time: Option<OffsetDateTime>,
    pub pnfsid: String,
    pub billing_path: String,
    pub source_url: String,
    pub destination: String,
    pub size: Option<u64>,
    /// `algo:value`, e.g. `adler32:0a1b2c3d`.
    pub checksum: String,
    pub attempts: u32,
    pub seconds: f64,
    pub error: String,
}

/// The longest text field a record holds: paths (PATH_MAX), URLs and errors fit; a 10 MB path
/// is cut with a marker (Python's csv module refuses fields over 128 KiB by default).
pub const FIELD_MAX: usize = 8192;

impl Record {
    fn fields(&self) -> [String; 10] {
        let time = self.time.unwrap_or_else(OffsetDateTime::now_utc);
        let cut = |f: &str| crate::text::bounded(f, FIELD_MAX).into_owned();
        [
            time.format(&Rfc3339).unwrap_or_default(),
            cut(&self.pnfsid),
            cut(&self.billing_path),
            cut(&self.source_url),
            cut(&self.destination),
            self.size.map(|s| s.to_string()).unwrap_or_default(),
            cut(&self.checksum),
            self.attempts.to_string(),
            format!("{:.3}", self.seconds),
            cut(&self.error),
        ]
    }

    /// The failure row of a message that could not be decoded: the reason and the message
    /// itself (up to 2000 characters), so that nothing is lost.
    pub fn malformed(origin: &str, reason: &dyn std::fmt::Display, raw: &[u8]) -> Self {
        Self::malformed_input("billing message", origin, reason, raw)
    }

    /// The same for any input `what` (e.g. "storage event").
    pub fn malformed_input(
        what: &str,
        origin: &str,
        reason: &dyn std::fmt::Display,
        raw: &[u8],
    ) -> Self {
        let excerpt: String = String::from_utf8_lossy(raw).chars().take(2000).collect();
        Self {
            error: format!("malformed {what} ({origin}): {reason}; message: {excerpt}"),
            ..Default::default()
        }
    }

    /// Reads a record back from a CSV row (for `retry` and tests).
    pub fn from_row(row: &csv::StringRecord) -> Option<Self> {
        let get = |i: usize| row.get(i).unwrap_or("").to_owned();
        Some(Self {
            time: OffsetDateTime::parse(row.get(0)?, &Rfc3339).ok(),
            pnfsid: get(1),
            billing_path: get(2),
            source_url: get(3),
            destination: get(4),
            size: row.get(5).and_then(|s| s.parse().ok()),
            checksum: get(6),
            attempts: row.get(7).and_then(|s| s.parse().ok()).unwrap_or(0),
            seconds: row.get(8).and_then(|s| s.parse().ok()).unwrap_or(0.0),
            error: get(9),
        })
    }
}

/// An append-only CSV record file.
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    file: Mutex<Appender>,
}

#[derive(Debug)]
struct Appender {
    file: File,
    /// The file's length after the last whole line: a failed write is cut back to it.
    len: u64,
    /// Lines appended since the last [`RecordFile::sync`].
    unsynced: bool,
}

impl RecordFile {
    /// Opens (creating if needed) and writes the header if the file is empty.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open record file {}: {e}", path.display()),
                )
            })?;
        if file.metadata()?.len() == 0 {
            (&file).write_all(&csv_line(&HEADER.map(String::from)))?;
            file.sync_data()?;
        }
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(Appender {
                file,
                len,
                unsynced: false,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line in a single write. A write that fails (a full disk) leaves no part of
    /// the line behind. The line is durable once [`RecordFile::sync`] has returned.
    pub fn append(&self, record: &Record) -> io::Result<()> {
        let line = csv_line(&record.fields());
        let mut a = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match (&a.file).write_all(&line) {
            Ok(()) => {
                a.len += line.len() as u64;
                a.unsynced = true;
                Ok(())
            }
            Err(e) => {
                let _ = a.file.set_len(a.len);
                Err(io::Error::new(
                    e.kind(),
                    format!("cannot write to {}: {e}", self.path.display()),
                ))
            }
        }
    }

    /// Makes every line appended so far durable (fdatasync; nothing to do when none was).
    /// Sources call it before they acknowledge the events those lines record.
    pub fn sync(&self) -> io::Result<()> {
        let mut a = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if a.unsynced {
            a.file.sync_data().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot fsync {}: {e}", self.path.display()),
                )
            })?;
            a.unsynced = false;
        }
        Ok(())
    }

    /// All records of a file, header skipped.
    pub fn read_all(path: &Path) -> io::Result<Vec<Record>> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(path)?;
        let mut out = Vec::new();
        for row in reader.records() {
            out.extend(Record::from_row(&row.map_err(io::Error::other)?));
        }
        Ok(out)
    }
}

fn csv_line(fields: &[String]) -> Vec<u8> {
    // The writer's own buffer (8 KiB by default) would be allocated and zeroed for each line.
    let mut w = csv::WriterBuilder::new()
        .buffer_capacity(256)
        .from_writer(Vec::with_capacity(256));
    w.write_record(fields).expect("writing to memory");
    w.into_inner().expect("writing to memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn header_once_and_whole_lines_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("success.csv");
        let file = Arc::new(RecordFile::open(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let file = file.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let r = Record {
                            pnfsid: format!("{t:04}{i:032}"),
                            billing_path: format!("/p/with, comma \"quoted\"/{i}"),
                            error: "line\nbreak".into(),
                            size: Some(i),
                            ..Default::default()
                        };
                        file.append(&r).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(file);
        let again = RecordFile::open(&path).unwrap();
        drop(again);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("time,pnfsid").count(), 1);
        let rows = RecordFile::read_all(&path).unwrap();
        assert_eq!(rows.len(), 1600);
        assert!(rows
            .iter()
            .all(|r| r.billing_path.contains(", comma \"quoted\"") && r.error == "line\nbreak"));
    }
}
