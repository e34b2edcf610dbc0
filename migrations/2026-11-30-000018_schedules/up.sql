-- Recurring tasks: a schedule enqueues a task at each tick of its cron expression, in
-- its time zone. `last_tick` is the last tick dealt with (enqueued, or missed and
-- skipped): the instance that enqueues a tick moves it in the same transaction, under
-- the row's lock, so each tick is enqueued once whichever instances run.
CREATE TABLE task_engine_schedules (
    name            text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    cron            text        NOT NULL,
    time_zone       text        NOT NULL DEFAULT 'UTC',
    task_class      text        NOT NULL,
    task_parameters jsonb       NOT NULL DEFAULT '{}',
    queue           text        NOT NULL DEFAULT 'default',
    priority        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL DEFAULT 25 CHECK (max_attempts >= 1),
    -- Ticks missed (no instance enqueued them in time) enqueued when an instance comes
    -- back: the most recent `catch_up` of them; 0 skips them.
    catch_up        integer     NOT NULL DEFAULT 0 CHECK (catch_up >= 0),
    last_tick       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
