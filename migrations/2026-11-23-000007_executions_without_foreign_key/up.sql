-- Executions without a foreign key: the cascade kept by triggers.
--
-- The foreign key from task_executions.task_id to tasks checked every execution the
-- claim opened: one lookup per row and a row lock (FOR KEY SHARE) on a task row the
-- claim had just updated, i.e. one more WAL record per task. Measured on the 20,000
-- task drain (8 workers, 2 cores): 33,500 tasks/s with the key, 41,400 without it.
--
-- The key guarded nothing the engine needs: executions are only inserted by the claim,
-- in the statement that locks and updates their task, from that update's rows, so an
-- execution never names a task that does not exist. What the key also did, deleting a
-- task's executions with it (`engine prune`, or a plain `DELETE FROM tasks`), these
-- triggers do, once per statement; `TRUNCATE tasks` empties the executions too.
-- Diesel's `joinable!` for the relation is declared in src/models.rs, since
-- `diesel print-schema` only derives it from a foreign key.
ALTER TABLE task_executions DROP CONSTRAINT task_executions_task_id_fkey;

CREATE FUNCTION task_engine_delete_executions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Through task_executions_task_id_idx, one probe per deleted task.
    DELETE FROM task_executions WHERE task_id = ANY(ARRAY(SELECT id FROM deleted));
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_delete_executions
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT
    EXECUTE FUNCTION task_engine_delete_executions();

CREATE FUNCTION task_engine_truncate_executions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE task_executions;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_truncate_executions
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT
    EXECUTE FUNCTION task_engine_truncate_executions();
