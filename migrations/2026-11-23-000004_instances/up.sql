-- Instance liveness: every running instance keeps a row here and renews
-- `last_seen_at` (its heartbeat) several times per lease. When an instance's lease has
-- expired, a live instance puts its running tasks back to waiting, recording the lost
-- attempt on its execution. An instance also holds a session-level advisory lock on
-- its name for as long as its heartbeat connection lives: a second live instance
-- cannot take the name, and an instance restarting under its name knows, by getting
-- the lock, that the previous holder is gone and recovers its tasks at once.
CREATE TABLE task_engine_instances (
    name         TEXT        PRIMARY KEY,
    host         TEXT        NOT NULL,
    pid          INTEGER     NOT NULL,
    -- the task types it runs
    task_types   TEXT[]      NOT NULL DEFAULT '{}',
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Running tasks by instance: for the rescue and for `engine status`. Partial, so it
-- holds only the few tasks running at any moment.
CREATE INDEX tasks_running_idx ON tasks (instance) WHERE status = 'running';
