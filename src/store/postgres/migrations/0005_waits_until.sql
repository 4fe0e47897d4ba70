-- 5: scheduled jobs. `waits_until` (unix microseconds, rounded up) holds a QUEUED job that was
-- scheduled for later (its snapshot's `schedule_time`) back from claims until the database's
-- clock reaches it. Replicas clear it once it has (before each claim, through the second index),
-- so a claim reads ready jobs only, in its own index, and jobs scheduled far ahead cost it
-- nothing. NULL for a job that may run, as for every job stored before this migration.
ALTER TABLE jobs ADD COLUMN waits_until bigint;
-- The claim: ready QUEUED jobs by priority, then age (replaces 0002's index of all QUEUED jobs).
DROP INDEX jobs_queued_priority_id;
CREATE INDEX jobs_ready_priority_id ON jobs (priority DESC, id)
    WHERE state = 'QUEUED' AND waits_until IS NULL;
-- Which waiting jobs have become due.
CREATE INDEX jobs_queued_waits_until ON jobs (waits_until)
    WHERE state = 'QUEUED' AND waits_until IS NOT NULL;
