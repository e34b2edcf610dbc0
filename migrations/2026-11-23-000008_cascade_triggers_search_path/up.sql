-- The cascade triggers of the seventh migration name `task_executions` unqualified:
-- run from a session whose search_path points at another deployment's schema, a
-- DELETE or TRUNCATE of this schema's tasks would reach that schema's executions. Pin
-- each function's search_path to the one this migration runs with (the deployment's
-- schema), as the foreign key was pinned to its table.
ALTER FUNCTION task_engine_delete_executions() SET search_path FROM CURRENT;
ALTER FUNCTION task_engine_truncate_executions() SET search_path FROM CURRENT;
