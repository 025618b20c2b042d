-- 0004: several instances (issue 14). On SQLite there is one process per file, so these
-- columns only keep both schemas alike for `db copy`; SQLite leaves them empty (a copied hold
-- without an instance belongs to no live instance, as it should).

ALTER TABLE holds ADD COLUMN instance_id TEXT;
ALTER TABLE idempotency ADD COLUMN instance_id TEXT;
