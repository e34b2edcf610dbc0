-- Notify only when an instance sleeps.
--
-- A transaction that has called NOTIFY takes a cluster-wide lock from its commit to
-- the end of its WAL flush: notifying inserts commit one at a time, which caps
-- concurrent single-task enqueues. Most of those notifications wake nobody when
-- every instance is busy (a busy instance claims again as soon as it has room).
--
-- An idle instance holds, on its producer's connection, a shared session-level
-- advisory lock on each of 16 stripes (keys: hashtext('<schema>.task_engine'), 0..15).
-- The trigger tries an exclusive transaction-level lock on one stripe (by backend
-- pid): if it gets it, no instance sleeps right now, and any instance that goes to
-- sleep later must first take that stripe, which waits for this transaction to end,
-- and then looks for work once more: it will see these tasks, so no notification is
-- needed. If the stripe is taken, an instance sleeps (or another inserter holds the
-- stripe: a harmless extra notification), and the trigger notifies as before.
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
