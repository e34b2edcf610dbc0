-- The insert trigger accepts every timestamp PostgreSQL accepts: a task due at
-- 'infinity' (never) made `min(run_at) - now()` fail ("cannot subtract infinite
-- timestamps"), and with it the insert, whenever an instance slept. Such a task is
-- not scheduled: nothing will ever be due for it. ('-infinity' is due at once.)
CREATE OR REPLACE FUNCTION task_engine_notify_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    channel  text := task_engine_channel(TG_TABLE_SCHEMA);
    ready    bigint;
    first_id bigint;
    next_in  float8;
BEGIN
    IF pg_try_advisory_xact_lock(hashtext(channel), pg_backend_pid() % task_engine_stripes()) THEN
        RETURN NULL;
    END IF;
    SELECT count(*) FILTER (WHERE run_at <= now()),
           min(id),
           extract(epoch FROM min(run_at) FILTER (WHERE run_at > now() AND isfinite(run_at)) - now())::float8
      INTO ready, first_id, next_in
      FROM inserted
     WHERE status = 'waiting';
    IF first_id IS NOT NULL THEN
        PERFORM pg_notify(channel, json_build_object('ready', ready, 'first_id', first_id, 'next_in', next_in)::text);
    END IF;
    RETURN NULL;
END
$$;

-- CREATE OR REPLACE keeps no SET clause: pin the search_path again (see
-- channel_and_stripes_spelled_once).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION task_engine_notify_insert() SET search_path = %I', current_schema());
END
$$;
