ALTER TABLE task_engine_instances DROP COLUMN connections;
