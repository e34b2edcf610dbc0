-- The channel and the stripes, spelled once.
--
-- The channel name (`<schema>.task_engine`) and the number of stripes (16) were
-- spelled in the insert trigger and again in the engine's Rust code, which had to
-- agree. These functions are now the only spelling: the trigger calls them, and so
-- does every statement of the engine that listens, notifies or takes the stripes.

-- The channel of the deployment whose tables live in `schema`: two engines sharing a
-- database in two schemas do not wake each other. The schema is cut to fit an
-- identifier (63 bytes) with the suffix: to 50 characters, fewer if they take more than
-- one byte each. One expression, so that the trigger's call is inlined.
CREATE FUNCTION task_engine_channel(schema text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT left(schema, greatest(50 - (octet_length(schema) - length(schema)), 0)) || '.task_engine' $$;

-- The channel of the `tasks` table this session sees (its search_path).
CREATE FUNCTION task_engine_channel() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT task_engine_channel(n.nspname)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'tasks'::regclass
$$;

-- How many stripes an idle instance holds and inserters try (see
-- notify_only_when_asleep): the lock keys are (hashtext(channel), 0 .. stripes - 1).
CREATE FUNCTION task_engine_stripes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 16 $$;

-- The trigger of notify_only_when_asleep, unchanged but for the two names. It finds
-- them through a search_path pinned to the schema they are created in (below), so
-- that an insert from a session whose search_path does not name that schema
-- (`INSERT INTO myapp.tasks ...`, or another role's "$user") still works.
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

-- The schema itself, resolved now: `SET search_path FROM CURRENT` would keep
-- "$user", which names another schema for another role.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION task_engine_notify_insert() SET search_path = %I', current_schema());
END
$$;
