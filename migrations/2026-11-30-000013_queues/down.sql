DROP TABLE task_engine_queues;
ALTER INDEX tasks_running_idx RENAME TO tasks_running_by_queue_idx;
CREATE INDEX tasks_running_idx ON tasks (instance) WHERE status = 'running';
DROP INDEX tasks_running_by_queue_idx;
ALTER INDEX tasks_claim_idx RENAME TO tasks_queue_claim_idx;
CREATE INDEX tasks_claim_idx ON tasks (task_class, priority DESC, run_at, id)
    WHERE status = 'waiting';
DROP INDEX tasks_queue_claim_idx;
ALTER TABLE tasks DROP COLUMN fair_key;
ALTER TABLE tasks DROP COLUMN queue;
