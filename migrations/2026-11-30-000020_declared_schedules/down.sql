DROP TABLE task_engine_declarations;
ALTER TABLE task_engine_schedules DROP COLUMN declared_in;
