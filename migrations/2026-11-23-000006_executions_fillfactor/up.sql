-- An execution row is inserted at the claim and updated once, at the attempt's end
-- (stopped_at, result, error). None of those columns is indexed, so the update can be
-- HOT (no new index entries) if the row's page has room for the new version: leave
-- 15% of each page free for it.
ALTER TABLE task_executions SET (fillfactor = 85);
