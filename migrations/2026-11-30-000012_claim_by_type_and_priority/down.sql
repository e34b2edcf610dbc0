CREATE INDEX tasks_waiting_idx ON tasks (priority DESC, run_at, id)
    WHERE status = 'waiting';
CREATE INDEX tasks_scheduled_idx ON tasks (run_at)
    WHERE status = 'waiting' AND run_at > created_at;
DROP INDEX tasks_claim_idx;
