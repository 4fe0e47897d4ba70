//! The schema, as numbered SQL files applied in order. A released migration is never edited: a
//! change is a new file at the end of [`MIGRATIONS`]. The version applied is recorded in
//! `longrun_schema`, one row per migration.

use deadpool_postgres::ClientWrapper;

use super::{MIGRATION_LOCK, pg_error};
use crate::store::StoreError;

/// Every migration, in order: its number is its index + 1.
pub(super) const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_jobs", include_str!("migrations/0001_jobs.sql")),
    ("0002_leases", include_str!("migrations/0002_leases.sql")),
    (
        "0003_compact_snapshots",
        include_str!("migrations/0003_compact_snapshots.sql"),
    ),
    (
        "0004_removed_jobs",
        include_str!("migrations/0004_removed_jobs.sql"),
    ),
    (
        "0005_waits_until",
        include_str!("migrations/0005_waits_until.sql"),
    ),
];

/// The newest schema version this binary knows.
#[cfg(test)]
pub(super) fn supported_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the schema in the connection's `search_path` up to the newest, refusing one written by
/// a newer binary.
///
/// Everything runs in one transaction that first takes a transaction-scoped advisory lock, so
/// stores (replicas) starting together migrate one after the other: the second waits, then
/// finds the work done. The lock is scoped by the schema, so stores in different schemas of
/// one database (the tests) do not wait for each other.
pub(super) async fn migrate(client: &mut ClientWrapper) -> Result<(), StoreError> {
    let migrations = MIGRATIONS;
    let fail = |e| pg_error("migrating the schema", e);
    let tx = client.transaction().await.map_err(fail)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
        &[&MIGRATION_LOCK],
    )
    .await
    .map_err(fail)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS longrun_schema (
             version bigint PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(fail)?;
    let applied: Vec<(i64, String)> = tx
        .query(
            "SELECT version, name FROM longrun_schema ORDER BY version",
            &[],
        )
        .await
        .map_err(fail)?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let found = applied.last().map_or(0, |(version, _)| *version);
    let supported = migrations.len() as i64;
    if found > supported {
        // Nothing is written to a database we do not understand; the rollback on drop also
        // undoes the (no-op) CREATE TABLE IF NOT EXISTS.
        return Err(StoreError::IncompatibleSchema { found, supported });
    }
    // A migration is never edited once released; one that was (a development build's) would
    // leave tables this binary does not expect, and fail later in less clear ways.
    for (version, name) in applied {
        let expected = usize::try_from(version - 1)
            .ok()
            .and_then(|index| migrations.get(index))
            .map(|(expected, _)| *expected);
        if expected != Some(name.as_str()) {
            return Err(StoreError::SchemaMismatch {
                version,
                found: name,
                expected: expected.unwrap_or("none").to_owned(),
            });
        }
    }
    for (index, (name, sql)) in migrations.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        tx.batch_execute(sql)
            .await
            .map_err(|e| pg_error(format!("applying migration {name}"), e))?;
        tx.execute(
            "INSERT INTO longrun_schema (version, name) VALUES ($1, $2)",
            &[&version, name],
        )
        .await
        .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)?;
    if found < supported {
        tracing::info!(from = found, to = supported, "PostgreSQL schema migrated");
    }
    Ok(())
}
