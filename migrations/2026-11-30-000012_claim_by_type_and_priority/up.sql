-- The claim walks waiting tasks type by type and priority by priority (see `claim` in
-- src/db/tasks.rs): each (type, priority) is one range of this index, in claim order
-- within it, and the tasks due now are its first entries. Tasks of types no running
-- instance knows, and tasks due later, are never walked over, whatever their number
-- or priority. It replaces the two indexes the claim and the scheduler used, so that
-- an insert, a retry or a give-back adds one index entry besides the key, not two.
CREATE INDEX tasks_claim_idx ON tasks (task_class, priority DESC, run_at, id)
    WHERE status = 'waiting';

DROP INDEX tasks_waiting_idx;
DROP INDEX tasks_scheduled_idx;
