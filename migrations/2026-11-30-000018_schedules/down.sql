DROP TABLE task_engine_schedules;
