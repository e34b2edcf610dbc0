-- What a running task says of itself (`ctx.progress`, `ctx.checkpoint`): written to its
-- row at most once a second, and at the attempt's end. The checkpoint outlives the
-- attempt: the next one reads it (`ctx.last_checkpoint`) and resumes from it.
ALTER TABLE tasks ADD COLUMN progress smallint CHECK (progress BETWEEN 0 AND 100);
ALTER TABLE tasks ADD COLUMN progress_message text;
ALTER TABLE tasks ADD COLUMN checkpoint jsonb;
