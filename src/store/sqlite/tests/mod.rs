//! The SQLite store against the shared conformance suite, and what only a durable store owes:
//! reopening, locking, schema versions, constraints, a full disk.

use std::{collections::BTreeMap, path::Path, sync::Mutex, time::SystemTime};

use rusqlite::Connection;
use serde_json::json;
use tempfile::TempDir;

mod batching;
mod outbox;

use super::row::CURRENT_SNAPSHOT;
use super::*;
use crate::job::{JobError, JobState};
use crate::store::conformance::{self, sample_job};

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default()).expect("store opens")
}

/// A connection straight to the database file, around the store.
fn raw(dir: &Path) -> Connection {
    Connection::open(dir.join(DATABASE_FILE)).expect("database opens")
}
#[tokio::test]
async fn sqlite_store_conforms() {
    // Each store's directory must outlive it; the stores are dropped inside run_all.
    let dirs = Mutex::new(Vec::new());
    let dirs = &dirs;
    conformance::run_all(move || async move {
        let dir = TempDir::new().unwrap();
        let store = open(dir.path());
        dirs.lock().unwrap().push(dir);
        store
    })
    .await;
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let dir = TempDir::new().unwrap();
    let now = SystemTime::now();
    let mut job = sample_job(2, &[("team", "a")], Some("key-1"));
    {
        let store = open(dir.path());
        store.create(&job).await.unwrap();
        job.start(now).unwrap();
        store.save(&job).await.unwrap();
        store.close().await;
        assert!(matches!(store.get(job.id).await, Err(StoreError::Closed)));
        assert!(matches!(store.save(&job).await, Err(StoreError::Closed)));
    }
    let store = open(dir.path());
    assert_eq!(store.get(job.id).await.unwrap(), Some(job.clone()));
    let log = store.transitions(job.id, 0).await.unwrap();
    assert_eq!(
        log.iter().map(|j| j.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let retry = sample_job(1, &[], Some("key-1"));
    assert_eq!(
        store.create(&retry).await.unwrap(),
        Created::Existing(Box::new(job.clone())),
        "the idempotency key survives"
    );
    let by_label = ListQuery {
        labels: [("team".to_owned(), "a".to_owned())].into(),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.list(&by_label).await.unwrap(), vec![job]);
}

#[tokio::test]
async fn a_second_open_is_refused_while_the_first_lives() {
    let dir = TempDir::new().unwrap();
    let first = open(dir.path());
    match SqliteStore::open(dir.path(), SqliteOptions::default()) {
        Err(StoreError::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    let message = SqliteStore::open(dir.path(), SqliteOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    drop(first);
    let second = open(dir.path());
    second.close().await;
    let _third = open(dir.path());
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = TempDir::new().unwrap();
    open(dir.path()).close().await;
    raw(dir.path())
        .pragma_update(None, "user_version", 99)
        .unwrap();
    match SqliteStore::open(dir.path(), SqliteOptions::default()) {
        Err(StoreError::IncompatibleSchema { found, supported }) => {
            assert_eq!((found, supported), (99, schema::supported_version()));
        }
        other => panic!("expected IncompatibleSchema, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn an_unusable_directory_is_an_error() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let error = SqliteStore::open(file.join("data"), SqliteOptions::default())
        .err()
        .expect("cannot create a directory under a file");
    assert!(error.to_string().contains("not-a-dir"), "{error}");
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_data_directory_its_database_and_backups_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let parent = TempDir::new().unwrap();
    let dir = parent.path().join("data");
    let store = open(&dir);
    store.create(&sample_job(1, &[], None)).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    for file in [DATABASE_FILE, "longrun.db-wal", "longrun.db-shm"] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    let copy = parent.path().join("copy.db");
    maintenance::backup(&dir, &copy).unwrap();
    assert_eq!(mode(&copy), 0o600);
    store.close().await;
    // A directory an operator made is theirs to set.
    let theirs = TempDir::new().unwrap();
    std::fs::set_permissions(theirs.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    open(theirs.path()).close().await;
    assert_eq!(mode(theirs.path()), 0o750);
}

#[test]
fn a_tenant_check_reads_the_index_alone() {
    // The row's tenant column sits behind the snapshot: a check that read the row would take
    // longer for a large job, and so tell another tenant that a large job exists.
    let dir = TempDir::new().unwrap();
    drop(open(dir.path()));
    let conn = raw(dir.path());
    let plan: Vec<String> = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            readers::OWNED_BY.replace("?1", "'a'").replace("?2", "'b'")
        ))
        .unwrap()
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING COVERING INDEX jobs_tenant_id")),
        "{plan:?}"
    );
}

#[tokio::test]
async fn the_database_refuses_an_unknown_state() {
    let dir = TempDir::new().unwrap();
    open(dir.path()).close().await;
    let inserted = raw(dir.path()).execute(
        "INSERT INTO jobs (id, state, version, priority, snapshot) VALUES ('x', 'BOGUS', 1, 0, '{}')",
        [],
    );
    let error = inserted.expect_err("BOGUS is not a state");
    assert!(error.to_string().contains("CHECK"), "{error}");
}

#[tokio::test]
async fn state_columns_match_the_snapshot() {
    let dir = TempDir::new().unwrap();
    let store = open(dir.path());
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    job.cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
        .unwrap();
    store.save(&job).await.unwrap();
    store.close().await;
    let (state, snapshot_state, end_time): (String, String, i64) = raw(dir.path())
        .query_row(
            &format!("SELECT state, ({CURRENT_SNAPSHOT}) ->> '$.state', end_time FROM jobs j"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(state, JobState::Cancelled.as_str());
    assert_eq!(snapshot_state, state);
    assert_eq!(Some(end_time), job.end_time.map(unix_micros));
}

/// A logged version's snapshot is written once, in its log row; a progress save (not logged)
/// keeps its snapshot in the job's row; a row written whole by an older binary still reads.
#[tokio::test]
async fn each_snapshot_is_stored_once() {
    let dir = TempDir::new().unwrap();
    let store = open(dir.path());
    let now = SystemTime::now();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    store.save(&job).await.unwrap();
    let row_snapshot = |job: &Job| -> String {
        raw(dir.path())
            .query_row(
                "SELECT snapshot FROM jobs WHERE id = ?1",
                [id_text(job.id)],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(row_snapshot(&job), row::IN_LOG, "RUNNING is logged");
    let pointed: (String, i64) = raw(dir.path())
        .query_row(
            "SELECT l.job_id, l.version FROM jobs j JOIN log l ON l.seq = j.snapshot_seq
             WHERE j.id = ?1",
            [id_text(job.id)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        pointed,
        (id_text(job.id), job.version),
        "the row names its log row"
    );
    assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(&job));

    assert!(job.report_progress(0, crate::job::Progress::percent(40, "working"), now));
    store.save(&job).await.unwrap();
    assert_ne!(job.logged_version, job.version, "progress is not logged");
    assert_eq!(decode(&row_snapshot(&job)).unwrap(), job);
    assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(&job));
    assert_eq!(store.unfinished().await.unwrap(), vec![job.clone()]);

    // As an older binary stored it: the whole snapshot in the row as well as in the log.
    let mut older = sample_job(1, &[], None);
    store.create(&older).await.unwrap();
    older.start(now).unwrap();
    store.save(&older).await.unwrap();
    let whole = serde_json::to_string(&older).unwrap();
    store
        .execute(&format!(
            "UPDATE jobs SET snapshot = '{whole}', snapshot_seq = NULL WHERE id = '{}'",
            id_text(older.id)
        ))
        .await
        .unwrap();
    assert_eq!(store.get(older.id).await.unwrap(), Some(older));
}

/// A progress save writes only the version and the snapshot when the stored row is an older
/// version in the same state; otherwise it takes the general path, which also moves the state
/// columns, or refuses a stale version. Every index stays consistent with its table.
#[tokio::test]
async fn a_progress_save_moves_only_what_progress_changes() {
    let dir = TempDir::new().unwrap();
    let store = open(dir.path());
    let now = SystemTime::now();
    let columns = |job: &Job| -> (String, i64, Option<i64>, i64) {
        raw(dir.path())
            .query_row(
                "SELECT state, version, snapshot_seq, (SELECT count(*) FROM log WHERE job_id = ?1)
                 FROM jobs WHERE id = ?1",
                [id_text(job.id)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap()
    };
    let progress = |job: &mut Job, percent| {
        assert!(job.report_progress(0, crate::job::Progress::percent(percent, "working"), now));
        assert_ne!(job.logged_version, job.version, "progress is not logged");
    };

    // Stored RUNNING, saved RUNNING with progress: the narrow update.
    let mut job = sample_job(1, &[], None);
    let mut started = job.clone();
    started.start(now).unwrap();
    started.start_action(0, now).unwrap();
    store.create_started(&job, &started).await.unwrap();
    job = started;
    progress(&mut job, 30);
    store.save(&job).await.unwrap();
    assert_eq!(columns(&job), ("RUNNING".to_owned(), job.version, None, 2));
    assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(&job));

    // An older progress snapshot arriving late is refused and changes nothing.
    let late = job.clone();
    progress(&mut job, 60);
    store.save(&job).await.unwrap();
    assert!(matches!(
        store.save(&late).await,
        Err(StoreError::StaleVersion { .. })
    ));
    assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(&job));

    // The next transition is logged and named by the row again.
    job.succeed_action(0, json!(1), now).unwrap();
    job.succeed(now).unwrap();
    store.save(&job).await.unwrap();
    let (state, version, seq, logged) = columns(&job);
    assert_eq!(
        (state.as_str(), version, logged),
        ("SUCCEEDED", job.version, 3)
    );
    assert!(seq.is_some());

    // Stored QUEUED, saved with progress after a start that was never saved on its own: the
    // state columns must move, so the general path runs.
    let mut queued = sample_job(1, &[], None);
    store.create(&queued).await.unwrap();
    queued.start(now).unwrap();
    queued.start_action(0, now).unwrap();
    progress(&mut queued, 10);
    store.save(&queued).await.unwrap();
    assert_eq!(columns(&queued).0, "RUNNING");
    assert_eq!(store.unfinished().await.unwrap(), vec![queued.clone()]);

    store.close().await;
    let check: String = raw(dir.path())
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn a_full_disk_is_a_clear_error_and_passes() {
    let dir = TempDir::new().unwrap();
    let store = open(dir.path());
    // SQLite reports a database at its size limit exactly as it reports a full disk.
    store.execute("PRAGMA max_page_count = 1").await.unwrap();
    let mut big = sample_job(1, &[], None);
    big.actions[0]
        .params
        .insert("blob".to_owned(), json!("x".repeat(64 * 1024)));
    let error = store.create(&big).await.expect_err("no room");
    assert!(matches!(error, StoreError::Full { .. }), "{error:?}");
    assert!(error.to_string().contains("full"), "{error}");
    store
        .execute("PRAGMA max_page_count = 1000000")
        .await
        .unwrap();
    assert_eq!(store.create(&big).await.unwrap(), Created::New);
}

#[tokio::test]
async fn list_agrees_with_the_memory_store() {
    let dir = TempDir::new().unwrap();
    let sqlite = open(dir.path());
    let memory = crate::store::MemoryStore::new();
    let now = SystemTime::now();
    let mut ids = Vec::new();
    for i in 0..24 {
        let team = ["a", "b"][i % 2];
        let tier = ["x", "y", "z"][i % 3];
        let mut job = sample_job(1, &[("team", team), ("tier", tier)], None);
        sqlite.create(&job).await.unwrap();
        memory.create(&job).await.unwrap();
        match i % 4 {
            1 => job.start(now).unwrap(),
            2 => job
                .cancel(JobError::new("CANCELLED", "CANCELLED", "x"), now)
                .unwrap(),
            _ => continue,
        }
        sqlite.save(&job).await.unwrap();
        memory.save(&job).await.unwrap();
        ids.push(job.id);
    }
    let label = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let state_sets = [
        vec![],
        vec![JobState::Queued],
        vec![JobState::Cancelled, JobState::Queued, JobState::Cancelled],
        JobState::ALL.to_vec(),
    ];
    let label_sets = [
        vec![],
        vec![label("team", "a")],
        vec![label("team", "b"), label("tier", "y")],
        vec![label("team", "nobody")],
    ];
    for states in &state_sets {
        for labels in &label_sets {
            for before in [None, Some(ids[ids.len() / 2])] {
                for (limit, tenant) in [
                    (0, None),
                    (3, Some("default")),
                    (100, None),
                    (100, Some("x")),
                ] {
                    let query = ListQuery {
                        states: states.clone(),
                        labels: labels.iter().cloned().collect(),
                        before,
                        limit,
                        tenant: tenant.map(str::to_owned),
                    };
                    let listed =
                        |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
                    assert_eq!(
                        listed(sqlite.list(&query).await.unwrap()),
                        listed(memory.list(&query).await.unwrap()),
                        "{query:?}"
                    );
                }
            }
        }
    }
}

/// Migration 3 (tenants) over a database that migrations 1 and 2 created and filled: the old
/// jobs become the `default` tenant's, keep their idempotency keys (now per tenant) and their
/// labels, transitions and events (the migration must not drop or cascade anything).
#[tokio::test]
async fn tenants_migration_keeps_old_jobs_as_the_default_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let old = crate::store::conformance::sample_job(1, &[("team", "a")], Some("old-key"));
    {
        let mut conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        rusqlite_migration::Migrations::from_slice(&schema::MIGRATIONS[..2])
            .to_latest(&mut conn)
            .unwrap();
        // A snapshot as longrun wrote it before tenants: no `tenant` field.
        let mut snapshot: serde_json::Value = serde_json::to_value(&old).unwrap();
        snapshot.as_object_mut().unwrap().remove("tenant");
        let snapshot = snapshot.to_string();
        let id = old.id.to_string();
        conn.execute(
            "INSERT INTO jobs (id, state, version, priority, idempotency_key, end_time, snapshot)
             VALUES (?1, 'QUEUED', 1, 7, 'old-key', NULL, ?2)",
            rusqlite::params![id, snapshot],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO job_labels (job_id, key, value) VALUES (?1, 'team', 'a')",
            [&id],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO transitions (job_id, version, snapshot) VALUES (?1, 1, ?2)",
            rusqlite::params![id, snapshot],
        )
        .unwrap();
        conn.execute("INSERT INTO events (job_id, version) VALUES (?1, 1)", [&id])
            .unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
    }

    let store = open(dir.path());
    let version: i64 = raw(dir.path())
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::supported_version());
    let migrated = store
        .get(old.id)
        .await
        .unwrap()
        .expect("the old job is kept");
    assert_eq!(migrated, old, "reads back whole, as the default tenant's");
    assert_eq!(migrated.tenant, crate::job::DEFAULT_TENANT);
    assert_eq!(store.transitions(old.id, 0).await.unwrap().len(), 1);
    let labels = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
    let listed = store
        .list(&ListQuery {
            tenant: Some("default".to_owned()),
            labels: labels.clone(),
            limit: 10,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.len(),
        1,
        "labels survive and the tenant column is filled"
    );
    let events = store
        .events_after(0, Some("default"), &labels, 10)
        .await
        .unwrap();
    assert_eq!(events.events.len(), 1, "the event log survives");

    // The old key still deduplicates for its tenant, and is free for another.
    let retry = crate::store::conformance::sample_job(1, &[], Some("old-key"));
    assert_eq!(
        store.create(&retry).await.unwrap(),
        Created::Existing(Box::new(old.clone()))
    );
    let other = crate::store::conformance::tenant_job("acme", &[], Some("old-key"));
    assert_eq!(store.create(&other).await.unwrap(), Created::New);
    store.close().await;
}

/// A log that grew while a long read kept checkpoints from catching up is cut back to
/// `wal_size_limit` once the read ends and a checkpoint has copied it all, instead of keeping
/// its high-water size on disk for good.
#[tokio::test]
async fn a_grown_write_ahead_log_is_cut_back_to_its_limit() {
    const LIMIT: u64 = 256 << 10;
    let dir = TempDir::new().unwrap();
    let options = SqliteOptions {
        wal_size_limit: LIMIT,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let wal = dir.path().join(format!("{DATABASE_FILE}-wal"));
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let padding = "x".repeat(2000);
    let write = |count: usize| {
        let store = &store;
        let padding = &padding;
        // All at once, so that group commit makes few transactions of them.
        futures::future::join_all((0..count).map(|_| async move {
            let job = sample_job(1, &[("padding", padding.as_str())], None);
            store.create(&job).await.unwrap();
        }))
    };

    let mut reader = raw(dir.path());
    let read = reader.transaction().unwrap();
    let _: i64 = read
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .unwrap();
    // Past SQLite's automatic checkpoint (1,000 pages, 4 MiB), which the open read holds back.
    write(1000).await;
    let grown = wal_size();
    assert!(grown > 8 * LIMIT, "the log grew to {grown} bytes");
    drop(read);

    // A commit checkpoints the whole log (nobody reads an older snapshot now); the commit
    // after that starts the log over and cuts the file back.
    write(1).await;
    write(1).await;
    let cut = wal_size();
    assert!(
        cut <= LIMIT,
        "the log is cut back to the limit ({LIMIT} bytes): {cut} bytes (was {grown})"
    );
    store.close().await;
}
