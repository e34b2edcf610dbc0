DROP TRIGGER tasks_truncate_executions ON tasks;
DROP FUNCTION task_engine_truncate_executions();
DROP TRIGGER tasks_delete_executions ON tasks;
DROP FUNCTION task_engine_delete_executions();
-- Executions whose task is gone would fail the key.
DELETE FROM task_executions e WHERE NOT EXISTS (SELECT FROM tasks t WHERE t.id = e.task_id);
ALTER TABLE task_executions
    ADD CONSTRAINT task_executions_task_id_fkey
    FOREIGN KEY (task_id) REFERENCES tasks (id) ON DELETE CASCADE;
