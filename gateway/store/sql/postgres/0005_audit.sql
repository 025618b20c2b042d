-- 0005: who did it (issue 21). A resolution records its actor by name (an admin key's name, the
-- CLI's --actor, or 'gateway'), no longer only 'admin' or 'gateway'; a hold expired by an admin
-- (`ledger expire`) records who did it, and waits there for a gateway to write its access-log
-- line. Expand-only: the previous release keeps working on this schema.

ALTER TABLE resolutions DROP CONSTRAINT resolutions_actor_check;
ALTER TABLE resolutions ADD CONSTRAINT resolutions_actor_check
    CHECK (actor <> '' AND length(actor) <= 64);

-- A held entry an admin turned uncertain (`ledger expire`): who, when, and once a gateway has
-- written its access-log line, when that was (claimed by whichever gateway sets it first).
CREATE TABLE expiries (
    request_id TEXT PRIMARY KEY REFERENCES settlements (request_id),
    actor      TEXT NOT NULL CHECK (actor <> '' AND length(actor) <= 64),
    expired_at DOUBLE PRECISION NOT NULL,
    logged_at  DOUBLE PRECISION
);
