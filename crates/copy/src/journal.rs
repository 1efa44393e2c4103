//! The resume journal of `ferry copy --resume FILE`: which ranges of the destination are
//! complete and durable, for which source and destination.
//!
//! A checkpoint records only ranges whose writes were acknowledged *before* a destination
//! flush that then succeeded, so everything it records survives a crash of ferry, of the host
//! or of the peer. The file is replaced atomically (write a temporary file, fsync it, rename it
//! over the journal, fsync the directory) and ends with a SHA-256 digest of its content: a torn,
//! truncated or edited journal is refused, never trusted. It names both endpoints (name, size
//! and an identity such as a file's device, inode and mtime), and is refused when either changed.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use disk::ErrorKind;
use sha2::{Digest, Sha256};

/// The format tag of journal files this build writes and reads.
const FORMAT: &str = "ferry-journal/1";

/// Sorted, disjoint, merged half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Adds [start, end), merging with what it touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let first = self.0.partition_point(|&(_, e)| e < start);
        let mut last = first;
        let (mut s, mut e) = (start, end);
        while last < self.0.len() && self.0[last].0 <= end {
            s = s.min(self.0[last].0);
            e = e.max(self.0[last].1);
            last += 1;
        }
        self.0.splice(first..last, [(s, e)]);
    }

    /// The parts of [start, end) not in the set, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        let first = self.0.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &self.0[first..] {
            if s >= end {
                break;
            }
            if s > pos {
                out.push((pos, s));
            }
            pos = pos.max(e);
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    /// Bytes in the set.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

/// What a journal says an endpoint was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub name: String,
    pub size: Option<u64>,
    /// The endpoint's own identity (a file's device, inode and, for a source, mtime).
    pub id: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (size ", self.name)?;
        match self.size {
            Some(s) => write!(f, "{s}")?,
            None => f.write_str("unknown")?,
        }
        if !self.id.is_empty() {
            write!(f, ", {}", self.id)?;
        }
        f.write_str(")")
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Doc {
    format: String,
    source: Identity,
    destination: Identity,
    /// Complete and durable ranges, `[start, end)`.
    done: Vec<(u64, u64)>,
}

/// Why a journal cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {cause}")]
    Io { path: String, cause: String },
    /// Not a journal this build wrote whole: torn, truncated, edited or of another format.
    #[error(
        "journal {path} is damaged ({why}); it cannot be trusted: remove it to copy again from the start"
    )]
    Damaged { path: String, why: String },
    /// These endpoints cannot be resumed.
    #[error("journal {path}: {why}")]
    Unsupported { path: String, why: String },
    /// The journal was written for other endpoints, or they changed since.
    #[error(
        "journal {path} was written for {side} {recorded}, but the {side} is now {now}; \
         remove it to copy again from the start"
    )]
    Mismatch {
        path: String,
        side: &'static str,
        recorded: Box<Identity>,
        now: Box<Identity>,
    },
}

impl JournalError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            JournalError::Io { .. } => ErrorKind::Io,
            JournalError::Damaged { .. } => ErrorKind::InvalidRequest,
            JournalError::Mismatch { .. } => ErrorKind::Changed,
            JournalError::Unsupported { .. } => ErrorKind::Unsupported,
        }
    }
}

/// A journal file bound to one source and destination.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    source: Identity,
    destination: Identity,
}

