-- Back to the trigger of notify_only_when_asleep, which spells both names itself.
CREATE OR REPLACE FUNCTION task_engine_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ready    bigint;
    first_id bigint;
    next_in  float8;
BEGIN
    IF pg_try_advisory_xact_lock(hashtext(left(TG_TABLE_SCHEMA, 50) || '.task_engine'), pg_backend_pid() % 16) THEN
        RETURN NULL;
    END IF;
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
ALTER FUNCTION task_engine_notify_insert() RESET search_path;

DROP FUNCTION task_engine_stripes();
DROP FUNCTION task_engine_channel();
DROP FUNCTION task_engine_channel(text);
