-- A task may answer "not now, again in a while" (`TaskError::snooze`): its attempt is
-- recorded with the time it snoozed until, and it waits again without using one of
-- its attempts (its `max_attempts` grows by one).
ALTER TABLE task_executions ADD COLUMN snoozed_until timestamptz;
