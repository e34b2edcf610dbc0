-- Each instance records its own lease, and is judged dead by it, not by the setting of
-- the instance that judges: during a rolling change of `--lease`, an instance with a
-- short lease must not rob one with a long lease.
ALTER TABLE task_engine_instances ADD COLUMN lease interval NOT NULL DEFAULT interval '30 seconds';
