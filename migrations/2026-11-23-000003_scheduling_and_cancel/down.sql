CREATE OR REPLACE FUNCTION task_engine_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ready       bigint;
    first_id    bigint;
    next_run_at timestamptz;
BEGIN
    SELECT count(*) FILTER (WHERE run_at <= now()),
           min(id),
           min(run_at) FILTER (WHERE run_at > now())
      INTO ready, first_id, next_run_at
      FROM inserted
     WHERE status = 'waiting';
    IF first_id IS NOT NULL THEN
        PERFORM pg_notify(
            left(TG_TABLE_SCHEMA, 50) || '.task_engine',
            json_build_object('ready', ready, 'first_id', first_id, 'next_run_at', next_run_at)::text);
    END IF;
    RETURN NULL;
END
$$;

DROP INDEX tasks_scheduled_idx;
ALTER TABLE tasks DROP COLUMN cancel_requested_at;
