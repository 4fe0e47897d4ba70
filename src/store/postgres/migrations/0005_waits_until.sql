-- 5: scheduled jobs. `waits_until` (unix microseconds, rounded up) holds a QUEUED job that was
-- scheduled for later (its snapshot's `schedule_time`) back from claims until the database's
-- clock reaches it. Replicas clear it once it has (before each claim, through the second index),
-- so a claim reads ready jobs only, in its own index, and jobs scheduled far ahead cost it
-- nothing. NULL for a job that may run, as for every job stored before this migration.
-- `ready_at` (unix microseconds) is when the job became ready to run: its submission, or its
-- `schedule_time` if later. Jobs of equal priority are claimed in that order, so one scheduled
-- for later gets in line at its time.
ALTER TABLE jobs
    ADD COLUMN waits_until bigint,
    ADD COLUMN ready_at bigint;
-- The submission time held in a UUIDv7 id (its first 48 bits, unix milliseconds), in unix
-- microseconds: the readiness of the jobs stored before this migration, and of those a replica
-- older than it still inserts, so that neither jumps the line of the jobs written after it.
CREATE FUNCTION longrun_id_micros(id uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE
    AS $$ SELECT (('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint) * 1000 $$;
UPDATE jobs SET ready_at = longrun_id_micros(id) WHERE state IN ('QUEUED', 'RUNNING');
CREATE FUNCTION longrun_fill_ready_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.ready_at := longrun_id_micros(NEW.id);
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_ready_at BEFORE INSERT ON jobs
    FOR EACH ROW WHEN (NEW.ready_at IS NULL) EXECUTE FUNCTION longrun_fill_ready_at();
-- The claim: ready QUEUED jobs by priority, then readiness (replaces 0002's index of all QUEUED
-- jobs by priority, then id).
DROP INDEX jobs_queued_priority_id;
CREATE INDEX jobs_ready_priority ON jobs (priority DESC, ready_at NULLS FIRST, id)
    WHERE state = 'QUEUED' AND waits_until IS NULL;
-- Which waiting jobs have become due.
CREATE INDEX jobs_queued_waits_until ON jobs (waits_until)
    WHERE state = 'QUEUED' AND waits_until IS NOT NULL;
