DROP INDEX tasks_running_idx;
DROP TABLE task_engine_instances;