impl Journal {
    /// Opens the journal at `path` for these endpoints: the ranges it records as done (empty
    /// when there is no journal yet), after checking it is whole and names these endpoints.
    pub fn open(
        path: &Path,
        source: Identity,
        destination: Identity,
    ) -> Result<(Journal, RangeSet), JournalError> {
        let journal = Journal {
            path: path.to_path_buf(),
            source,
            destination,
        };
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((journal, RangeSet::new()));
            }
            Err(e) => return Err(journal.io(e)),
        };
        let done = journal.parse(&text)?;
        Ok((journal, done))
    }

    fn parse(&self, text: &[u8]) -> Result<RangeSet, JournalError> {
        let damaged = |why: &str| JournalError::Damaged {
            path: self.path.display().to_string(),
            why: why.to_string(),
        };
        let text = std::str::from_utf8(text).map_err(|_| damaged("not text"))?;
        let (body, digest) = text
            .trim_end_matches('\n')
            .rsplit_once('\n')
            .ok_or_else(|| damaged("no digest line"))?;
        if hex(&Sha256::digest(body.as_bytes())) != digest {
            return Err(damaged("its digest does not match its content"));
        }
        let doc: Doc = serde_json::from_str(body).map_err(|e| damaged(&e.to_string()))?;
        if doc.format != FORMAT {
            return Err(damaged(&format!(
                "format {:?}, expected {FORMAT:?}",
                doc.format
            )));
        }
        for (side, recorded, now) in [
            ("source", &doc.source, &self.source),
            ("destination", &doc.destination, &self.destination),
        ] {
            if recorded != now {
                return Err(JournalError::Mismatch {
                    path: self.path.display().to_string(),
                    side,
                    recorded: Box::new(recorded.clone()),
                    now: Box::new(now.clone()),
                });
            }
        }
        let limit = self.source.size.unwrap_or(u64::MAX);
        let mut done = RangeSet::new();
        for (s, e) in doc.done {
            if s >= e || e > limit {
                return Err(damaged(&format!(
                    "range [{s}, {e}) is not inside the image"
                )));
            }
            done.insert(s, e);
        }
        Ok(done)
    }

    /// Records `done` as the complete and durable ranges, atomically.
    pub fn write(&self, done: &RangeSet) -> Result<(), JournalError> {
        let doc = Doc {
            format: FORMAT.to_string(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            done: done.ranges().to_vec(),
        };
        let body = serde_json::to_string(&doc).expect("a journal serializes");
        let text = format!("{body}\n{}\n", hex(&Sha256::digest(body.as_bytes())));
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| self.io(e))?;
        tmp.write_all(text.as_bytes()).map_err(|e| self.io(e))?;
        tmp.as_file().sync_all().map_err(|e| self.io(e))?;
        tmp.persist(&self.path).map_err(|e| self.io(e.error))?;
        // The rename is durable only once the directory is.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(e))
    }

    /// The copy completed: the journal is removed.
    pub fn finish(&self) -> Result<(), JournalError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(e)),
        }
    }

    fn io(&self, e: std::io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.display().to_string(),
            cause: disk::endpoint::io_reason(&e),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(name: &str, size: u64) -> Identity {
        Identity {
            name: name.into(),
            size: Some(size),
            id: "dev 1 ino 2".into(),
        }
    }

    proptest! {
        #[test]
        fn ranges_merge_and_gaps_are_their_complement(
            adds in prop::collection::vec((0u64..200, 0u64..40), 0..20),
            start in 0u64..100, len in 0u64..200,
        ) {
            let mut set = RangeSet::new();
            for (s, l) in &adds {
                set.insert(*s, s + l);
            }
            for w in set.ranges().windows(2) {
                prop_assert!(w[0].1 < w[1].0, "not merged: {:?}", set);
            }
            let gaps = set.gaps(start, start + len);
            for b in start..start + len {
                let covered = adds.iter().any(|(s, l)| *s <= b && b < s + l);
                let in_gap = gaps.iter().any(|(s, e)| *s <= b && b < *e);
                prop_assert_eq!(covered, !in_gap, "byte {}", b);
            }
        }
    }

    #[test]
    fn a_journal_round_trips_and_refuses_other_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, done) = Journal::open(&path, id("src", 100), id("dst", 100)).unwrap();
        assert!(done.is_empty());
        let mut set = RangeSet::new();
        set.insert(0, 10);
        set.insert(50, 60);
        j.write(&set).unwrap();
        let (_, back) = Journal::open(&path, id("src", 100), id("dst", 100)).unwrap();
        assert_eq!(back, set);
        let err = Journal::open(&path, id("src", 100), id("other", 100)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Changed);
        assert!(
            err.to_string().contains("destination dst (size 100"),
            "{err}"
        );
        let err = Journal::open(&path, id("src", 99), id("dst", 100)).unwrap_err();
        assert!(
            err.to_string().contains("the source is now src (size 99"),
            "{err}"
        );
        j.finish().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn torn_or_edited_journals_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (j, _) = Journal::open(&path, id("s", 100), id("d", 100)).unwrap();
        let mut set = RangeSet::new();
        set.insert(0, 40);
        j.write(&set).unwrap();
        let whole = std::fs::read_to_string(&path).unwrap();
        for bad in [
            whole[..whole.len() / 2].to_string(),
            whole.replace("40", "90"),
            String::new(),
            "garbage".to_string(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let err = Journal::open(&path, id("s", 100), id("d", 100)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{bad:?}: {err}");
            assert!(err.to_string().contains("damaged"), "{err}");
        }
    }
}
