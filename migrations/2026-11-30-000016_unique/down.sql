DROP INDEX tasks_unique_key_idx;
ALTER TABLE tasks DROP COLUMN unique_scope;
ALTER TABLE tasks DROP COLUMN unique_key;
