ALTER TABLE task_executions DROP COLUMN interrupted;
