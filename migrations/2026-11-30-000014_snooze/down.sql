ALTER TABLE task_executions DROP COLUMN snoozed_until;
