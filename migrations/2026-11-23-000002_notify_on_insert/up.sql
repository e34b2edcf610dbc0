-- Wakes sleeping engine instances when tasks are inserted, whoever inserts them (the
-- library, `engine enqueue`, plain SQL), in the inserting transaction: PostgreSQL
-- delivers the notification at commit, and drops it on rollback.
--
-- One notification per inserting statement, not per row: a bulk insert of 10,000
-- tasks sends one, whose payload says how many tasks are runnable now (the listener
-- wakes that many idle workers, no more), the first id (which also keeps two
-- statements of one transaction from being merged into one notification) and the
-- earliest due time among the scheduled ones.
--
-- The channel is `<schema>.task_engine`: two engines that share a database in two
-- schemas do not wake each other. The engine computes the same name
-- (`task_engine::channel_name`).
--
-- A transaction that has called NOTIFY takes a cluster-wide lock from its commit to
-- the end of its WAL flush, so notifying inserts commit one at a time. That caps
-- concurrent single-task enqueues; the throughput work replaces this function with one
-- that notifies only when an instance is asleep.
CREATE FUNCTION task_engine_notify_insert() RETURNS trigger
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

CREATE TRIGGER tasks_notify_insert
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT
    EXECUTE FUNCTION task_engine_notify_insert();
