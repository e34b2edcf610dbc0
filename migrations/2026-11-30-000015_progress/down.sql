ALTER TABLE tasks DROP COLUMN checkpoint;
ALTER TABLE tasks DROP COLUMN progress_message;
ALTER TABLE tasks DROP COLUMN progress;
