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

-- The reservation in one round trip: insert the hold (its trigger checks and moves the money,
-- or raises budget_exceeded / key_budget_exceeded) and return the team's usage after it.
CREATE FUNCTION reserve_hold(
    p_request_id TEXT, p_team TEXT, p_period TEXT, p_created_at DOUBLE PRECISION,
    p_endpoint TEXT, p_mode TEXT, p_quality TEXT, p_n INTEGER, p_unit_price BIGINT,
    p_amount BIGINT, p_budget BIGINT, p_fingerprint TEXT, p_key_id TEXT, p_key_fp TEXT,
    p_key_budget BIGINT, p_end_user TEXT, p_instance_id TEXT
) RETURNS TABLE (spent BIGINT, reserved BIGINT, uncertain BIGINT, overrun BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO holds (request_id, team, period, created_at, endpoint, mode, quality, n,
                       unit_price, amount, budget, fingerprint, key_id, key_fp, key_budget,
                       end_user, instance_id)
    VALUES (p_request_id, p_team, p_period, p_created_at, p_endpoint, p_mode, p_quality, p_n,
            p_unit_price, p_amount, p_budget, p_fingerprint, p_key_id, p_key_fp, p_key_budget,
            p_end_user, p_instance_id);
    RETURN QUERY SELECT u.spent, u.reserved, u.uncertain, u.overrun FROM usage u
                  WHERE u.team = p_team AND u.period = p_period;
END $$;
