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
