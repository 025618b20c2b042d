-- 0003: named keys (issue 13). Each hold records the key that made it (its identity then, and
-- its hash prefix, which survives a rename), the key's own cap, and the end user. Spend is
-- counted per key as well as per team, and a capped key's reservation checks both budgets in
-- the same statement.

ALTER TABLE holds ADD COLUMN key_id TEXT;
ALTER TABLE holds ADD COLUMN key_fp TEXT;
ALTER TABLE holds ADD COLUMN key_budget INTEGER CHECK (key_budget IS NULL OR key_budget >= 0);
ALTER TABLE holds ADD COLUMN end_user TEXT;
CREATE INDEX holds_by_key ON holds (key_fp, created_at);

CREATE TABLE key_usage (
    team      TEXT NOT NULL,
    key_fp    TEXT NOT NULL,
    period    TEXT NOT NULL,
    spent     INTEGER NOT NULL DEFAULT 0,
    reserved  INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    overrun   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (team, key_fp, period)
) WITHOUT ROWID;

DROP TRIGGER hold_reserves;
CREATE TRIGGER hold_reserves BEFORE INSERT ON holds
BEGIN
    INSERT OR IGNORE INTO usage (team, period) VALUES (NEW.team, NEW.period);
    SELECT RAISE(ABORT, 'budget_exceeded') FROM usage
     WHERE team = NEW.team AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount > NEW.budget;
    INSERT OR IGNORE INTO key_usage (team, key_fp, period)
        SELECT NEW.team, NEW.key_fp, NEW.period WHERE NEW.key_fp IS NOT NULL;
    SELECT RAISE(ABORT, 'key_budget_exceeded') FROM key_usage
     WHERE NEW.key_budget IS NOT NULL
       AND team = NEW.team AND key_fp = NEW.key_fp AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount > NEW.key_budget;
    UPDATE usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND period = NEW.period;
    UPDATE key_usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND key_fp = NEW.key_fp AND period = NEW.period;
END;

CREATE TRIGGER settlement_moves_key_money AFTER INSERT ON settlements
BEGIN
    UPDATE key_usage SET
        reserved  = reserved - (SELECT amount FROM holds WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun ELSE 0 END,
        uncertain = uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END,
        overrun   = overrun + NEW.overrun
     WHERE (team, key_fp, period) =
           (SELECT team, key_fp, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER resolution_moves_key_money AFTER INSERT ON resolutions
BEGIN
    UPDATE key_usage SET
        uncertain = uncertain - (SELECT amount FROM settlements WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun ELSE 0 END,
        overrun   = overrun + NEW.overrun
     WHERE (team, key_fp, period) =
           (SELECT team, key_fp, period FROM holds WHERE request_id = NEW.request_id);
END;

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
            ELSE 0 END AS charged,
       h.key_id, h.key_fp, h.end_user
  FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id;
