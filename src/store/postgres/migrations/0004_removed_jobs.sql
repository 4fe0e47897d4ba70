-- 4: a job removed by DeleteJob no longer raises `event_log.removed_through` (which refused
-- every older WatchJobs cursor, of any tenant and selector). It is remembered here by its
-- newest event, with its tenant and labels, so that only the streams it could have matched
-- are refused. The row is written before the job is deleted, and the log's trigger leaves the
-- mark alone for the events of a job that has one. Retention still raises the mark (it
-- removes too many jobs to list them) and drops the rows the mark has passed.
CREATE TABLE removed_jobs (
    seq bigint PRIMARY KEY,
    job_id uuid NOT NULL,
    tenant text NOT NULL,
    labels jsonb NOT NULL
);
CREATE INDEX removed_jobs_job_id ON removed_jobs (job_id);

CREATE OR REPLACE FUNCTION longrun_log_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM removed_jobs r WHERE r.job_id = OLD.job_id) THEN
        RETURN NULL;
    END IF;
    UPDATE event_log SET removed_through = greatest(removed_through, OLD.seq) WHERE id = 1;
    RETURN NULL;
END;
$$;
