-- Each instance records the queues it runs, so that `engine status` and `engine queue
-- list` can say when no live instance runs a queue whose tasks wait (they would wait
-- for ever, and look healthy). Null in the rows of instances that predate this
-- migration (they do not write it): such an instance may run any queue, and no queue
-- is flagged while one lives. A nullable column without a default: no table rewrite.
ALTER TABLE task_engine_instances ADD COLUMN queues text[];
