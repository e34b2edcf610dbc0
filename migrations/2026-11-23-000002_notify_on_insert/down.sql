DROP TRIGGER tasks_notify_insert ON tasks;
DROP FUNCTION task_engine_notify_insert();
