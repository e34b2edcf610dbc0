ALTER FUNCTION task_engine_delete_executions() RESET search_path;
ALTER FUNCTION task_engine_truncate_executions() RESET search_path;
