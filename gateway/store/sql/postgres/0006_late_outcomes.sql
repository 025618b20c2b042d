-- 0006: outcomes learned late, and liveness that survives a database outage (issue 19).
--
-- Corrections, as on SQLite: an entry that was closed (released, captured, or resolved) and
-- turns out to have been served gets an append-only correction, counted in spent; a resolution
-- keeps the upstream id its outcome came with; the ledger view counts and lists corrections.
--
-- Liveness: an instance is silent only for the time the instance judging it could itself reach
-- the database. Each instance records since when it has reached it without a break
-- (reachable_since, reset after a failure or a gap of half its lease), and silence is counted
-- from the latest of the other's heartbeat, that moment and the server's own start. A
-- reservation registers its instance again if the fleet had taken it for dead, and refreshes
-- a stale heartbeat, in the same transaction as its hold: no hold is ever in flight under an
-- instance that looks gone.
--
-- Expand-only: the previous release keeps working on this schema (reserve_hold keeps its
-- signature; new columns have defaults).

ALTER TABLE resolutions ADD COLUMN upstream_id TEXT;

CREATE TABLE corrections (
    request_id   TEXT NOT NULL REFERENCES settlements (request_id),
    images       INTEGER NOT NULL CHECK (images >= 0),
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    reason       TEXT NOT NULL CHECK (trim(reason) <> ''),
    upstream_id  TEXT,
    corrected_at DOUBLE PRECISION NOT NULL,
    CHECK (images > 0 OR amount > 0)
);
CREATE INDEX corrections_by_request ON corrections (request_id);

CREATE FUNCTION correction_of_closed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s settlements%ROWTYPE; r resolutions%ROWTYPE; h holds%ROWTYPE;
    resolved BOOLEAN; charged_images INTEGER;
BEGIN
    SELECT * INTO s FROM settlements WHERE request_id = NEW.request_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not_closed' USING ERRCODE = '23514';
    END IF;
    SELECT * INTO r FROM resolutions WHERE request_id = NEW.request_id;
    resolved := FOUND;
    IF s.state = 'uncertain' AND NOT resolved THEN
        RAISE EXCEPTION 'not_closed' USING ERRCODE = '23514';
    END IF;
    SELECT * INTO h FROM holds WHERE request_id = NEW.request_id;
    charged_images := COALESCE(r.images, s.images)
        + (SELECT COALESCE(SUM(c.images), 0) FROM corrections c
            WHERE c.request_id = NEW.request_id);
    IF NEW.images + charged_images > h.n THEN
        RAISE EXCEPTION 'correction_above_hold' USING ERRCODE = '23514';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER correction_of_closed BEFORE INSERT ON corrections
    FOR EACH ROW EXECUTE FUNCTION correction_of_closed();

-- Team row first, then the key's (trigger names fire in order), as everywhere.
CREATE FUNCTION correction_moves_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE usage u SET spent = u.spent + NEW.amount
      FROM holds h
     WHERE h.request_id = NEW.request_id AND u.team = h.team AND u.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER correction_moves_money AFTER INSERT ON corrections
    FOR EACH ROW EXECUTE FUNCTION correction_moves_money();

CREATE FUNCTION correction_moves_key_money() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF gateway_copying() THEN RETURN NEW; END IF;
    UPDATE key_usage k SET spent = k.spent + NEW.amount
      FROM holds h
     WHERE h.request_id = NEW.request_id
       AND k.team = h.team AND k.key_fp = h.key_fp AND k.period = h.period;
    RETURN NEW;
END $$;
CREATE TRIGGER correction_moves_money_of_key AFTER INSERT ON corrections
    FOR EACH ROW EXECUTE FUNCTION correction_moves_key_money();
CREATE TRIGGER corrections_append_only BEFORE UPDATE OR DELETE ON corrections
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

DROP VIEW ledger;
CREATE VIEW ledger AS
SELECT h.request_id, h.team, h.period, h.created_at, h.endpoint, h.mode, h.quality, h.n,
       h.unit_price, h.amount AS held,
       COALESCE(r.state, s.state, 'held') AS state,
       COALESCE(s.state, 'held') AS settled_state,
       COALESCE(s.amount, 0) AS settled,
       COALESCE(s.images, 0) AS images,
       COALESCE(s.overrun, 0) AS overrun,
       COALESCE(s.upstream_id, r.upstream_id, c.upstream_id) AS upstream_id,
       t.task_id, s.reason, s.settled_at,
       r.state AS resolved_state, r.images AS resolved_images, r.amount AS resolved_amount,
       r.overrun AS resolved_overrun, r.reason AS resolved_reason, r.actor AS resolved_by,
       r.resolved_at,
       CASE WHEN r.state = 'captured' THEN r.amount + r.overrun
            WHEN r.state IS NOT NULL THEN 0
            WHEN s.state = 'captured' THEN s.amount + s.overrun
            ELSE 0 END + COALESCE(c.amount, 0) AS charged,
       h.key_id, h.key_fp, h.end_user,
       COALESCE(c.images, 0) AS corrected_images,
       COALESCE(c.list, '[]') AS corrections
  FROM holds h
  LEFT JOIN settlements s USING (request_id)
  LEFT JOIN resolutions r USING (request_id)
  LEFT JOIN tasks t ON t.request_id = h.request_id
  LEFT JOIN (SELECT request_id, SUM(images)::integer AS images, SUM(amount)::bigint AS amount,
                    MAX(upstream_id) AS upstream_id,
                    json_agg(json_build_object('images', images, 'amount', amount,
                                               'reason', reason, 'at', corrected_at)
                             ORDER BY corrected_at)::text AS list
               FROM corrections GROUP BY request_id) c ON c.request_id = h.request_id;

