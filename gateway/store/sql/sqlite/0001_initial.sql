-- 0001: the schema of release 0.1 (holds, settlements, usage counters, tasks, idempotency).
-- A 0.1 database is at this version already; it is never run on one.

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE holds (
    request_id  TEXT PRIMARY KEY,
    team        TEXT NOT NULL,
    period      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    endpoint    TEXT NOT NULL,
    mode        TEXT NOT NULL CHECK (mode IN ('sync', 'async')),
    quality     TEXT NOT NULL,
    n           INTEGER NOT NULL CHECK (n >= 1),
    unit_price  INTEGER NOT NULL CHECK (unit_price >= 0),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    budget      INTEGER NOT NULL,
    fingerprint TEXT NOT NULL
);
CREATE INDEX holds_by_fingerprint ON holds (team, fingerprint, created_at);
CREATE INDEX holds_by_period ON holds (team, period);

CREATE TABLE settlements (
    request_id  TEXT PRIMARY KEY REFERENCES holds (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released', 'uncertain')),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    images      INTEGER NOT NULL DEFAULT 0 CHECK (images >= 0),
    upstream_id TEXT,
    reason      TEXT,
    result      TEXT,
    settled_at  REAL NOT NULL
);

CREATE TABLE usage (
    team      TEXT NOT NULL,
    period    TEXT NOT NULL,
    spent     INTEGER NOT NULL DEFAULT 0,
    reserved  INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (team, period)
) WITHOUT ROWID;

CREATE TRIGGER hold_reserves BEFORE INSERT ON holds
BEGIN
    INSERT OR IGNORE INTO usage (team, period) VALUES (NEW.team, NEW.period);
    SELECT RAISE(ABORT, 'budget_exceeded') FROM usage
     WHERE team = NEW.team AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount > NEW.budget;
    UPDATE usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND period = NEW.period;
END;

CREATE TRIGGER settlement_moves_money AFTER INSERT ON settlements
BEGIN
    UPDATE usage SET
        reserved  = reserved - (SELECT amount FROM holds WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount ELSE 0 END,
        uncertain = uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END
     WHERE (team, period) = (SELECT team, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER holds_no_update BEFORE UPDATE ON holds
BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER holds_no_delete BEFORE DELETE ON holds
BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER settlements_no_update BEFORE UPDATE ON settlements
BEGIN SELECT RAISE(ABORT, 'settlements are append-only'); END;
CREATE TRIGGER settlements_no_delete BEFORE DELETE ON settlements
BEGIN SELECT RAISE(ABORT, 'settlements are append-only'); END;

CREATE VIEW ledger AS
SELECT h.request_id, h.team, h.period, h.created_at, h.endpoint, h.mode, h.quality, h.n,
       h.unit_price, h.amount AS held, COALESCE(s.state, 'held') AS state,
       COALESCE(s.amount, 0) AS settled, s.images, s.upstream_id, s.reason, s.settled_at
  FROM holds h LEFT JOIN settlements s USING (request_id);

CREATE TABLE tasks (
    task_id      TEXT PRIMARY KEY,
    team         TEXT NOT NULL,
    request_id   TEXT NOT NULL UNIQUE REFERENCES holds (request_id),
    created_at   REAL NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'completed', 'failed')),
    result       TEXT,
    polls        INTEGER NOT NULL DEFAULT 0,
    next_poll_at REAL NOT NULL
);
CREATE INDEX tasks_due ON tasks (status, next_poll_at);

CREATE TABLE idempotency (
    team        TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    status      INTEGER,
    body        TEXT,
    headers     TEXT,
    PRIMARY KEY (team, key)
);
CREATE INDEX idempotency_by_age ON idempotency (created_at);
