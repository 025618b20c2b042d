-- 0002: money an admin can close (issue 11), as on SQLite: explicit overruns, append-only
-- resolutions of uncertain settlements, caps on both in the schema, the resolution-log outbox.

ALTER TABLE settlements ADD COLUMN overrun BIGINT NOT NULL DEFAULT 0 CHECK (overrun >= 0);
ALTER TABLE usage ADD COLUMN overrun BIGINT NOT NULL DEFAULT 0;
CREATE INDEX holds_by_time ON holds (created_at);

CREATE FUNCTION settlement_within_hold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE h holds%ROWTYPE;
BEGIN
    SELECT * INTO h FROM holds WHERE request_id = NEW.request_id;
    IF FOUND AND (NEW.amount > h.amount
            OR NEW.images > h.n
            OR (NEW.state = 'released' AND (NEW.amount <> 0 OR NEW.overrun <> 0))
            OR (NEW.state = 'uncertain' AND (NEW.amount <> h.amount OR NEW.overrun <> 0))
            OR (NEW.overrun > 0 AND NOT EXISTS
                (SELECT 1 FROM tasks t WHERE t.request_id = NEW.request_id))) THEN
        RAISE EXCEPTION 'settlement_above_hold' USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER settlement_within_hold BEFORE INSERT ON settlements
    FOR EACH ROW EXECUTE FUNCTION settlement_within_hold();

CREATE OR REPLACE FUNCTION settlement_moves_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE usage u SET
        reserved  = u.reserved - h.amount,
        spent     = u.spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun
                                             ELSE 0 END,
        uncertain = u.uncertain + CASE NEW.state WHEN 'uncertain' THEN NEW.amount ELSE 0 END,
        overrun   = u.overrun + NEW.overrun
      FROM holds h
     WHERE h.request_id = NEW.request_id AND u.team = h.team AND u.period = h.period;
    RETURN NEW;
END $$;

CREATE TABLE resolutions (
    request_id  TEXT PRIMARY KEY REFERENCES settlements (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released')),
    images      INTEGER NOT NULL CHECK (images >= 0),
    amount      BIGINT NOT NULL CHECK (amount >= 0),
    overrun     BIGINT NOT NULL DEFAULT 0 CHECK (overrun >= 0),
    reason      TEXT NOT NULL CHECK (trim(reason) <> ''),
    actor       TEXT NOT NULL CHECK (actor IN ('admin', 'gateway')),
    resolved_at DOUBLE PRECISION NOT NULL
);

CREATE FUNCTION resolution_of_uncertain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE s settlements%ROWTYPE; h holds%ROWTYPE;
BEGIN
    SELECT * INTO s FROM settlements WHERE request_id = NEW.request_id AND state = 'uncertain';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not_uncertain' USING ERRCODE = '23514';
    END IF;
    SELECT * INTO h FROM holds WHERE request_id = NEW.request_id;
    IF NEW.amount > s.amount OR NEW.images > h.n
            OR (NEW.state = 'released' AND (NEW.amount <> 0 OR NEW.overrun <> 0 OR NEW.images <> 0))
            OR (NEW.overrun > 0 AND NOT EXISTS
                (SELECT 1 FROM tasks t WHERE t.request_id = NEW.request_id)) THEN
        RAISE EXCEPTION 'resolution_above_hold' USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER resolution_of_uncertain BEFORE INSERT ON resolutions
    FOR EACH ROW EXECUTE FUNCTION resolution_of_uncertain();

CREATE FUNCTION resolution_moves_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE usage u SET
        uncertain = u.uncertain - s.amount,
        spent     = u.spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun
                                             ELSE 0 END,
        overrun   = u.overrun + NEW.overrun
      FROM settlements s JOIN holds h USING (request_id)
     WHERE s.request_id = NEW.request_id AND u.team = h.team AND u.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER resolution_moves_money AFTER INSERT ON resolutions
    FOR EACH ROW EXECUTE FUNCTION resolution_moves_money();
CREATE TRIGGER resolutions_append_only BEFORE UPDATE OR DELETE ON resolutions
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

CREATE TABLE resolution_log (
    request_id TEXT PRIMARY KEY REFERENCES resolutions (request_id),
    logged_at  DOUBLE PRECISION NOT NULL
);