-- Liveness.
ALTER TABLE instances ADD COLUMN reachable_since TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE instances ADD COLUMN lease_s DOUBLE PRECISION NOT NULL DEFAULT 30;

-- Whether an instance whose last heartbeat was p_heartbeat has been silent for p_lease seconds
-- in the eyes of p_observer: counted only while the observer reached the database, and since
-- the server started.
CREATE FUNCTION instance_silent(
    p_heartbeat TIMESTAMPTZ, p_observer TEXT, p_lease DOUBLE PRECISION
) RETURNS BOOLEAN LANGUAGE sql STABLE AS $$
    SELECT greatest(p_heartbeat, pg_postmaster_start_time(),
                    (SELECT o.reachable_since FROM instances o WHERE o.instance_id = p_observer))
           < now() - make_interval(secs => p_lease)
$$;

-- A heartbeat: registers the instance again if the fleet had taken it for dead (true then).
-- After a failure the instance saw (p_lost) or a gap of half its lease, it has not been
-- watching the fleet: its reachable_since starts again.
CREATE FUNCTION instance_heartbeat(
    p_instance_id TEXT, p_host TEXT, p_pid INTEGER, p_lease DOUBLE PRECISION, p_lost BOOLEAN
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instances
       SET heartbeat_at = now(), host = p_host, pid = p_pid, lease_s = p_lease,
           reachable_since = CASE
               WHEN p_lost OR heartbeat_at < now() - make_interval(secs => p_lease / 2)
               THEN now() ELSE reachable_since END
     WHERE instance_id = p_instance_id;
    IF FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO instances (instance_id, host, pid, lease_s)
    VALUES (p_instance_id, p_host, p_pid, p_lease)
        ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), reachable_since = now();
    RETURN true;
END $$;

-- The reservation, as in 0004, made under a registered instance whose heartbeat is fresh. A
-- heartbeat older than half the lease (the instance was paused, or lost the database) is
-- refreshed here, so a reaper that waited on this statement finds it alive; a missing row
-- (taken for dead meanwhile) is inserted again (the id's first part as its host until the next
-- heartbeat fills in the rest). A fresh heartbeat costs nothing: no row is written.
CREATE OR REPLACE FUNCTION reserve_hold(
    p_request_id TEXT, p_team TEXT, p_period TEXT, p_created_at DOUBLE PRECISION,
    p_endpoint TEXT, p_mode TEXT, p_quality TEXT, p_n INTEGER, p_unit_price BIGINT,
    p_amount BIGINT, p_budget BIGINT, p_fingerprint TEXT, p_key_id TEXT, p_key_fp TEXT,
    p_key_budget BIGINT, p_end_user TEXT, p_instance_id TEXT
) RETURNS TABLE (spent BIGINT, reserved BIGINT, uncertain BIGINT, overrun BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_instance_id IS NOT NULL THEN
        UPDATE instances i SET heartbeat_at = now(), reachable_since = now()
         WHERE i.instance_id = p_instance_id
           AND i.heartbeat_at < now() - make_interval(secs => i.lease_s / 2);
        IF NOT FOUND AND NOT EXISTS
                (SELECT 1 FROM instances i WHERE i.instance_id = p_instance_id) THEN
            INSERT INTO instances (instance_id, host, pid)
            VALUES (p_instance_id, split_part(p_instance_id, ':', 1), 0)
                ON CONFLICT (instance_id) DO NOTHING;
        END IF;
    END IF;
    INSERT INTO holds (request_id, team, period, created_at, endpoint, mode, quality, n,
                       unit_price, amount, budget, fingerprint, key_id, key_fp, key_budget,
                       end_user, instance_id)
    VALUES (p_request_id, p_team, p_period, p_created_at, p_endpoint, p_mode, p_quality, p_n,
            p_unit_price, p_amount, p_budget, p_fingerprint, p_key_id, p_key_fp, p_key_budget,
            p_end_user, p_instance_id);
    RETURN QUERY SELECT u.spent, u.reserved, u.uncertain, u.overrun FROM usage u
                  WHERE u.team = p_team AND u.period = p_period;
END $$;
