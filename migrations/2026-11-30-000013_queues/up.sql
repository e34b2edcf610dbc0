-- Named queues, their limits and pause, and fair dispatch by key.
--
-- Every task belongs to a queue (`default` unless the type or the enqueue says
-- otherwise) and may carry a key (a tenant, a customer; '' for none). An instance
-- runs the queues it is told to, each with its own workers, and claims from one queue
-- at a time. Adding a column with a constant default rewrites nothing.
ALTER TABLE tasks ADD COLUMN queue text NOT NULL DEFAULT 'default'
    CONSTRAINT tasks_queue_named CHECK (queue <> '' AND length(queue) <= 200);
ALTER TABLE tasks ADD COLUMN fair_key text NOT NULL DEFAULT '';

-- The claim walks a queue's waiting tasks type by type, priority by priority and key
-- by key (see `claim` in src/db/tasks.rs): each (queue, type, priority, key) is one
-- range, in claim order within it, its due tasks first. A key's backlog is never
-- walked over to reach another key's tasks.
CREATE INDEX tasks_queue_claim_idx ON tasks (queue, task_class, priority DESC, fair_key, run_at, id)
    WHERE status = 'waiting';
DROP INDEX tasks_claim_idx;
ALTER INDEX tasks_queue_claim_idx RENAME TO tasks_claim_idx;

-- What runs in a queue, and of one key in it: counted by the claim of a queue with a
-- limit (under the queue's row lock, so that the count is exact). It replaces the
-- index of running tasks by instance, so that a claim still adds one entry per task
-- to an index of running tasks, not two: the rescue, which looks for an instance's
-- running tasks, reads them all (they are few, and it runs every few seconds at most).
CREATE INDEX tasks_running_by_queue_idx ON tasks (queue, fair_key, instance) WHERE status = 'running';
DROP INDEX tasks_running_idx;
ALTER INDEX tasks_running_by_queue_idx RENAME TO tasks_running_idx;

-- A queue's settings; a queue without a row has none (not paused, no limit). Changed
-- at run time by `engine queue ...` or the library; read by every claim.
CREATE TABLE task_engine_queues (
    name            text PRIMARY KEY CHECK (name <> '' AND length(name) <= 200),
    paused          boolean NOT NULL DEFAULT false,
    -- At most this many of its tasks running at once, across all instances.
    concurrency     integer CHECK (concurrency >= 0),
    -- At most this many tasks of one key running at once.
    key_concurrency integer CHECK (key_concurrency >= 1),
    -- At most `rate_limit` claims per window of `rate_period`; a window starts at the
    -- first claim after the last one ended.
    rate_limit      integer CHECK (rate_limit >= 1),
    rate_period     interval CHECK (rate_period > interval '0'),
    window_start    timestamptz,
    window_count    integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_limit IS NULL) = (rate_period IS NULL))
);
