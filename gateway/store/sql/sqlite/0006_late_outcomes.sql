-- 0006: outcomes learned late (issue 19). An entry that was closed (released, captured, or
-- resolved) and turns out to have been served gets an append-only correction: the images and
-- amount delivered beyond what it charges, counted in spent as settlements and resolutions
-- are. A resolution keeps the upstream id its outcome came with. The ledger view counts
-- corrections in `charged` and lists them, so `ledger verify` recomputes them too.
-- Expand-only: the previous release keeps working on this schema.

ALTER TABLE resolutions ADD COLUMN upstream_id TEXT;

CREATE TABLE corrections (
    request_id   TEXT NOT NULL REFERENCES settlements (request_id),
    images       INTEGER NOT NULL CHECK (images >= 0),
    amount       INTEGER NOT NULL CHECK (amount >= 0),
    reason       TEXT NOT NULL CHECK (trim(reason) != ''),
    upstream_id  TEXT,
    corrected_at REAL NOT NULL,
    CHECK (images > 0 OR amount > 0)
);
CREATE INDEX corrections_by_request ON corrections (request_id);

-- Only a closed entry is corrected (an uncertain one is resolved instead), and never to more
-- images than were held.
CREATE TRIGGER correction_of_closed BEFORE INSERT ON corrections
BEGIN
    SELECT RAISE(ABORT, 'not_closed') WHERE NOT EXISTS
        (SELECT 1 FROM settlements s LEFT JOIN resolutions r USING (request_id)
          WHERE s.request_id = NEW.request_id
            AND (s.state != 'uncertain' OR r.request_id IS NOT NULL));
    SELECT RAISE(ABORT, 'correction_above_hold')
      FROM holds h JOIN settlements s USING (request_id) LEFT JOIN resolutions r USING (request_id)
     WHERE h.request_id = NEW.request_id
       AND NEW.images + COALESCE(r.images, s.images)
           + (SELECT COALESCE(SUM(c.images), 0) FROM corrections c
               WHERE c.request_id = NEW.request_id) > h.n;
END;

CREATE TRIGGER correction_moves_money AFTER INSERT ON corrections
BEGIN
    UPDATE usage SET spent = spent + NEW.amount
     WHERE (team, period) = (SELECT team, period FROM holds WHERE request_id = NEW.request_id);
    UPDATE key_usage SET spent = spent + NEW.amount
     WHERE (team, key_fp, period) =
           (SELECT team, key_fp, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER corrections_no_update BEFORE UPDATE ON corrections
BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;
CREATE TRIGGER corrections_no_delete BEFORE DELETE ON corrections
BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;

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
  LEFT JOIN (SELECT request_id, SUM(images) AS images, SUM(amount) AS amount,
                    MAX(upstream_id) AS upstream_id,
                    json_group_array(json_object('images', images, 'amount', amount,
                                                 'reason', reason,
                                                 'at', printf('%!.17g', corrected_at))) AS list
               FROM corrections GROUP BY request_id) c ON c.request_id = h.request_id;
