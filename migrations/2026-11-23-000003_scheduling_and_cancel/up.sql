-- Scheduling, retries and cancellation.

-- Set by `engine cancel` on a running task: the instance running it is told (NOTIFY),
-- the task can see it in its context, and its attempt, unless it succeeds, ends the
-- task `cancelled` instead of `failed` or a retry.
ALTER TABLE tasks ADD COLUMN cancel_requested_at TIMESTAMPTZ;

-- The scheduler's index: waiting tasks due later than they were created, i.e.
-- enqueued for later or waiting for a retry. A task enqueued to run at once is not
-- in it (its run_at is its created_at), so ordinary enqueues and claims pay nothing
-- for it, and "when is the next scheduled task due?" reads one entry.
CREATE INDEX tasks_scheduled_idx ON tasks (run_at)
    WHERE status = 'waiting' AND run_at > created_at;

-- The notification now also says how far ahead the earliest inserted scheduled task
-- is due (seconds, from the server's clock), so that a task scheduled earlier than
-- everything already waiting re-arms each instance's timer.
CREATE OR REPLACE FUNCTION task_engine_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ready    bigint;
    first_id bigint;
    next_in  float8;
BEGIN
    SELECT count(*) FILTER (WHERE run_at <= now()),
           min(id),
           extract(epoch FROM min(run_at) FILTER (WHERE run_at > now()) - now())::float8
      INTO ready, first_id, next_in
      FROM inserted
     WHERE status = 'waiting';
    IF first_id IS NOT NULL THEN
        PERFORM pg_notify(
            left(TG_TABLE_SCHEMA, 50) || '.task_engine',
            json_build_object('ready', ready, 'first_id', first_id, 'next_in', next_in)::text);
    END IF;
    RETURN NULL;
END
$$;
