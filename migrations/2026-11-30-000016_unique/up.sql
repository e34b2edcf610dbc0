-- Unique tasks (`NewTask::unique_key`): at most one task holds a key. `unique_scope`
-- says while when: 'waiting' (the default) lets the key go when the task starts,
-- 'running' keeps it until the task ends, and 'released' means the task let it go
-- while it could not come back to it safely (it went back to waiting after a run, or an
-- operator retried it), so that a transition never collides with a newer holder.
ALTER TABLE tasks ADD COLUMN unique_key text;
ALTER TABLE tasks ADD COLUMN unique_scope text NOT NULL DEFAULT 'waiting'
    CHECK (unique_scope IN ('waiting', 'running', 'released'));

-- Partial: only holders are indexed, so a task without a key, or past its scope, costs
-- nothing here; a claim moves a 'waiting' holder out of the index, a completion every
-- holder.
CREATE UNIQUE INDEX tasks_unique_key_idx ON tasks (unique_key)
    WHERE unique_key IS NOT NULL
      AND (status = 'waiting' AND unique_scope <> 'released' OR status = 'running' AND unique_scope = 'running');
