-- 0009: the result store (issue 25); expand-only. One row per image of a paid result: where the
-- upstream keeps it (its URL, a credential like the ledger's stored answer), and once fetched
-- the SHA-256 of its bytes (the file's name in the results directory), their size and type. A
-- deleted or expired image keeps its row with deleted_at set, so its gateway URL answers 410
-- and a late fetch cannot bring it back. The ledger is never touched by any of this.

CREATE TABLE result_images (
    request_id  TEXT NOT NULL,
    position    INTEGER NOT NULL CHECK (position >= 0),
    team        TEXT NOT NULL,
    upstream    TEXT,
    url         TEXT NOT NULL,
    url_sha256  TEXT NOT NULL,
    reuse_key   TEXT,
    images      INTEGER NOT NULL CHECK (images >= 1),
    created_at  REAL NOT NULL,
    digest      TEXT,
    bytes       INTEGER CHECK (bytes IS NULL OR bytes >= 0),
    kind        TEXT,
    stored_at   REAL,
    deleted_at  REAL,
    PRIMARY KEY (request_id, position)
);
CREATE INDEX result_images_by_url ON result_images (url_sha256);
CREATE INDEX result_images_by_reuse ON result_images (team, reuse_key, created_at);
CREATE INDEX result_images_by_age ON result_images (created_at);
CREATE INDEX result_images_by_digest ON result_images (digest);
