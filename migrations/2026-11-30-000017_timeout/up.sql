-- A task's own time limit (`NewTask::timeout`), overriding its type's `Task::TIMEOUT`;
-- null: the type's. At the limit the task is asked to stop; past a grace, its attempt
-- is recorded as timed out (see the README's "Timeouts").
ALTER TABLE tasks ADD COLUMN timeout_ms integer CHECK (timeout_ms > 0);
