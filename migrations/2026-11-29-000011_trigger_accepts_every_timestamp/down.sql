-- Back to the trigger of channel_and_stripes_spelled_once.
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
           extract(epoch FROM min(run_at) FILTER (WHERE run_at > now()) - now())::float8
      INTO ready, first_id, next_in
      FROM inserted
     WHERE status = 'waiting';
    IF first_id IS NOT NULL THEN
        PERFORM pg_notify(channel, json_build_object('ready', ready, 'first_id', first_id, 'next_in', next_in)::text);
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION task_engine_notify_insert() SET search_path = %I', current_schema());
END
$$;
