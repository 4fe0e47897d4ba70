-- 1: jobs, their labels, the transition log (which is also the global event log) and the
-- webhook outbox. A released migration is never edited: a change is a new numbered file.
--
-- `snapshot` is the serde_json of the whole `Job` (the same encoding as the SQLite store); the
-- other columns copy the fields that queries filter or sort on, written from the same `Job`, so
-- they cannot disagree. Ids are `uuid`: PostgreSQL orders them bytewise, and UUIDv7 bytes are
-- time-ordered, so id order is submission order. Times are unix microseconds.
CREATE TABLE jobs (
    id uuid PRIMARY KEY,
    tenant text NOT NULL,
    state text NOT NULL
        CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    version bigint NOT NULL CHECK (version >= 1),
    priority bigint NOT NULL,
    idempotency_key text,
    end_time bigint,
    snapshot text NOT NULL,
    -- Keys are scoped by tenant. NULL keys are distinct, so jobs without a key never clash.
    CONSTRAINT jobs_tenant_idempotency_key UNIQUE (tenant, idempotency_key)
);
-- Listing newest first (all tenants or one, with or without a state filter), the unfinished
-- scan and retention's purge by end time.
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_tenant_state_id ON jobs (tenant, state, id);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id);
CREATE INDEX jobs_finished_end_time ON jobs (end_time)
    WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');

CREATE TABLE job_labels (
    job_id uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (job_id, key)
);
-- Ordered by job id within one label, so a label filter reads newest first without sorting.
CREATE INDEX job_labels_lookup ON job_labels (key, value, job_id);

-- Every logged snapshot, numbered by `seq` in commit order (see writer.rs: one writer a store
-- and a transaction-scoped advisory lock across stores, so committed numbers form a prefix).
CREATE TABLE log (
    seq bigint PRIMARY KEY,
    job_id uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    version bigint NOT NULL,
    snapshot text NOT NULL,
    CONSTRAINT log_job_version UNIQUE (job_id, version)
);

-- The log's marks: `head` is the last number handed out (numbers come from it, never from the
-- rows, so a number is never handed out twice even after the newest rows were removed) and
-- `removed_through` the highest number removed with its job, so a reader resuming from before
-- it is told that history is gone.
CREATE TABLE event_log (
    id integer PRIMARY KEY CHECK (id = 1),
    head bigint NOT NULL,
    removed_through bigint NOT NULL
);
INSERT INTO event_log (id, head, removed_through) VALUES (1, 0, 0);

CREATE FUNCTION longrun_log_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE event_log SET removed_through = greatest(removed_through, OLD.seq) WHERE id = 1;
    RETURN NULL;
END;
$$;
CREATE TRIGGER log_removed AFTER DELETE ON log
    FOR EACH ROW EXECUTE FUNCTION longrun_log_removed();

-- The webhook outbox: one row per notification, inserted in the same transaction as the
-- snapshot it reports. `next_attempt_at` is set only while PENDING; the partial index serves
-- the delivery worker's "what is due" scan without touching settled rows.
CREATE TABLE webhook_deliveries (
    id uuid PRIMARY KEY,
    job_id uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    job_version bigint NOT NULL,
    job_state text NOT NULL
        CHECK (job_state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    state text NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts bigint NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at bigint,
    last_error text,
    delivered_at bigint,
    created_at bigint NOT NULL,
    CONSTRAINT webhook_deliveries_job_version UNIQUE (job_id, job_version),
    CHECK ((state = 'PENDING') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'PENDING';
CREATE INDEX webhook_deliveries_pending_job ON webhook_deliveries (job_id, job_version)
    WHERE state = 'PENDING';
