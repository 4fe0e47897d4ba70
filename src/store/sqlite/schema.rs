//! The schema, as numbered migrations. A migration, once released, is never edited: a change
//! is a new entry at the end of [`MIGRATIONS`].

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use super::sql_error;
use crate::store::StoreError;

/// Every migration, in order; the schema version is the number applied (`PRAGMA user_version`).
pub(super) const MIGRATIONS: &[M<'static>] = &[
    M::up(
        // 1: jobs, their labels and their transition logs.
        //
        // `snapshot` is the serde_json of the whole `Job`; the other columns copy the fields that
        // queries filter or sort on, written from the same `Job` so they cannot disagree.
        // `id` is the hyphenated lowercase UUIDv7, so text order is submission order.
        "CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
        version INTEGER NOT NULL CHECK (version >= 1),
        priority INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        end_time INTEGER, -- unix microseconds
        snapshot TEXT NOT NULL
    ) STRICT;
    CREATE INDEX jobs_state_id ON jobs (state, id);
    CREATE INDEX jobs_state_end_time ON jobs (state, end_time);

    CREATE TABLE job_labels (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (job_id, key)
    ) STRICT, WITHOUT ROWID;
    -- Ordered by job_id within one label, so a label filter reads newest first without sorting.
    CREATE INDEX job_labels_lookup ON job_labels (key, value, job_id);

    CREATE TABLE transitions (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        snapshot TEXT NOT NULL,
        PRIMARY KEY (job_id, version)
    ) STRICT;",
    ),
    M::up(
        // 2: the global event log behind WatchJobs: one row per logged transition, numbered
        // in commit order (one writer, so committed numbers always form a prefix).
        //
        // AUTOINCREMENT so that a number is never handed out twice, even after the newest
        // events were removed: a client's cursor must never come to mean another event.
        // `event_log.removed_through` remembers the highest number removed (by retention or
        // DeleteJob, through the cascade), so a resume from before it is told that history
        // is gone instead of silently missing it. Existing transitions are numbered in the
        // order they were written.
        "CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            UNIQUE (job_id, version)
        ) STRICT;

        CREATE TABLE event_log (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            removed_through INTEGER NOT NULL
        ) STRICT;
        INSERT INTO event_log (id, removed_through) VALUES (1, 0);

        CREATE TRIGGER events_removed AFTER DELETE ON events BEGIN
            UPDATE event_log SET removed_through = max(removed_through, OLD.seq) WHERE id = 1;
        END;

        INSERT INTO events (job_id, version)
            SELECT job_id, version FROM transitions ORDER BY rowid;",
    ),
    M::up(
        // The per-job transition log and the global event log become one table, `log`: each
        // logged snapshot is written once, in one row and one index, instead of a row in
        // `transitions`, a row in `events`, their two indexes and the AUTOINCREMENT counter.
        // That was over half of what a write cost the one writer thread.
        //
        // `seq` keeps its meaning and its numbers. It is no longer AUTOINCREMENT: a new row
        // takes one more than the higher of the newest row and `removed_through` (see
        // ops::log_transition), which never hands out a number twice either, because every
        // removed number is at most `removed_through`.
        "CREATE TABLE log (
            seq INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            version INTEGER NOT NULL,
            snapshot TEXT NOT NULL
        ) STRICT;
        CREATE UNIQUE INDEX log_job_version ON log (job_id, version);

        INSERT INTO log (seq, job_id, version, snapshot)
            SELECT e.seq, t.job_id, t.version, t.snapshot
            FROM events e JOIN transitions t ON t.job_id = e.job_id AND t.version = e.version;
        -- Every number AUTOINCREMENT handed out is in `log` now or was removed, and then
        -- the trigger of migration 2 raised `removed_through` to it: nothing to carry over.
        DROP TRIGGER events_removed;
        DROP TABLE events;
        DROP TABLE transitions;

        CREATE TRIGGER log_removed AFTER DELETE ON log BEGIN
            UPDATE event_log SET removed_through = max(removed_through, OLD.seq) WHERE id = 1;
        END;",
    ),
    M::up(
        // The webhook outbox: one row per notification, inserted in the same transaction as
        // the snapshot it reports (whose body is rebuilt from `log` at delivery time),
        // so a crash can neither lose one nor invent one. Times are unix microseconds.
        // `next_attempt_at` is set only while PENDING; the partial index serves the delivery
        // worker's "what is due" scan without touching settled rows.
        "CREATE TABLE webhook_deliveries (
            id TEXT PRIMARY KEY NOT NULL,
            job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
            job_version INTEGER NOT NULL,
            job_state TEXT NOT NULL
                CHECK (job_state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
            state TEXT NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            next_attempt_at INTEGER,
            last_error TEXT,
            delivered_at INTEGER,
            created_at INTEGER NOT NULL,
            UNIQUE (job_id, job_version),
            CHECK ((state = 'PENDING') = (next_attempt_at IS NOT NULL))
        ) STRICT;
        CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
            WHERE state = 'PENDING';",
    ),
    M::up(
        // Tenants: every job belongs to one; jobs stored before are the `default` tenant's.
        //
        // Idempotency keys become unique per tenant. The column-level UNIQUE of migration 1
        // cannot be dropped without rebuilding `jobs` (and with it the foreign keys of
        // job_labels, log and webhook_deliveries), so the column instead holds the key scoped by
        // its tenant, `<tenant length>:<tenant>:<key>` (row.rs `scoped_key`): the same
        // constraint then means "unique per (tenant, key)", and this stays one statement.
        // The snapshot keeps the key as the client gave it.
        //
        // `jobs_tenant_state_id` serves tenant-scoped listing newest first, with or without a
        // state filter (the state arms of a listing are each one range of it).
        "ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
        UPDATE jobs SET idempotency_key = '7:default:' || idempotency_key
            WHERE idempotency_key IS NOT NULL;
        CREATE INDEX jobs_tenant_state_id ON jobs (tenant, state, id);
        CREATE INDEX jobs_tenant_id ON jobs (tenant, id);",
    ),
    M::up(
        // `jobs_state_id` served listings, which are all scoped by tenant now (the two
        // indexes of the migration before); the cross-tenant reads by state (recovery,
        // retention) use `jobs_state_end_time`. One index fewer to keep on every insert and
        // every change of state.
        "DROP INDEX jobs_state_id;",
    ),
    M::up(
        // Each logged snapshot written once: when a job's current version is logged,
        // `snapshot_seq` names its `log` row and `snapshot` holds '' (row.rs `IN_LOG`, read
        // through `CURRENT_SNAPSHOT`). Rows written before (no `snapshot_seq`) keep their whole
        // snapshot and stay valid. An older binary would misread '', and the version bump
        // makes it refuse this database instead.
        "ALTER TABLE jobs ADD COLUMN snapshot_seq INTEGER;",
    ),
    M::up(
        // 8: snapshots are written compactly (job/encoding.rs): times as integer nanoseconds,
        // empty fields left out. Nothing in the tables changes, and rows written before read as
        // they did; the version moves only so that an older binary, which cannot read the new
        // snapshots, refuses this database with a clear error instead of failing row by row.
        "-- the snapshot encoding changed; no table did",
    ),
    M::up(
        // 9: a job removed by DeleteJob no longer raises `event_log.removed_through` (which
        // refused every older WatchJobs cursor, of any tenant and selector): it is remembered
        // here by its newest event, with its tenant and labels (a JSON object), so that only
        // the streams it could have matched are refused. Retention still raises the one mark
        // (it removes too many jobs to list), and drops the rows the mark has passed.
        "CREATE TABLE removed_jobs (
            seq INTEGER PRIMARY KEY,
            tenant TEXT NOT NULL,
            labels TEXT NOT NULL
        ) STRICT;",
    ),
];

