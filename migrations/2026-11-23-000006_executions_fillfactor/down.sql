ALTER TABLE task_executions RESET (fillfactor);
