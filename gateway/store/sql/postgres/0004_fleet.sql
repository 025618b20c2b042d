-- 0004: several instances (issue 14). Each instance heartbeats; the holds and Idempotency-Key
-- claims of one silent past its lease are closed by the others. Limits, in-flight admissions
-- and the task poll cache are shared by the fleet.

ALTER TABLE holds ADD COLUMN instance_id TEXT;
ALTER TABLE idempotency ADD COLUMN instance_id TEXT;
CREATE INDEX holds_open_by_instance ON holds (instance_id);

CREATE TABLE instances (
    instance_id  TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per request admitted under a max_concurrent scope, deleted when it ends (or when
-- its instance is found dead).
CREATE TABLE admissions (
    request_id  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    PRIMARY KEY (request_id, scope)
);
CREATE INDEX admissions_by_scope ON admissions (scope);
CREATE INDEX admissions_by_instance ON admissions (instance_id);

-- One row per request under an rpm scope, kept for the limit's window.
CREATE TABLE rate_events (
    scope TEXT NOT NULL,
    at    DOUBLE PRECISION NOT NULL
);
CREATE INDEX rate_events_by_scope ON rate_events (scope, at);

-- The fleet's task poll cache: the last answer of a pending task, and who is fetching it.
ALTER TABLE tasks ADD COLUMN answer TEXT;
ALTER TABLE tasks ADD COLUMN answered_at DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN fetching_until DOUBLE PRECISION;
