DROP TABLE task_executions;
DROP TABLE tasks;
