//! Upkeep of a data directory from the command line: `longrun compact` gives the space of
//! removed jobs back to the file system (the server stopped), `longrun backup` copies the
//! database while a server runs on it. Both need only the binary, not the `sqlite3` tool.

use std::{
    fs::{self, File},
    path::Path,
};

use super::{
    DATABASE_FILE, SqliteOptions, create_new_private_file, lock_dir, open_writer, readers, schema,
    sql_error,
};
use crate::store::StoreError;

/// The size of a data directory's database before and after [`compact`], in bytes (the
/// database file and its write-ahead log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Before.
    pub before: u64,
    /// After.
    pub after: u64,
}

/// Rewrites the database in `dir` without its free pages (SQLite's `VACUUM`), so the space of
/// removed jobs goes back to the file system; the write-ahead log is emptied too.
///
/// Takes the directory's lock, so it fails with [`StoreError::Locked`] while a server runs on
/// it: a server keeps its file open, and would not see the space returned. Refuses a database
/// written by a newer longrun, and changes nothing else (no migration). Needs free disk space
/// about the size of the database while it runs.
pub fn compact(dir: &Path) -> Result<Compacted, StoreError> {
    let path = existing_database(dir)?;
    let lock = lock_dir(dir)?;
    let conn = open_writer(&path, &SqliteOptions::default())?;
    schema::check_version(&conn)?;
    let before = footprint(&path);
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(|e| sql_error(format!("compacting {}", path.display()), e))?;
    conn.close()
        .map_err(|(_, e)| sql_error(format!("closing {}", path.display()), e))?;
    drop(lock);
    Ok(Compacted {
        before,
        after: footprint(&path),
    })
}

/// Writes a consistent copy of the database in `dir` to `dest`, a file that must not exist
/// yet, and returns its size. Safe while a server runs on `dir`: the copy is one read
/// transaction (SQLite's `VACUUM INTO`), which never blocks the server's writes, and it is as
/// compact as [`compact`] would make it. The copy is flushed to disk before this returns.
///
/// To restore, stop the server and put the copy in place of `longrun.db` in an empty data
/// directory (without the old `longrun.db-wal` and `longrun.db-shm`).
pub fn backup(dir: &Path, dest: &Path) -> Result<u64, StoreError> {
    let path = existing_database(dir)?;
    if dest.exists() {
        return Err(StoreError::backend(
            format!("backing up to {}", dest.display()),
            "the file exists already; give a new path",
        ));
    }
    let dest_text = dest.to_str().ok_or_else(|| {
        StoreError::backend(
            format!("backing up to {}", dest.display()),
            "the path is not valid UTF-8",
        )
    })?;
    let conn = readers::open_reader(&path, SqliteOptions::default().busy_timeout)?;
    // Created first, empty (which `VACUUM INTO` takes) and readable by its owner only, as the
    // database it copies: `VACUUM INTO` would create it readable by all.
    create_new_private_file(dest)
        .map_err(|e| StoreError::backend(format!("creating {}", dest.display()), e))?;
    conn.execute("VACUUM INTO ?1", [dest_text]).map_err(|e| {
        // Nothing half-written is left behind to be taken for a backup.
        let _ = fs::remove_file(dest);
        sql_error(
            format!("backing up {} to {}", path.display(), dest.display()),
            e,
        )
    })?;
    // `VACUUM INTO` leaves the copy to the OS to write out; a backup must survive a crash
    // that follows it.
    let flushed = File::open(dest).and_then(|file| {
        file.sync_all()?;
        file.metadata()
    });
    let size = flushed
        .map_err(|e| StoreError::backend(format!("flushing {}", dest.display()), e))?
        .len();
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        // The new file's directory entry, too.
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::backend(format!("flushing {}", parent.display()), e))?;
    }
    Ok(size)
}

/// The database file of `dir`, which must exist: neither command creates one.
fn existing_database(dir: &Path) -> Result<std::path::PathBuf, StoreError> {
    let path = dir.join(DATABASE_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(StoreError::backend(
            format!("opening {}", dir.display()),
            format!("no longrun database ({DATABASE_FILE}) in this directory"),
        ))
    }
}

/// The bytes the database takes on disk: its file and its write-ahead log.
fn footprint(path: &Path) -> u64 {
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path) + size(Path::new(&wal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, JobError, JobId, NewAction, NewJob};
    use crate::store::Deleted;
    use crate::store::{SqliteStore, Store};
    use std::time::SystemTime;

    fn job_with_payload() -> Job {
        let spec = NewJob {
            actions: vec![NewAction {
                name: "echo".to_owned(),
                params: [("message".to_owned(), serde_json::json!("x".repeat(2000)))]
                    .into_iter()
                    .collect(),
                input: Default::default(),
            }],
            ..NewJob::default()
        };
        Job::new(JobId::generate(), spec, 1, SystemTime::now())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compact_gives_back_the_space_of_removed_jobs_and_refuses_a_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let mut ids = Vec::new();
        for _ in 0..2000 {
            let job = job_with_payload();
            store.create(&job).await.unwrap();
            ids.push(job.id);
        }
        let kept = ids.pop().unwrap();
        for id in ids {
            let mut job = store.get(id).await.unwrap().unwrap();
            job.cancel(
                JobError::new("CANCELLED", "CANCELLED", "done"),
                SystemTime::now(),
            )
            .unwrap();
            store.save(&job).await.unwrap();
            assert_eq!(store.delete(id).await.unwrap(), Deleted::Removed);
        }
        assert!(matches!(
            compact(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        store.close().await;
        drop(store);

        let compacted = compact(dir.path()).unwrap();
        assert!(
            compacted.after * 4 < compacted.before,
            "the removed jobs' space is given back: {compacted:?}"
        );
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        assert!(
            store.get(kept).await.unwrap().is_some(),
            "what was kept stays"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_taken_while_the_store_runs_opens_with_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let job = job_with_payload();
        store.create(&job).await.unwrap();

        let copies = tempfile::tempdir().unwrap();
        let dest = copies.path().join("restored").join(DATABASE_FILE);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let size = backup(dir.path(), &dest).unwrap();
        assert_eq!(size, fs::metadata(&dest).unwrap().len());
        assert!(
            backup(dir.path(), &dest).is_err(),
            "an existing file is never overwritten"
        );
        // The original store is still open and writing.
        store.create(&job_with_payload()).await.unwrap();

        let restored = SqliteStore::open(dest.parent().unwrap(), SqliteOptions::default()).unwrap();
        assert_eq!(
            restored.get(job.id).await.unwrap(),
            store.get(job.id).await.unwrap()
        );
        assert_eq!(restored.unfinished().await.unwrap().len(), 1);
    }

    #[test]
    fn a_directory_without_a_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let refused = compact(dir.path()).unwrap_err();
        let cause = std::error::Error::source(&refused).map(ToString::to_string);
        assert!(
            cause
                .as_deref()
                .is_some_and(|c| c.contains("no longrun database")),
            "{refused}: {cause:?}"
        );
        assert!(backup(dir.path(), &dir.path().join("copy.db")).is_err());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing created"
        );
    }
}
