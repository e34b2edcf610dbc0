-- Each instance records its own lease, and is judged dead by it, not by the setting of
-- the instance that judges: during a rolling change of `--lease`, an instance with a
-- short lease must not rob one with a long lease. Null for the rows of instances that
-- predate this migration (they do not write it): those are judged by the judge's
-- lease, as before, not by a default that could be shorter than theirs.
ALTER TABLE task_engine_instances ADD COLUMN lease interval;
