-- 5: scheduled jobs. `schedule_time` (unix microseconds, rounded up) is when a QUEUED job
-- becomes due: replicas claim it only once the database's clock has reached it. NULL for a job
-- that may run as soon as it is queued, as every job stored before this migration.
ALTER TABLE jobs ADD COLUMN schedule_time bigint;
