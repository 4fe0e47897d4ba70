-- 3: snapshots are written compactly (src/job/encoding.rs): times as integer nanoseconds since
-- the Unix epoch, empty fields left out. Rows written before read as they did. No table
-- changes; the version moves so that an older binary, which cannot read the new snapshots,
-- refuses this database at start instead of failing row by row. Replicas of an older version
-- still running when a newer one migrates cannot read jobs written after that: upgrade them
-- together.
COMMENT ON COLUMN jobs.snapshot IS
    'The job as JSON (longrun src/job/encoding.rs) at its current version.';
COMMENT ON COLUMN log.snapshot IS
    'The job as JSON (longrun src/job/encoding.rs) at this logged version.';
