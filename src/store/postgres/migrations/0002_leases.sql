-- 2: leases, for several replicas sharing one database. A replica claims QUEUED jobs by
-- setting `lease_owner` (its random replica id) and `lease_until` (unix microseconds, by the
-- database's clock) in the statement that claims them, renews the lease while it holds the job,
-- and clears it when the job ends. A RUNNING job whose lease ran out belonged to a replica that
-- died: any replica re-queues it. Both NULL for a job nobody holds.
-- `cancel_requested` is set by a Cancel of a RUNNING job on any replica (with a notification to
-- the runner); the runner also reads it at each renewal, so a lost notification only delays
-- the cancel.
ALTER TABLE jobs
    ADD COLUMN lease_owner uuid,
    ADD COLUMN lease_until bigint,
    ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
-- The claim: QUEUED jobs by priority, then age.
CREATE INDEX jobs_queued_priority_id ON jobs (priority DESC, id) WHERE state = 'QUEUED';
-- Renewal and release of one replica's jobs.
CREATE INDEX jobs_lease_owner ON jobs (lease_owner) WHERE lease_owner IS NOT NULL;
-- The reaper's scan for RUNNING jobs whose lease ran out.
CREATE INDEX jobs_running_lease_until ON jobs (lease_until) WHERE state = 'RUNNING';