/// The newest schema version this binary knows.
pub(super) fn supported_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Refuses a database written by a newer binary, telling the operator both versions.
pub(super) fn check_version(conn: &Connection) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| sql_error("reading the schema version", e))?;
    let supported = supported_version();
    if found > supported {
        return Err(StoreError::IncompatibleSchema { found, supported });
    }
    Ok(())
}

/// Brings the database up to the newest schema, refusing one written by a newer binary.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // Checked here rather than left to the migration library so that the operator is told
    // both versions, and so that nothing is written to a database we do not understand.
    check_version(conn)?;
    Migrations::from_slice(MIGRATIONS)
        .to_latest(conn)
        .map_err(|e| match e {
            rusqlite_migration::Error::RusqliteError { err, .. } => {
                sql_error("migrating the schema", err)
            }
            other => StoreError::backend("migrating the schema", other),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        Migrations::from_slice(MIGRATIONS).validate().unwrap();
    }

    /// A database written with separate `transitions` and `events` tables keeps every logged
    /// snapshot under its number, and numbers removed before the move are not handed out
    /// again after it.
    #[test]
    fn the_log_keeps_its_numbers_across_the_move_to_one_table() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        Migrations::from_slice(&MIGRATIONS[..2])
            .to_latest(&mut conn)
            .unwrap();
        conn.execute_batch(
            "INSERT INTO jobs (id, state, version, priority, snapshot)
                 VALUES ('a', 'SUCCEEDED', 2, 0, 'a2'), ('b', 'QUEUED', 1, 0, 'b1'),
                        ('c', 'SUCCEEDED', 1, 0, 'c1');
             INSERT INTO transitions (job_id, version, snapshot)
                 VALUES ('a', 1, 'a1'), ('b', 1, 'b1'), ('a', 2, 'a2'), ('c', 1, 'c1');
             INSERT INTO events (job_id, version)
                 VALUES ('a', 1), ('b', 1), ('a', 2), ('c', 1);
             DELETE FROM jobs WHERE id = 'c';",
        )
        .unwrap();

        Migrations::from_slice(MIGRATIONS)
            .to_latest(&mut conn)
            .unwrap();

        let log: Vec<(i64, String, i64, String)> = conn
            .prepare("SELECT seq, job_id, version, snapshot FROM log ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected = [(1, "a", 1, "a1"), (2, "b", 1, "b1"), (3, "a", 2, "a2")];
        assert_eq!(
            log,
            expected.map(|(seq, job, version, snapshot)| (
                seq,
                job.to_owned(),
                version,
                snapshot.to_owned()
            ))
        );
        let removed_through: i64 = conn
            .query_row("SELECT removed_through FROM event_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(removed_through, 4, "job c's event (number 4) was removed");
    }
}
