-- 0002: money an admin can close (issue 11).
-- Explicit overruns on settlements (only a billed task can overrun its hold); resolutions of uncertain settlements (append-only, once);
-- settlements and resolutions capped by their hold in the schema itself; an outbox so that
-- every resolution gets exactly one access-log line; a ledger view with the resolution joined.

ALTER TABLE settlements ADD COLUMN overrun INTEGER NOT NULL DEFAULT 0 CHECK (overrun >= 0);
ALTER TABLE usage ADD COLUMN overrun INTEGER NOT NULL DEFAULT 0;
CREATE INDEX holds_by_time ON holds (created_at);

CREATE TRIGGER settlement_within_hold BEFORE INSERT ON settlements
BEGIN
    SELECT RAISE(ABORT, 'settlement_above_hold') FROM holds h
     WHERE h.request_id = NEW.request_id
       AND (NEW.amount > h.amount
            OR NEW.images > h.n
            OR (NEW.state = 'released' AND (NEW.amount != 0 OR NEW.overrun != 0))
            OR (NEW.state = 'uncertain' AND (NEW.amount != h.amount OR NEW.overrun != 0))
            OR (NEW.overrun > 0 AND NOT EXISTS
                (SELECT 1 FROM tasks t WHERE t.request_id = NEW.request_id)));
END;

DROP TRIGGER settlement_moves_money;
CREATE TRIGGER settlement_moves_money AFTER INSERT ON settlements
BEGIN
    UPDATE usage SET
        reserved  = reserved - (SELECT amount FROM holds WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun ELSE 0 END,
        uncertain = uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END,
        overrun   = overrun + NEW.overrun
     WHERE (team, period) = (SELECT team, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TABLE resolutions (
    request_id  TEXT PRIMARY KEY REFERENCES settlements (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released')),
    images      INTEGER NOT NULL CHECK (images >= 0),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    overrun     INTEGER NOT NULL DEFAULT 0 CHECK (overrun >= 0),
    reason      TEXT NOT NULL CHECK (trim(reason) != ''),
    actor       TEXT NOT NULL CHECK (actor IN ('admin', 'gateway')),
    resolved_at REAL NOT NULL
);

CREATE TRIGGER resolution_of_uncertain BEFORE INSERT ON resolutions
BEGIN
    SELECT RAISE(ABORT, 'not_uncertain') WHERE NOT EXISTS
        (SELECT 1 FROM settlements WHERE request_id = NEW.request_id AND state = 'uncertain');
    SELECT RAISE(ABORT, 'resolution_above_hold') FROM settlements s JOIN holds h USING (request_id)
     WHERE s.request_id = NEW.request_id
       AND (NEW.amount > s.amount
            OR NEW.images > h.n
            OR (NEW.state = 'released' AND (NEW.amount != 0 OR NEW.overrun != 0 OR NEW.images != 0))
            OR (NEW.overrun > 0 AND NOT EXISTS
                (SELECT 1 FROM tasks t WHERE t.request_id = NEW.request_id)));
END;

CREATE TRIGGER resolution_moves_money AFTER INSERT ON resolutions
BEGIN
    UPDATE usage SET
        uncertain = uncertain - (SELECT amount FROM settlements WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun ELSE 0 END,
        overrun   = overrun + NEW.overrun
     WHERE (team, period) = (SELECT team, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER resolutions_no_update BEFORE UPDATE ON resolutions
BEGIN SELECT RAISE(ABORT, 'resolutions are append-only'); END;
CREATE TRIGGER resolutions_no_delete BEFORE DELETE ON resolutions
BEGIN SELECT RAISE(ABORT, 'resolutions are append-only'); END;

-- A resolution's access-log line is written by whichever gateway inserts its row here first.
CREATE TABLE resolution_log (
    request_id TEXT PRIMARY KEY REFERENCES resolutions (request_id),
    logged_at  REAL NOT NULL
);

DROP VIEW ledger;
CREATE VIEW ledger AS
SELECT h.request_id, h.team, h.period, h.created_at, h.endpoint, h.mode, h.quality, h.n,
       h.unit_price, h.amount AS held,
       COALESCE(r.state, s.state, 'held') AS state,
       COALESCE(s.state, 'held') AS settled_state,
       COALESCE(s.amount, 0) AS settled,
       COALESCE(s.images, 0) AS images,
       COALESCE(s.overrun, 0) AS overrun,
       s.upstream_id, t.task_id, s.reason, s.settled_at,
       r.state AS resolved_state, r.images AS resolved_images, r.amount AS resolved_amount,
       r.overrun AS resolved_overrun, r.reason AS resolved_reason, r.actor AS resolved_by,
       r.resolved_at,
       CASE WHEN r.state = 'captured' THEN r.amount + r.overrun
            WHEN r.state IS NOT NULL THEN 0
            WHEN s.state = 'captured' THEN s.amount + s.overrun
            ELSE 0 END AS charged
  FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id;
