-- An attempt its instance's stop interrupted: the task returned an error (not a
-- permanent one) after its instance asked it to stop (a deploy, Ctrl-C). It waits
-- again at once without using one of its attempts (its `max_attempts` grows by one, as
-- for a snooze), and its execution says so. A constant default: no rewrite of the
-- table, whatever its size.
ALTER TABLE task_executions ADD COLUMN interrupted boolean NOT NULL DEFAULT false;
