-- 0005: who did it (issue 21). A resolution records its actor by name (an admin key's name, the
-- CLI's --actor, or 'gateway'), no longer only 'admin' or 'gateway'; a hold expired by an admin
-- (`ledger expire`) records who did it, and waits there for a gateway to write its access-log
-- line. Expand-only: the previous release keeps working on this schema.
--
-- SQLite cannot change a CHECK in place, so `resolutions` is rebuilt: a new table with the
-- relaxed check, its rows copied, the old one dropped (with its triggers), the new one renamed,
-- and the triggers of 0002 and 0003 created again as they were. `resolution_log` refers to
-- `resolutions`, so its rows are set aside and it is made again too. legacy_alter_table keeps
-- the rename from rewriting (or refusing over) the `ledger` view, which reads `resolutions` by
-- name and so reads the new table unchanged.

PRAGMA legacy_alter_table = ON;

CREATE TEMP TABLE resolution_log_kept AS SELECT request_id, logged_at FROM resolution_log;
DROP TABLE resolution_log;

CREATE TABLE resolutions_relaxed (
    request_id  TEXT PRIMARY KEY REFERENCES settlements (request_id),
    state       TEXT NOT NULL CHECK (state IN ('captured', 'released')),
    images      INTEGER NOT NULL CHECK (images >= 0),
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    overrun     INTEGER NOT NULL DEFAULT 0 CHECK (overrun >= 0),
    reason      TEXT NOT NULL CHECK (trim(reason) != ''),
    actor       TEXT NOT NULL CHECK (actor != '' AND length(actor) <= 64),
    resolved_at REAL NOT NULL
);
INSERT INTO resolutions_relaxed (request_id, state, images, amount, overrun, reason, actor,
                                 resolved_at)
    SELECT request_id, state, images, amount, overrun, reason, actor, resolved_at
      FROM resolutions;
DROP TABLE resolutions;
ALTER TABLE resolutions_relaxed RENAME TO resolutions;

CREATE TABLE resolution_log (
    request_id TEXT PRIMARY KEY REFERENCES resolutions (request_id),
    logged_at  REAL NOT NULL
);
INSERT INTO resolution_log (request_id, logged_at)
    SELECT request_id, logged_at FROM resolution_log_kept;
DROP TABLE resolution_log_kept;

PRAGMA legacy_alter_table = OFF;

-- The triggers that went with the old table, as 0002 and 0003 defined them.
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

CREATE TRIGGER resolution_moves_key_money AFTER INSERT ON resolutions
BEGIN
    UPDATE key_usage SET
        uncertain = uncertain - (SELECT amount FROM settlements WHERE request_id = NEW.request_id),
        spent     = spent + CASE NEW.state WHEN 'captured' THEN NEW.amount + NEW.overrun ELSE 0 END,
        overrun   = overrun + NEW.overrun
     WHERE (team, key_fp, period) =
           (SELECT team, key_fp, period FROM holds WHERE request_id = NEW.request_id);
END;

CREATE TRIGGER resolutions_no_update BEFORE UPDATE ON resolutions
BEGIN SELECT RAISE(ABORT, 'resolutions are append-only'); END;
CREATE TRIGGER resolutions_no_delete BEFORE DELETE ON resolutions
BEGIN SELECT RAISE(ABORT, 'resolutions are append-only'); END;

-- A held entry an admin turned uncertain (`ledger expire`): who, when, and once a gateway has
-- written its access-log line, when that was (claimed by whichever gateway sets it first).
CREATE TABLE expiries (
    request_id TEXT PRIMARY KEY REFERENCES settlements (request_id),
    actor      TEXT NOT NULL CHECK (actor != '' AND length(actor) <= 64),
    expired_at REAL NOT NULL,
    logged_at  REAL
);
