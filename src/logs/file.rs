//! Log files: one NDJSON file per workflow in `SPINDLE_SERVER_LOG_DIR`, named as Go names it
//! ([`WorkflowId::log_file_name`]).
//!
//! Unlike Go (B15) a new run of the same workflow id truncates the file; the follower tells a new
//! run from a resumed one by the run identity stored with its position, and a resumed run cuts the
//! file back to the last persisted offset so a line is never written twice.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::LogError;
use crate::model::WorkflowId;

/// Fail unless `dir` exists (creating it if needed) and a file can be created and written in it.
/// `serve` calls this before anything starts, so an unusable log dir is a startup error, not
/// silently missing logs (B14).
pub fn check_log_dir(dir: &Path) -> Result<(), LogError> {
    let unusable = |e: std::io::Error| LogError::Dir { path: dir.to_path_buf(), source: e };
    std::fs::create_dir_all(dir).map_err(unusable)?;
    let meta = std::fs::metadata(dir).map_err(unusable)?;
    if !meta.is_dir() {
        return Err(unusable(std::io::Error::other("not a directory")));
    }
    let probe = dir.join(format!(".bobbin-write-check-{}", std::process::id()));
    let result = File::create(&probe).and_then(|mut f| f.write_all(b"ok\n").and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&probe);
    result.map_err(unusable)
}

/// Where a workflow's log file lives.
pub fn log_path(dir: &Path, id: &WorkflowId) -> PathBuf {
    dir.join(id.log_file_name())
}

/// An open log file being appended to by one follower.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    path: PathBuf,
    offset: u64,
}

impl LogFile {
    /// Open `path` for appending after cutting it to `keep` bytes: 0 for a new run (B15), the
    /// persisted offset for a resumed one. A file shorter than `keep` is an error (someone else
    /// changed it), so the caller can start the run's log over instead of leaving a hole.
    pub fn open(path: &Path, keep: u64) -> Result<Self, LogError> {
        let io = |e: std::io::Error| LogError::File { path: path.to_path_buf(), source: e };
        let file = OpenOptions::new().create(true).write(true).truncate(false).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < keep {
            return Err(io(std::io::Error::other(format!(
                "file has {len} bytes but {keep} were recorded as written"
            ))));
        }
        file.set_len(keep).map_err(io)?;
        let mut f = LogFile { file, path: path.to_path_buf(), offset: keep };
        use std::io::Seek;
        f.file.seek(std::io::SeekFrom::Start(keep)).map_err(io)?;
        Ok(f)
    }

    /// Append `bytes` (whole lines); returns the offset they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, LogError> {
        let start = self.offset;
        self.file.write_all(bytes).map_err(|e| LogError::File { path: self.path.clone(), source: e })?;
        self.offset += bytes.len() as u64;
        Ok(start)
    }

    /// Bytes written so far (the end of the file).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Delete `*.log` files in `dir` last modified more than `max_age` before `now`. Returns what was
/// deleted. Files being written are recent by construction, so a live run is never pruned.
pub fn prune_old_logs(dir: &Path, max_age: Duration, now: SystemTime) -> Result<Vec<PathBuf>, LogError> {
    let io = |e: std::io::Error| LogError::Dir { path: dir.to_path_buf(), source: e };
    let cutoff = now.checked_sub(max_age).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut deleted = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().map_err(io)?;
        if modified < cutoff {
            match std::fs::remove_file(&path) {
                Ok(()) => deleted.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::File { path, source: e }),
            }
        }
    }
    deleted.sort();
    Ok(deleted)
}

/// Prune `dir` every `every` (first right away) for as long as the task runs.
pub fn spawn_retention(dir: PathBuf, max_age: Duration, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let dir = dir.clone();
            match tokio::task::spawn_blocking(move || prune_old_logs(&dir, max_age, SystemTime::now())).await
            {
                Ok(Ok(deleted)) if !deleted.is_empty() => {
                    tracing::info!(count = deleted.len(), "deleted log files past retention");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "log retention failed"),
                Err(e) => tracing::warn!(error = %e, "log retention task failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_dirs_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Created when missing.
        let fresh = tmp.path().join("a/b/logs");
        check_log_dir(&fresh).expect("creatable dir is fine");
        assert!(fresh.is_dir());
        // A file where the dir should be.
        let file = tmp.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let e = check_log_dir(&file).expect_err("a file is not a dir");
        assert_eq!(e.label(), "log_dir");
        assert!(e.to_string().contains("plain-file"), "{e}");
        // Missing and not creatable (parent is a file).
        let e = check_log_dir(&file.join("sub")).expect_err("cannot create under a file");
        assert!(e.to_string().contains("sub"), "{e}");
        // Not writable (skipped when running as root, which ignores permissions).
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        let probe = File::create(ro.join("probe"));
        if probe.is_err() {
            assert!(check_log_dir(&ro).is_err());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).expect("chmod back");
    }

    #[test]
    fn open_truncates_to_the_kept_offset() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("w.log");
        let mut f = LogFile::open(&path, 0).expect("open");
        assert_eq!(f.append(b"one\n").expect("append"), 0);
        assert_eq!(f.append(b"two\n").expect("append"), 4);
        drop(f);
        // Resume keeping the first line only.
        let mut f = LogFile::open(&path, 4).expect("reopen");
        f.append(b"three\n").expect("append");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "one\nthree\n");
        // A new run starts over (B15).
        let mut f = LogFile::open(&path, 0).expect("new run");
        f.append(b"fresh\n").expect("append");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "fresh\n");
        assert!(LogFile::open(&path, 1000).is_err(), "a recorded offset beyond the file is refused");
    }

    #[test]
    fn retention_deletes_only_old_log_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let old = tmp.path().join("old.log");
        let new = tmp.path().join("new.log");
        let other = tmp.path().join("old.txt");
        for p in [&old, &new, &other] {
            std::fs::write(p, b"{}\n").expect("write");
        }
        let day = Duration::from_secs(86_400);
        let past = SystemTime::now() - 10 * day;
        File::options().write(true).open(&old).expect("open").set_modified(past).expect("mtime");
        File::options().write(true).open(&other).expect("open").set_modified(past).expect("mtime");
        let deleted = prune_old_logs(tmp.path(), 7 * day, SystemTime::now()).expect("prune");
        assert_eq!(deleted, vec![old.clone()]);
        assert!(!old.exists() && new.exists() && other.exists());
        assert!(prune_old_logs(&tmp.path().join("missing"), day, SystemTime::now()).is_err());
    }
}
