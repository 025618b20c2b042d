-- 0003: named keys (issue 13), as on SQLite: key attribution on holds, key_usage counters, and
-- a capped key's reservation checked in the same statement as the team's budget.

ALTER TABLE holds ADD COLUMN key_id TEXT;
ALTER TABLE holds ADD COLUMN key_fp TEXT;
ALTER TABLE holds ADD COLUMN key_budget BIGINT CHECK (key_budget IS NULL OR key_budget >= 0);
ALTER TABLE holds ADD COLUMN end_user TEXT;
CREATE INDEX holds_by_key ON holds (key_fp, created_at);

CREATE TABLE key_usage (
    team      TEXT NOT NULL,
    key_fp    TEXT NOT NULL,
    period    TEXT NOT NULL,
    spent     BIGINT NOT NULL DEFAULT 0,
    reserved  BIGINT NOT NULL DEFAULT 0,
    uncertain BIGINT NOT NULL DEFAULT 0,
    overrun   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (team, key_fp, period)
);

-- The team's row is locked first, then the key's, everywhere: no two transactions can wait for
-- each other. PostgreSQL fires triggers of one event in the order of their names, which is why
-- the key triggers' names sort after the team ones (settlement_moves_money, then ..._of_key).
CREATE OR REPLACE FUNCTION hold_reserves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    INSERT INTO usage (team, period) VALUES (NEW.team, NEW.period) ON CONFLICT DO NOTHING;
    UPDATE usage SET reserved = reserved + NEW.amount
     WHERE team = NEW.team AND period = NEW.period
       AND spent + reserved + uncertain + NEW.amount <= NEW.budget;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'budget_exceeded' USING ERRCODE = 'P0001';
    END IF;
    IF NEW.key_fp IS NOT NULL THEN
        INSERT INTO key_usage (team, key_fp, period) VALUES (NEW.team, NEW.key_fp, NEW.period)
            ON CONFLICT DO NOTHING;
        UPDATE key_usage SET reserved = reserved + NEW.amount
         WHERE team = NEW.team AND key_fp = NEW.key_fp AND period = NEW.period
           AND (NEW.key_budget IS NULL
                OR spent + reserved + uncertain + NEW.amount <= NEW.key_budget);
        IF NOT FOUND THEN
            RAISE EXCEPTION 'key_budget_exceeded' USING ERRCODE = 'P0001';
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION settlement_moves_key_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE key_usage k SET
        reserved  = k.reserved - h.amount,
        spent     = k.spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun
                                             ELSE 0 END,
        uncertain = k.uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END,
        overrun   = k.overrun + NEW.overrun
      FROM holds h
     WHERE h.request_id = NEW.request_id
       AND k.team = h.team AND k.key_fp = h.key_fp AND k.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER settlement_moves_money_of_key AFTER INSERT ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlement_moves_key_money();

CREATE FUNCTION resolution_moves_key_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE key_usage k SET
        uncertain = k.uncertain - s.amount,
        spent     = k.spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun
                                             ELSE 0 END,
        overrun   = k.overrun + NEW.overrun
      FROM settlements s JOIN holds h USING (request_id)
     WHERE s.request_id = NEW.request_id
       AND k.team = h.team AND k.key_fp = h.key_fp AND k.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER resolution_moves_money_of_key AFTER INSERT ON resolutions
    FOR EACH ROW EXECUTE FUNCTION resolution_moves_key_money();

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
