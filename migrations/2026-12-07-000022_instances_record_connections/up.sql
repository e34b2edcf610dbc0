-- Each instance records, at each heartbeat, the connections it holds by role (its
-- session, heartbeat, claims, completer, maintenance, and its tasks' pool), so that
-- `engine status` shows them. Null in the rows of instances that predate this
-- migration (they do not write it). A nullable column without a default: no table
-- rewrite, and the lock it takes on this small table is brief.
ALTER TABLE task_engine_instances ADD COLUMN connections jsonb;
