-- 0001: the schema of release 0.1, as on SQLite: holds, settlements, usage counters, tasks,
-- idempotency. The money moves in triggers, inside the statement that records the hold or its
-- settlement; a copy (image-gateway db copy) sets image_gateway.copying and moves counters
-- itself.

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE holds (
    request_id  TEXT PRIMARY KEY,
    team        TEXT NOT NULL,
    period      TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    endpoint    TEXT NOT NULL,
    mode        TEXT NOT NULL CHECK (mode IN ('sync', 'async')),
    quality     TEXT NOT NULL,
    n           INTEGER NOT NULL CHECK (n >= 1),
    unit_price  BIGINT NOT NULL CHECK (unit_price >= 0),
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    budget      BIGINT NOT NULL,
    fingerprint TEXT NOT NULL
);
CREATE INDEX holds_by_fingerprint ON holds (team, fingerprint, created_at);
CREATE INDEX holds_by_period ON holds (team, period);

CREATE TABLE settlements (
    request_id  TEXT PRIMARY KEY REFERENCES holds (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released', 'uncertain')),
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    images      INTEGER NOT NULL DEFAULT 0 CHECK (images >= 0),
    upstream_id TEXT,
    reason      TEXT,
    result      TEXT,
    settled_at  DOUBLE PRECISION NOT NULL
);

CREATE TABLE usage (
    team      TEXT NOT NULL,
    period    TEXT NOT NULL,
    spent     BIGINT NOT NULL DEFAULT 0,
    reserved  BIGINT NOT NULL DEFAULT 0,
    uncertain BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (team, period)
);

CREATE FUNCTION gateway_copying() RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT coalesce(current_setting('image_gateway.copying', true), '') = 'on' $$;

CREATE FUNCTION hold_reserves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    INSERT INTO usage (team, period) VALUES (NEW.team, NEW.period) ON CONFLICT DO NOTHING;
    UPDATE usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount <= NEW.budget;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'budget_exceeded' USING ERRCODE = 'P0001';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER hold_reserves BEFORE INSERT ON holds
    FOR EACH ROW EXECUTE FUNCTION hold_reserves();

CREATE FUNCTION settlement_moves_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE usage u SET
        reserved  = u.reserved - h.amount,
        spent     = u.spent + CASE NEW.state WHEN 'captured' THEN NEW.amount ELSE 0 END,
        uncertain = u.uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END
      FROM holds h
     WHERE h.request_id = NEW.request_id AND u.team = h.team AND u.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER settlement_moves_money AFTER INSERT ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlement_moves_money();

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% are append-only', TG_TABLE_NAME USING ERRCODE = '23000';
END $$;
CREATE TRIGGER holds_append_only BEFORE UPDATE OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER settlements_append_only BEFORE UPDATE OR DELETE ON settlements
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

CREATE TABLE tasks (
    task_id      TEXT PRIMARY KEY,
    team         TEXT NOT NULL,
    request_id   TEXT NOT NULL UNIQUE REFERENCES holds (request_id),
    created_at   DOUBLE PRECISION NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'completed', 'failed')),
    result       TEXT,
    polls        INTEGER NOT NULL DEFAULT 0,
    next_poll_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX tasks_due ON tasks (status, next_poll_at);

CREATE TABLE idempotency (
    team        TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    status      INTEGER,
    body        TEXT,
    headers     TEXT,
    PRIMARY KEY (team, key)
);
CREATE INDEX idempotency_by_age ON idempotency (created_at);
