-- 5: scheduled jobs. `waits_until` (unix microseconds, rounded up) holds a QUEUED job that was
-- scheduled for later (its snapshot's `schedule_time`) back from claims until the database's
-- clock reaches it. Replicas clear it once it has (before each claim, through the second index),
-- so a claim reads ready jobs only, in its own index, and jobs scheduled far ahead cost it
-- nothing. NULL for a job that may run, as for every job stored before this migration.
-- `ready_at` (unix microseconds) is when the job became ready to run: its submission, or its
-- `schedule_time` if later. Jobs of equal priority are claimed in that order, so one scheduled
-- for later gets in line at its time. NULL for jobs stored before this migration, which were
-- all ready before any job written after it: they come first.
ALTER TABLE jobs
    ADD COLUMN waits_until bigint,
    ADD COLUMN ready_at bigint;
-- The claim: ready QUEUED jobs by priority, then readiness (replaces 0002's index of all QUEUED
-- jobs by priority, then id).
DROP INDEX jobs_queued_priority_id;
CREATE INDEX jobs_ready_priority ON jobs (priority DESC, ready_at NULLS FIRST, id)
    WHERE state = 'QUEUED' AND waits_until IS NULL;
-- Which waiting jobs have become due.
CREATE INDEX jobs_queued_waits_until ON jobs (waits_until)
    WHERE state = 'QUEUED' AND waits_until IS NOT NULL;
