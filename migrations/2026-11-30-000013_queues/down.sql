DROP TABLE task_engine_queues;
DROP INDEX tasks_queue_running_idx;
ALTER INDEX tasks_claim_idx RENAME TO tasks_queue_claim_idx;
CREATE INDEX tasks_claim_idx ON tasks (task_class, priority DESC, run_at, id)
    WHERE status = 'waiting';
DROP INDEX tasks_queue_claim_idx;
ALTER TABLE tasks DROP COLUMN fair_key;
ALTER TABLE tasks DROP COLUMN queue;
