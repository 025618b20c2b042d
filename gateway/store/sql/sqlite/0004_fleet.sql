-- 0004: several instances (issue 14). On SQLite there is one process per file, so only the
-- attribution is kept: which process (instance) placed each hold and claimed each key.

ALTER TABLE holds ADD COLUMN instance_id TEXT;
ALTER TABLE idempotency ADD COLUMN instance_id TEXT;
